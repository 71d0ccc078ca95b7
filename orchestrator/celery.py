"""The Celery app: rollouts, validations, liveness sweeps and bundles run here."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")

app = Celery("edgewise")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
def _check_signing_key(**_: object) -> None:
    # Workers sign too (rollouts publish desired states): a wrong key stops the worker as it starts.
    import sys

    from orchestrator import keys

    try:
        keys.check_at_startup()
    except keys.SigningKeyError as exc:
        # Celery logs and ignores what a signal handler raises; a worker must not start without its key.
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc

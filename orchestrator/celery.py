"""The Celery app: rollouts, validations, liveness sweeps and bundles run here."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")

app = Celery("edgewise")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

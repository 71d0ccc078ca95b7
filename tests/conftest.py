"""Shared fixtures: services, personas, factories and real processes.

Tests run against the real PostgreSQL and Redis (``make test`` and ``.ci/run``
set ``DATABASE_URL`` and ``REDIS_URL``). Tests that start processes (a
control plane under uvicorn, edge runtimes) use ``transactional_db`` so that
what the test writes is committed and visible to those processes.
"""

from __future__ import annotations

import os
import tempfile

# Every process of a test run (this one, the control plane it starts) shares
# one data dir, so they sign with the same key. Set before Django reads settings.
os.environ.setdefault("EDGEWISE_DATA_DIR", tempfile.mkdtemp(prefix="edgewise-test-"))
os.environ.setdefault("EDGEWISE_CHANNEL_PREFIX", f"edgewise-test-{os.getpid()}")
os.environ.setdefault("EDGEWISE_CELERY_QUEUE", f"edgewise-test-{os.getpid()}")
os.environ.setdefault("EDGEWISE_SYNC_INTERVAL", "1")
os.environ.setdefault("EDGEWISE_NODE_STALE_AFTER", "4")
os.environ.setdefault("EDGEWISE_NODE_OFFLINE_AFTER", "8")


def _settings_from_environment() -> None:
    # pytest-django has already read the settings by the time this file is
    # imported, so unlike the processes it starts, this process would sign
    # with the repository's var/ key, publish on another channel prefix and
    # announce a 10 s sync interval. Re-read them from the variables above.
    import importlib

    from django.conf import settings

    module = importlib.import_module(os.environ.get("DJANGO_SETTINGS_MODULE", "orchestrator.settings"))
    importlib.reload(module)
    for name in dir(module):
        # TEMPLATES depends on no variable, and apps (template_partials) have
        # already adjusted the live one; the fresh copy would undo that.
        if name.isupper() and name != "TEMPLATES":
            setattr(settings, name, getattr(module, name))


_settings_from_environment()

pytest_plugins = ["tests.fixtures.personas", "tests.fixtures.processes", "tests.fixtures.workers"]

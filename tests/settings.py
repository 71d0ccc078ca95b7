"""Settings for the test run: the production settings, with a few variables
given defaults first.

pytest-django imports this module before any conftest, so everything read
from the environment here is seen by this process and by every process the
tests start (they inherit the environment, this module name included): one
data dir, so all sign with one key; a channel prefix and Celery queue of this
run's own, so parallel runs never cross; short sync and liveness intervals;
a random secret key of this run's (the tests run with PostgreSQL and Redis,
as production does, so the settings require one).
"""

from __future__ import annotations

import os
import secrets
import tempfile

if not os.environ.get("EDGEWISE_SECRET_KEY_FILE"):
    os.environ.setdefault("EDGEWISE_SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("EDGEWISE_DATA_DIR", tempfile.mkdtemp(prefix="edgewise-test-"))
os.environ.setdefault("EDGEWISE_CHANNEL_PREFIX", f"edgewise-test-{os.getpid()}")
os.environ.setdefault("EDGEWISE_CELERY_QUEUE", f"edgewise-test-{os.getpid()}")
os.environ.setdefault("EDGEWISE_SYNC_INTERVAL", "1")
os.environ.setdefault("EDGEWISE_NODE_STALE_AFTER", "4")
os.environ.setdefault("EDGEWISE_NODE_OFFLINE_AFTER", "8")
# Pooled connections stay open, and the test database cannot be dropped while
# any process holds one; tests trade the pool's speed for a clean teardown.
os.environ.setdefault("EDGEWISE_DB_POOL_SIZE", "0")

from orchestrator.settings import *  # noqa: E402,F403

MIDDLEWARE = [*MIDDLEWARE, "tests.middleware.clear_content_type_cache"]  # noqa: F405

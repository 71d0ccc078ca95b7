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
os.environ.setdefault("EDGEWISE_SYNC_INTERVAL", "1")
os.environ.setdefault("EDGEWISE_NODE_STALE_AFTER", "4")
os.environ.setdefault("EDGEWISE_NODE_OFFLINE_AFTER", "8")

pytest_plugins = ["tests.fixtures.personas", "tests.fixtures.processes", "tests.fixtures.workers"]

"""Shared fixtures: services, personas, factories and real processes.

Tests run against the real PostgreSQL and Redis (``make test`` and ``.ci/run``
set ``DATABASE_URL`` and ``REDIS_URL``); ``tests/settings.py`` sets the rest.
Tests that start processes (a control plane under uvicorn, edge runtimes, a
Celery worker) use ``transactional_db`` so that what the test writes is
committed and visible to those processes.
"""

from __future__ import annotations

pytest_plugins = ["tests.fixtures.personas", "tests.fixtures.processes", "tests.fixtures.workers"]

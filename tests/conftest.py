"""Shared fixtures: services, personas, factories and real processes.

Tests run against the real PostgreSQL and Redis (``make test`` and ``.ci/run``
set ``DATABASE_URL`` and ``REDIS_URL``); ``tests/settings.py`` sets the rest.
Tests that start processes (a control plane under uvicorn, edge runtimes, a
Celery worker) use ``transactional_db`` so that what the test writes is
committed and visible to those processes.
"""

from __future__ import annotations

pytest_plugins = ["tests.fixtures.personas", "tests.fixtures.processes", "tests.fixtures.workers"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_trust() -> None:
    """Each test sees the signing key and epoch of its own database, not a cache from the test before."""
    from orchestrator import keys

    keys.forget()

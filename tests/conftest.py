"""Shared fixtures: services, personas, factories and real processes.

Tests run against the real PostgreSQL and Redis (``make test`` and ``.ci/run``
set ``DATABASE_URL`` and ``REDIS_URL``); ``tests/settings.py`` sets the rest.
Tests that start processes (a control plane under uvicorn, edge runtimes, a
Celery worker) use ``transactional_db`` so that what the test writes is
committed and visible to those processes.
"""

from __future__ import annotations

pytest_plugins = ["tests.fixtures.personas", "tests.fixtures.processes", "tests.fixtures.workers"]
# Tests of the OpenVINO environment: they run in .venv-openvino with their own configuration (.ci/openvino).
collect_ignore = ["openvino"]


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_trust() -> None:
    """Each test sees the signing key and epoch of its own database, not a cache from the test before."""
    from orchestrator import keys

    keys.forget()


# The fixtures that start real processes (uvicorn, edge runtimes, a Celery worker), also through another fixture.
PROCESS_FIXTURES = frozenset({"control_plane", "live_control_plane", "edge_node", "celery_worker_process"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run a test that starts processes through a fixture without the ``process`` marker.

    ``-m "not process"`` must leave out every such test; a test that starts
    processes itself (``subprocess``) is marked by hand, which this cannot see.
    """
    unmarked = [item.nodeid for item in items if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("process") is None]
    if unmarked:
        raise pytest.UsageError("these tests start processes through a fixture but lack the process marker "
                                "(pytestmark = pytest.mark.process): " + ", ".join(unmarked))

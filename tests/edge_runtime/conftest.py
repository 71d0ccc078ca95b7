"""Fixtures shared by the model store's tests (and the node-side policy tests built on it).

Modules that need another ``key`` or ``server`` define their own, which
takes precedence over these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from edge_runtime import signing
from tests.edge_runtime import onnx_models as om
from tests.edge_runtime.test_models import ArtifactServer


@pytest.fixture()
def artifacts() -> Iterator[ArtifactServer]:
    """A local HTTP server handing out artifacts (with Range support)."""
    srv = ArtifactServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def key() -> Any:
    """A signing key standing in for the control plane's."""
    return signing.generate_private_key()


@pytest.fixture()
def server() -> Iterator[om.ServerUnderTest]:
    srv = om.ServerUnderTest()
    yield srv
    srv.close()

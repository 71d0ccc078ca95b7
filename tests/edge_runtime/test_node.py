"""The node assembled through edge_runtime.node, on a real state directory (no control plane, no model server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge_runtime import signing
from edge_runtime.node import NodeConfig, NodeError, build_node
from edge_runtime.state import StateDir
from tests.edge_runtime.factories import identity_for


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "node")
    state.save_identity(identity_for(signing.generate_private_key()))
    return state


def test_it_assembles_the_agent_with_its_models_and_datasets_plug_ins(state: StateDir) -> None:
    async def build() -> tuple[list[str], str, bool]:
        node = await build_node(state, NodeConfig(serve_port=-1))
        try:
            return [r.name for r in node.agent.reconcilers], node.agent.status.model_server_url, node.server is None
        finally:
            await node.aclose()

    names, url, no_server = asyncio.run(build())
    assert names == ["models", "datasets"]
    assert url == "" and no_server
    assert (state.path / "telemetry.sqlite3").exists() and (state.path / "audit.sqlite3").exists()


def test_it_refuses_to_start_with_a_datasets_file_that_is_missing(state: StateDir, tmp_path: Path) -> None:
    with pytest.raises(NodeError, match="does not exist"):
        asyncio.run(build_node(state, NodeConfig(serve_port=-1, datasets=tmp_path / "missing.json")))

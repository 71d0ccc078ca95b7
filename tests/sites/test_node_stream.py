"""The node's websocket against the real control plane (uvicorn, Redis channel
layer): credential-authenticated, the node's own stream only, nudged on change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from django.conf import settings
from django.db import connection

from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys
from sites import services
from sites.models import Node, Site
from tests.fixtures.processes import ControlPlane


def _enroll(cp: ControlPlane, site: Site, name: str) -> dict[str, Any]:
    token = services.token_create(actor=Actor.system("test"), site=site)[1]
    response = httpx.post(f"{cp.url}/agent/v1/enroll", json={"token": token, "name": name}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def _stream_url(cp: ControlPlane, node_id: str) -> str:
    return f"ws://127.0.0.1:{cp.port}/agent/v1/nodes/{node_id}/stream"


async def _open(cp: ControlPlane, node_id: str, credential: str | None) -> websockets.ClientConnection:
    # A node is not a browser: it sends no Origin header.
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return await websockets.connect(_stream_url(cp, node_id), additional_headers=headers, open_timeout=10)


def test_it_runs_on_the_real_redis_layer() -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"


@pytest.mark.process
def test_it_nudges_a_connected_node_when_its_desired_state_changes(
    live_control_plane: ControlPlane, site_berlin: Site
) -> None:
    node = _enroll(live_control_plane, site_berlin, "gw-1")

    def change_site() -> None:
        try:
            services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "7"})
        finally:
            connection.close()  # this thread's own connection

    async def scenario() -> Any:
        async with await _open(live_control_plane, node["node_id"], node["credential"]) as ws:
            await asyncio.to_thread(change_site)
            return json.loads(await asyncio.wait_for(ws.recv(), timeout=10))

    nudge = asyncio.run(scenario())
    assert nudge["type"] == "sync" and nudge["generation"] == 2
    # It carries the new state itself, signed for this node, and the time to report it in (one node: at once).
    signed = protocol.SignedDesiredState.model_validate(nudge["desired"])
    state = signing.verify_desired_state(signed, signing.public_key_from_b64(keys.public_key_b64()))
    assert state.node_id == node["node_id"] and state.generation == 2 and state.labels == {"line": "7"}
    assert nudge["report_within_s"] == pytest.approx(1 / settings.NUDGE_REPORTS_PER_S)


@pytest.mark.process
@pytest.mark.parametrize("who", ["no-credential", "forged", "other-node", "revoked"])
def test_it_refuses_a_stream_that_is_not_the_nodes_own(
    live_control_plane: ControlPlane, site_berlin: Site, who: str
) -> None:
    a = _enroll(live_control_plane, site_berlin, "a")
    b = _enroll(live_control_plane, site_berlin, "b")
    if who == "revoked":
        services.node_revoke(actor=Actor.system("test"), node=Node.objects.get(uuid=b["node_id"]))
    credential = {"no-credential": None, "forged": "ewn_forged", "other-node": a["credential"],
                  "revoked": b["credential"]}[who]

    # Closing before accepting is answered as a refused handshake.
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(_open(live_control_plane, b["node_id"], credential))
    assert refused.value.response.status_code == 403

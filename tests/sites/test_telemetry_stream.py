"""Telemetry over the websockets of the real control plane (uvicorn, Redis channel layer): nodes' frames
acknowledged after commit, and operators' browsers told only about the sites they may see."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import httpx
import pytest
import websockets
from django.conf import settings
from django.db import connection
from django.test import Client

from audit.services import Actor
from edge_runtime import protocol
from policies.permissions import role_revoke
from sites import services
from sites.models import Site, TelemetryStream
from tests.fixtures.processes import ControlPlane

pytestmark = pytest.mark.process


@pytest.fixture
def fresh_control_plane(live_control_plane: ControlPlane) -> ControlPlane:
    """The control plane restarted: each test's database flush gives content types new ids, which a
    server process that checked object permissions in an earlier test still has cached."""
    live_control_plane.restart()
    return live_control_plane


def _enroll(cp: ControlPlane, site: Site, name: str) -> dict[str, Any]:
    token = services.token_create(actor=Actor.system("test"), site=site)[1]
    response = httpx.post(f"{cp.url}/agent/v1/enroll", json={"token": token, "name": name}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def _points(first: int, last: int) -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    return [protocol.TelemetryPoint(
        seq=s, at=now, interval_s=1.0, resources=protocol.NodeResources(cpu_percent=12.5),
        models=[protocol.ModelTelemetry(model="resnet", version="1", requests=4, latency_p50_ms=1.0,
                                        latency_p95_ms=3.0)],
    ).model_dump(mode="json") for s in range(first, last + 1)]


async def _node_socket(cp: ControlPlane, node: dict[str, Any]) -> websockets.ClientConnection:
    return await websockets.connect(f"ws://127.0.0.1:{cp.port}/agent/v1/nodes/{node['node_id']}/stream",
                                    additional_headers={"Authorization": f"Bearer {node['credential']}"},
                                    open_timeout=10)


async def _send(ws: websockets.ClientConnection, items: list[dict[str, Any]]) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "telemetry", "items": items}))
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
    return answer


def _browser_headers(cp: ControlPlane, user: Any | None, origin: str | None = None) -> dict[str, str]:
    headers = {"Origin": origin or cp.url}
    if user is not None:
        client = Client()
        client.force_login(user)
        headers["Cookie"] = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return headers


async def _browser(cp: ControlPlane, path: str, headers: dict[str, str]) -> websockets.ClientConnection:
    ws = await websockets.connect(f"ws://127.0.0.1:{cp.port}{path}", additional_headers=headers, open_timeout=10)
    hello = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
    assert hello["type"] == "hello" and hello["server_time"]
    return ws


def test_it_acknowledges_a_frame_once_its_points_are_committed(live_control_plane: ControlPlane,
                                                                site_berlin: Site) -> None:
    node = _enroll(live_control_plane, site_berlin, "gw-1")

    def committed() -> tuple[int, int]:
        try:
            stream = TelemetryStream.objects.get(node__uuid=node["node_id"])
            return stream.last_seq, stream.points
        finally:
            connection.close()

    async def scenario() -> list[Any]:
        async with await _node_socket(live_control_plane, node) as ws:
            ack = await _send(ws, _points(1, 3))
            at_ack = await asyncio.to_thread(committed)
            # The ack was lost on the way: the node sends 1-3 again with 4; 1-3 count once.
            again = await _send(ws, _points(1, 4))
        async with await _node_socket(live_control_plane, node) as ws:
            # After reconnecting, a resend of what is held is answered with where the control plane stands.
            resumed = await _send(ws, _points(2, 2))
        return [ack, at_ack, again, resumed]

    ack, at_ack, again, resumed = asyncio.run(scenario())
    assert ack == {"type": "telemetry.ack", "seq": 3}
    assert at_ack == (3, 3)  # already in the database when the ack arrived
    assert again == {"type": "telemetry.ack", "seq": 4}
    assert resumed == {"type": "telemetry.ack", "seq": 4}
    assert committed() == (4, 4)


def test_it_refuses_a_malformed_frame_and_says_why(live_control_plane: ControlPlane, site_berlin: Site) -> None:
    node = _enroll(live_control_plane, site_berlin, "gw-1")

    async def scenario() -> tuple[dict[str, Any], int | None]:
        async with await _node_socket(live_control_plane, node) as ws:
            answer = await _send(ws, [*_points(3, 3), *_points(2, 2)])
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
        return answer, closed.value.rcvd.code if closed.value.rcvd else None

    answer, code = asyncio.run(scenario())
    assert answer["type"] == "error"
    assert "invalid telemetry frame" in answer["error"] and "increasing seq order: 2 follows 3" in answer["error"]
    assert code == 4400
    assert not TelemetryStream.objects.filter(node__uuid=node["node_id"], last_seq__gt=0).exists()


def test_it_shows_an_operator_only_the_sites_they_may_see(fresh_control_plane: ControlPlane, site_berlin: Site,
                                                          site_ohio: Site, operator: Any, admin_user: Any) -> None:
    live_control_plane = fresh_control_plane
    berlin, ohio = _enroll(live_control_plane, site_berlin, "gw-1"), _enroll(live_control_plane, site_ohio, "gw-1")
    op_headers = _browser_headers(live_control_plane, operator)
    admin_headers = _browser_headers(live_control_plane, admin_user)

    async def until(ws: websockets.ClientConnection, site: Site, kind: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            seen.append(message)
            sites = message.get("sites") or {message.get("site"): None}
            if message["type"] == kind and str(site.uuid) in sites:
                return seen

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        fleet_op = await _browser(live_control_plane, "/ws/fleet/", op_headers)
        fleet_admin = await _browser(live_control_plane, "/ws/fleet/", admin_headers)
        page_op = await _browser(live_control_plane, f"/ws/sites/{site_berlin.uuid}/", op_headers)
        # Ohio first, Berlin after: by the time Berlin's news arrives, Ohio's would have too.
        for node in (ohio, berlin):
            async with await _node_socket(live_control_plane, node) as ws:
                assert (await _send(ws, _points(1, 2)))["seq"] == 2
        op = await until(fleet_op, site_berlin, "confirmed")
        admin = await until(fleet_admin, site_ohio, "confirmed")
        page = await until(page_op, site_berlin, "telemetry")
        for ws in (fleet_op, fleet_admin, page_op):
            await ws.close()
        return op, admin, page

    op, admin, page = asyncio.run(scenario())
    assert str(site_ohio.uuid) not in json.dumps(op)
    assert all(set(m.get("sites", {})) <= {str(site_berlin.uuid)} for m in op)
    confirmed = op[-1]["sites"][str(site_berlin.uuid)]["nodes"][berlin["node_id"]]
    assert confirmed["seq"] == 2 and confirmed["confirmed_at"]
    assert str(site_ohio.uuid) in json.dumps(admin)
    points = page[-1]["points"]
    assert [(p["node"], p["seq"]) for p in points] == [(berlin["node_id"], 1), (berlin["node_id"], 2)]
    assert points[0]["resources"]["cpu_percent"] == 12.5 and points[0]["models"][0]["requests"] == 4


@pytest.mark.parametrize("who", ["anonymous", "other-site", "foreign-origin"])
def test_it_refuses_a_browser_socket_it_may_not_have(fresh_control_plane: ControlPlane, site_ohio: Site,
                                                      operator: Any, who: str) -> None:
    live_control_plane = fresh_control_plane
    user = None if who == "anonymous" else operator
    origin = "http://evil.example" if who == "foreign-origin" else None
    headers = _browser_headers(live_control_plane, user, origin)
    path = f"/ws/sites/{site_ohio.uuid}/" if who == "other-site" else "/ws/fleet/"

    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(_browser(live_control_plane, path, headers))
    assert refused.value.response.status_code == 403


def test_it_stops_the_feed_once_the_users_grant_is_revoked(fresh_control_plane: ControlPlane, site_berlin: Site,
                                                           operator: Any, region_eu: Any) -> None:
    live_control_plane = fresh_control_plane
    node = _enroll(live_control_plane, site_berlin, "gw-1")
    headers = _browser_headers(live_control_plane, operator)

    def revoke() -> None:
        try:
            role_revoke(actor=Actor.system("test"), principal=operator, role="Operator", obj=region_eu)
        finally:
            connection.close()

    async def scenario() -> tuple[int, str]:
        page = await _browser(live_control_plane, f"/ws/sites/{site_berlin.uuid}/", headers)
        async with await _node_socket(live_control_plane, node) as ws:
            seq = (await _send(ws, _points(1, 1)))["seq"]
            first = json.loads(await asyncio.wait_for(page.recv(), timeout=10))
            await asyncio.to_thread(revoke)
            # Points keep coming; within the permission check's lifetime the page is closed, not fed.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while loop.time() < deadline:
                seq = (await _send(ws, _points(seq + 1, seq + 1)))["seq"]
                try:
                    await asyncio.wait_for(page.recv(), timeout=0.5)
                except TimeoutError:
                    continue
                except websockets.ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd else 0, first["type"]
        raise AssertionError("the site page was still open 15 s after the grant was revoked")

    code, first = asyncio.run(scenario())
    assert first in ("telemetry", "confirmed")
    assert code == 4403

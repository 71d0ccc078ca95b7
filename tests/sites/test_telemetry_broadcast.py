"""How committed telemetry reaches the browsers: merged per group and interval, narrowed per user, never held up by
the database work of the process. On the real Redis channel layer, with the real consumers and control plane."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from asgiref.testing import ApplicationCommunicator
from channels.layers import get_channel_layer
from django.conf import settings
from django.test import Client

from audit.services import Actor
from edge_runtime import protocol
from orchestrator.realtime import FLEET_GROUP, site_group
from sites import services
from sites.consumers import FleetConsumer, SiteConsumer
from sites.models import Node, Site, TelemetryStream
from sites.telemetry.committer import Outbox
from sites.telemetry.events import coalesce
from tests.fixtures.processes import ControlPlane

NOW = "2026-01-05T10:00:00+00:00"
LATER = "2026-01-05T10:00:01+00:00"


def _point(node: str, seq: int) -> dict[str, Any]:
    return {"node": node, "seq": seq, "at": NOW, "interval_s": 1.0, "resources": {"cpu_percent": float(seq)},
            "models": []}


def _fleet(site: str, node: str, seq: int, at: str = NOW, lost: int = 0) -> dict[str, Any]:
    return {"sites": {site: {"confirmed_at": at, "nodes": {node: {"seq": seq, "confirmed_at": at, "lost": lost}}}}}


def _round(site: Site, node: str, seq: int, at: str = NOW) -> list[tuple[str, str, dict[str, Any]]]:
    """The events of one commit of one point, as ``telemetry_commit`` returns them."""
    return [(site_group(site.uuid), "site.telemetry", {"site": str(site.uuid), "points": [_point(node, seq)]}),
            (FLEET_GROUP, "fleet.telemetry", _fleet(str(site.uuid), node, seq, at))]


# -- merging ------------------------------------------------------------------------


def test_it_keeps_every_point_of_a_site_in_order() -> None:
    first = {"site": "s", "points": [_point("a", 1), _point("b", 7)]}
    held = coalesce("site.telemetry", None, first)
    held = coalesce("site.telemetry", held, {"site": "s", "points": [_point("a", 2)]})
    assert [(p["node"], p["seq"]) for p in held["points"]] == [("a", 1), ("b", 7), ("a", 2)]
    assert len(first["points"]) == 2  # what was put is not changed by what follows


def test_it_keeps_the_newest_mark_of_every_node_and_adds_up_lost_points() -> None:
    held = coalesce("fleet.telemetry", None, _fleet("s1", "a", 3, lost=2))
    held = coalesce("fleet.telemetry", held, _fleet("s2", "c", 9))
    held = coalesce("fleet.telemetry", held, _fleet("s1", "b", 5))
    held = coalesce("fleet.telemetry", held, _fleet("s1", "a", 4, at=LATER, lost=1))
    assert held["sites"]["s1"]["confirmed_at"] == LATER
    assert held["sites"]["s1"]["nodes"] == {"a": {"seq": 4, "confirmed_at": LATER, "lost": 3},
                                            "b": {"seq": 5, "confirmed_at": NOW, "lost": 0}}
    assert held["sites"]["s2"]["nodes"] == {"c": {"seq": 9, "confirmed_at": NOW, "lost": 0}}


def test_it_refuses_to_merge_an_event_it_has_no_rule_for() -> None:
    with pytest.raises(ValueError, match="fleet.changed"):
        coalesce("fleet.changed", None, {"site": "s"})


# -- the outbox and the consumers ----------------------------------------------------


class _Browser:
    """A browser's socket straight into a consumer (the consumer and channel layer are real; the user is
    already authenticated)."""

    def __init__(self, consumer: Any, path: str, user: Any, **kwargs: str) -> None:
        scope = {"type": "websocket", "path": path, "headers": [], "subprotocols": [], "user": user,
                 "url_route": {"args": (), "kwargs": kwargs}}
        self.app = ApplicationCommunicator(consumer.as_asgi(), scope)

    async def open(self) -> _Browser:
        await self.app.send_input({"type": "websocket.connect"})
        assert (await self.app.receive_output(timeout=10))["type"] == "websocket.accept"
        assert (await self.receive(timeout=10))["type"] == "hello"
        return self

    async def receive(self, timeout: float) -> dict[str, Any]:
        # Not receive_output(): its timeout also stops the consumer.
        try:
            output = await asyncio.wait_for(self.app.output_queue.get(), timeout=timeout)
        except TimeoutError:
            if self.app.future.done():
                self.app.future.result()  # the consumer failed: say how
            raise
        assert output["type"] == "websocket.send", output
        message: dict[str, Any] = json.loads(output["text"])
        return message

    async def close(self) -> None:
        await self.app.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.app.wait(timeout=10)


async def _all(browser: _Browser, quiet: float) -> list[tuple[float, dict[str, Any]]]:
    """Every message until none has come for ``quiet`` seconds, with when it came."""
    seen = []
    while True:
        try:
            message = await browser.receive(timeout=quiet)
        except TimeoutError:
            return seen
        seen.append((time.monotonic(), message))


@pytest.mark.django_db(transaction=True)
def test_it_sends_an_idle_outbox_at_once_and_merges_what_follows_into_one_message(site_berlin: Site,
                                                                                  site_ohio: Site,
                                                                                  operator: Any) -> None:
    # The operator may see Berlin (their region), not Ohio.
    interval = 1.0

    async def scenario() -> tuple[float, list[tuple[float, dict[str, Any]]], list[tuple[float, dict[str, Any]]]]:
        fleet = await _Browser(FleetConsumer, "/ws/fleet/", operator).open()
        page = await _Browser(SiteConsumer, f"/ws/sites/{site_berlin.uuid}/", operator,
                              site_id=str(site_berlin.uuid)).open()
        outbox = Outbox(interval=interval)
        put_at = time.monotonic()
        outbox.put(_round(site_berlin, "b1", 1))
        first = (time.monotonic(), await fleet.receive(timeout=10))
        # Three more commits within the interval: one message per group, after the interval.
        outbox.put([*_round(site_ohio, "o1", 1), *_round(site_berlin, "b2", 1)])
        await asyncio.sleep(0)
        outbox.put(_round(site_berlin, "b1", 2, at=LATER))
        await asyncio.sleep(0.1)
        outbox.put(_round(site_ohio, "o1", 2, at=LATER))
        fleet_seen, page_seen = await asyncio.gather(_all(fleet, 3.0), _all(page, 3.0))
        fleet_seen.insert(0, first)
        await fleet.close()
        await page.close()
        await get_channel_layer().close_pools()
        return put_at, fleet_seen, page_seen

    put_at, fleet_seen, page_seen = asyncio.run(scenario())
    ohio = str(site_ohio.uuid)
    berlin = str(site_berlin.uuid)
    assert ohio not in json.dumps(fleet_seen) and ohio not in json.dumps(page_seen)

    # The fleet: the first commit at once, then one message with the newest state of every node the
    # operator may see (Ohio's commits were merged into it too, and taken out for this user).
    assert [m["type"] for _, m in fleet_seen] == ["confirmed", "confirmed"]
    (first_at, first), (merged_at, merged) = fleet_seen
    assert first_at - put_at < interval
    assert first["sites"] == {berlin: {"confirmed_at": NOW, "nodes": {"b1": {"seq": 1, "confirmed_at": NOW,
                                                                             "lost": 0}}}}
    assert merged_at - first_at >= interval * 0.9
    assert merged["sites"] == {berlin: {"confirmed_at": LATER, "nodes": {
        "b1": {"seq": 2, "confirmed_at": LATER, "lost": 0}, "b2": {"seq": 1, "confirmed_at": NOW, "lost": 0}}}}

    # The site page: every point of its site, in commit order, in two messages; and its site's
    # confirmations from the fleet group, the newest last.
    telemetry = [m for _, m in page_seen if m["type"] == "telemetry"]
    assert [[(p["node"], p["seq"]) for p in m["points"]] for m in telemetry] == [[("b1", 1)], [("b2", 1), ("b1", 2)]]
    confirmed = [m for _, m in page_seen if m["type"] == "confirmed"]
    assert confirmed == [first, merged]


# -- against the real control plane ----------------------------------------------------


def _enroll(cp: ControlPlane, site: Site, name: str) -> dict[str, Any]:
    token = services.token_create(actor=Actor.system("test"), site=site)[1]
    response = httpx.post(f"{cp.url}/agent/v1/enroll", json={"token": token, "name": name}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def _frame(seq: int) -> str:
    point = protocol.TelemetryPoint(seq=seq, at=dt.datetime.now(dt.UTC), interval_s=1.0,
                                    resources=protocol.NodeResources(cpu_percent=10.0))
    return protocol.TelemetryFrame(items=[point]).model_dump_json()


async def _node_socket(cp: ControlPlane, node: dict[str, Any]) -> websockets.ClientConnection:
    return await websockets.connect(f"ws://127.0.0.1:{cp.port}/agent/v1/nodes/{node['node_id']}/stream",
                                    additional_headers={"Authorization": f"Bearer {node['credential']}"},
                                    open_timeout=10)


def _cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def _until_confirmed(ws: websockets.ClientConnection, node_id: str, seq: int) -> None:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        nodes = [n for site in message.get("sites", {}).values() for n in site["nodes"].items()]
        if (node_id, seq) in [(n, info["seq"]) for n, info in nodes]:
            return


@pytest.mark.process
def test_it_keeps_a_quiet_browser_socket_open(live_control_plane: ControlPlane, site_berlin: Site,
                                              admin_user: Any) -> None:
    # The channel layer waits for messages 5 s at a time; a wait that ended without one must not end the
    # socket that happened to be waiting.
    node = _enroll(live_control_plane, site_berlin, "gw-1")
    headers = {"Origin": live_control_plane.url, "Cookie": _cookie(admin_user)}

    async def scenario() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{live_control_plane.port}/ws/fleet/",
                                      additional_headers=headers, open_timeout=10) as fleet:
            assert json.loads(await asyncio.wait_for(fleet.recv(), timeout=10))["type"] == "hello"
            await asyncio.sleep(7)
            async with await _node_socket(live_control_plane, node) as ws:
                await ws.send(_frame(1))
                assert json.loads(await asyncio.wait_for(ws.recv(), timeout=10))["seq"] == 1
            await _until_confirmed(fleet, node["node_id"], 1)

    asyncio.run(scenario())


@pytest.mark.process
def test_it_lets_browsers_in_while_a_commit_waits(live_control_plane: ControlPlane, site_berlin: Site,
                                                 admin_user: Any) -> None:
    # A commit stuck on a lock (or just slow) must not hold up the sign-in and permission checks of the
    # browsers' sockets, nor their messages; the node's ack still waits for the commit.
    node = _enroll(live_control_plane, site_berlin, "gw-1")
    headers = {"Origin": live_control_plane.url, "Cookie": _cookie(admin_user)}
    db = settings.DATABASES["default"]
    streams, nodes = TelemetryStream._meta.db_table, Node._meta.db_table

    async def scenario() -> None:
        async with await _node_socket(live_control_plane, node) as ws:
            await ws.send(_frame(1))
            assert json.loads(await asyncio.wait_for(ws.recv(), timeout=10))["seq"] == 1
            with psycopg.connect(host=db.get("HOST") or "127.0.0.1", port=db.get("PORT") or 5432,
                                 user=db.get("USER") or "postgres", dbname=db["NAME"]) as lock:
                lock.execute(f"SELECT 1 FROM {streams} WHERE node_id = (SELECT id FROM {nodes} WHERE uuid = %s) "
                             "FOR UPDATE", [node["node_id"]])
                await ws.send(_frame(2))
                await asyncio.sleep(0.5)  # the commit of 2 is now waiting for the lock
                fleet = await websockets.connect(f"ws://127.0.0.1:{live_control_plane.port}/ws/fleet/",
                                                 additional_headers=headers, open_timeout=10)
                assert json.loads(await asyncio.wait_for(fleet.recv(), timeout=5))["type"] == "hello"
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ws.recv(), timeout=0.5)  # not acknowledged: not committed
            # The lock is gone with its transaction: 2 commits, is acknowledged and reaches the browser.
            assert json.loads(await asyncio.wait_for(ws.recv(), timeout=10))["seq"] == 2
            await _until_confirmed(fleet, node["node_id"], 2)
            await fleet.close()

    asyncio.run(scenario())

"""Quiet syncs answered in front of Django (sites.quiet_asgi), with real PostgreSQL and Redis.

The node is enrolled and settled through the view (``SimNode``); its syncs are then sent through
:class:`QuietSyncs` wrapping an application that records what reaches it, which stands where Django's
handler stands in ``orchestrator.asgi``. Whatever the wrapper does not answer must reach that application
with its body intact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from django.test.utils import override_settings

from metrics import counters
from orchestrator import quiet
from sites import quiet_sync
from sites.heartbeats import heartbeats_flush
from sites.quiet_asgi import MAX_QUIET_BODY_BYTES, QuietSyncs
from tests.sites.test_quiet_sync import SimNode, node  # noqa: F401  (the settled node fixture)

pytestmark = pytest.mark.django_db


class Downstream:
    """The application behind the wrapper: records each request (scope and the whole body) and answers 299."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], bytes]] = []

    async def __call__(self, scope: Any, receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((dict(scope), body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"downstream"})


def call(app: QuietSyncs, *, path: str, body: bytes, headers: dict[str, str], method: str = "POST",
         chunks: int = 1) -> tuple[int, dict[str, str], bytes]:
    """One request through ``app``: its status, headers and body."""
    size = -(-len(body) // chunks) or 1
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": method, "path": path, "client": ("10.1.2.3", 4567),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], response_headers, b"".join(m.get("body", b"") for m in sent[1:])


def sync_call(app: QuietSyncs, sim: SimNode, body: dict[str, Any] | bytes, *, credential: str | None = None,
              content_type: str = "application/json", host: str = "testserver",
              chunks: int = 1) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Host": host, "Content-Type": content_type, "Content-Length": str(len(raw)),
               "Authorization": f"Bearer {credential or sim.credential}"}
    return call(app, path=f"/agent/v1/nodes/{sim.node_id}/sync", body=raw, headers=headers, chunks=chunks)


def quiet_count() -> float:
    return counters.counters_read()[counters.SYNC].get("path:quiet", 0)


def test_a_quiet_sync_is_answered_before_the_application_and_counted(node: SimNode) -> None:  # noqa: F811
    downstream = Downstream()
    app = QuietSyncs(downstream, counted=counters.quiet_sync_count)
    heartbeats_flush()
    before = quiet_count()
    for body in (node.brief(status="degraded", message="fan"), node.full()):
        status, headers, raw = sync_call(app, node, body, chunks=3)
        assert status == 200 and headers["edgewise-sync"] == "quiet", raw
        answer = json.loads(raw)
        assert answer["generation"] == node.generation and answer["desired"] is None
        assert answer["report_digest"] == node.digest() and answer["report_wanted"] is False
    assert downstream.seen == []
    assert quiet_count() == before + 2
    # The heartbeat waits in Redis, with the address the request came from, and reaches PostgreSQL at the flush.
    assert heartbeats_flush() == 1
    assert node.node.health["status"] == "ok" and node.node.last_seen_ip == "10.1.2.3"


def test_a_sync_that_is_not_quiet_reaches_the_application_whole_and_marked_tried(node: SimNode) -> None:  # noqa: F811
    downstream = Downstream()
    app = QuietSyncs(downstream)
    cases = {
        "wrong credential": (node.brief(), "ewn_" + "x" * 40),
        "digest not held": (node.brief(digest="0" * 64), None),
        "generation not answered": ({**node.brief(), "actual": {"applied_generation": node.generation + 1,
                                                                 "applied_epoch": node.epoch}}, None),
        "refusals to report": ({**node.full(), "refusals": [{"generation": 1, "reason": "x",
                                                             "at": "2026-01-01T00:00:00Z"}]}, None),
    }
    for what, (body, credential) in cases.items():
        raw = json.dumps(body).encode()
        status, _, answer = sync_call(app, node, raw, credential=credential, chunks=2)
        assert (status, answer) == (299, b"downstream"), what
        scope, seen = downstream.seen[-1]
        assert seen == raw, f"{what}: the body did not reach the application as sent"
        # Checked and not quiet: the view does not ask Redis again.
        assert scope.get(quiet_sync.TRIED) is True, what
    assert heartbeats_flush() == 0  # none of them recorded a heartbeat


def test_what_the_view_would_refuse_is_left_to_it(node: SimNode) -> None:  # noqa: F811
    downstream = Downstream()
    app = QuietSyncs(downstream)
    brief = json.dumps(node.brief()).encode()
    cases: dict[str, dict[str, Any]] = {
        "not JSON": {"body": b"{not json"},
        "a JSON array": {"body": b"[1, 2]"},
        "a NUL in the health": {"body": json.dumps(node.brief(message="a\u0000b")).encode()},
        "text/plain": {"body": brief, "content_type": "text/plain"},
        "a host not allowed": {"body": brief, "host": "evil.example"},
        "over the quiet body limit": {"body": json.dumps(node.brief(message="x" * MAX_QUIET_BODY_BYTES)).encode()},
    }
    for what, case in cases.items():
        status, _, _ = sync_call(app, node, case.pop("body"), **case)
        assert status == 299, what
        assert quiet_sync.TRIED not in downstream.seen[-1][0], what
    # Not a sync: another path, another method, no bearer.
    for path, method, headers in ((f"/agent/v1/nodes/{node.node_id}/desired-state", "POST", {}),
                                  (f"/agent/v1/nodes/{node.node_id}/sync", "GET", {}),
                                  (f"/agent/v1/nodes/{node.node_id}/sync", "POST", {"Authorization": "Basic x"})):
        status, _, _ = call(app, path=path, method=method, body=brief,
                            headers={"Host": "testserver", "Content-Type": "application/json",
                                     "Content-Length": str(len(brief)), **headers})
        assert status == 299, (path, method, headers)
    assert heartbeats_flush() == 0


def test_a_body_shorter_than_declared_is_left_to_the_application(node: SimNode) -> None:  # noqa: F811
    downstream = Downstream()
    raw = json.dumps(node.brief()).encode()
    headers = {"Host": "testserver", "Content-Type": "application/json", "Content-Length": str(len(raw) + 10),
               "Authorization": f"Bearer {node.credential}"}
    status, _, _ = call(QuietSyncs(downstream), path=f"/agent/v1/nodes/{node.node_id}/sync", body=raw,
                        headers=headers)
    assert status == 299 and downstream.seen[-1][1] == raw


def test_without_quiet_syncs_every_sync_reaches_the_application(node: SimNode) -> None:  # noqa: F811
    downstream = Downstream()
    with override_settings(QUIET_SYNC=False):
        assert not quiet.enabled()
        status, _, _ = sync_call(QuietSyncs(downstream), node, node.brief())
    assert status == 299 and len(downstream.seen) == 1

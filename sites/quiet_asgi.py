"""Quiet syncs answered in front of Django, on the event loop (``sites.quiet_sync``).

A fleet's steady state is almost all quiet syncs, and Django's request cycle (its middleware, a thread hop
for a synchronous view, the response machinery) costs several times what answering one does. So
:class:`QuietSyncs` wraps the HTTP application and answers a node's sync itself when it can be answered
quietly: it reads the small body, parses and validates it exactly as the view does (``agent_api.read_json``
and the wire model), and runs the same Redis script through an asyncio client. The credential is checked in
that script, against the hash the node's last full sync left, as in the view.

Everything else goes to the wrapped application untouched, with the body it already read handed back: a
request this class has any doubt about (not a sync, a body over ``MAX_QUIET_BODY_BYTES`` or of undeclared
length, a content type or host the view would refuse, a body the view would refuse, a sync that is not
quiet) is answered by Django, which refuses or takes the whole path as it always did. A sync the check found
not quiet is marked in its scope (``quiet_sync.TRIED``) so that the view does not ask Redis the same question again.

A quiet answer is counted in the request metrics as the view's would be (``counted``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from pydantic import ValidationError

from edge_runtime import protocol
from orchestrator import quiet
from sites import quiet_sync
from sites.agent_api import BadRequest, read_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Counted = Callable[[float], Awaitable[None]]

# Django's uuid path converter, as sites.agent_urls routes the sync.
SYNC_PATH = re.compile(r"^/agent/v1/nodes/(?P<node_id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                       r"/sync$")
# A brief sync is well under a kilobyte and its health a few more; a larger body is a full report anyway.
MAX_QUIET_BODY_BYTES = 64 * 1024


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # A repeated header is not something a node sends; the view sees all of them if it comes to that.
    return {name.lower(): value for name, value in scope.get("headers", ())}


def _allowed_host(headers: dict[bytes, bytes]) -> bool:
    """Whether Django's own host check (``HttpRequest.get_host``) would let this request through."""
    if settings.USE_X_FORWARDED_HOST:
        return False  # the view's check reads the forwarded host: let it
    host = headers.get(b"host", b"").decode("latin-1")
    domain, _port = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    return bool(domain) and validate_host(domain, allowed)


def _credential(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None


def _declared_length(headers: dict[bytes, bytes]) -> int | None:
    try:
        length = int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None
    return length if 0 <= length <= MAX_QUIET_BODY_BYTES else None


def _json_content(headers: dict[bytes, bytes]) -> bool:
    media_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return media_type == b"application/json"


def _parsed(body: bytes) -> protocol.SyncRequest | None:
    """The sync request in ``body`` if the view would accept it as it is; None leaves it to the view."""
    try:
        data = read_json(body)
        if not isinstance(data, dict):
            return None
        return protocol.SyncRequest.model_validate(data)
    except (BadRequest, ValidationError):
        return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive``, giving back first the messages already read from it."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class QuietSyncs:
    """Answer quiet syncs on the event loop; pass every other request to ``app``."""

    def __init__(self, app: ASGIApp, *, counted: Counted | None = None) -> None:
        self.app = app
        self.counted = counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = SYNC_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if match is None or scope.get("method") != "POST" or not quiet.enabled():
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _headers(scope)
        credential = _credential(headers)
        length = _declared_length(headers)
        if credential is None or length is None or not _json_content(headers) or not _allowed_host(headers):
            await self.app(scope, receive, send)
            return
        messages, body = await self._read(receive, length)
        request = _parsed(body) if body is not None else None
        answer = None
        if request is not None:
            client = scope.get("client")
            answer = await quiet_sync.answer_async(node_id=match["node_id"], credential=credential,
                                                   request=request, ip=client[0] if client else None)
        if answer is None:
            if request is not None:
                scope = {**scope, quiet_sync.TRIED: True}
            await self.app(scope, _replay(messages, receive), send)
            return
        # Counted before it is sent, as Django's middleware counts: an answer a node has is on the metrics.
        if self.counted is not None:
            await self.counted(time.perf_counter() - started)
        await self._answer(send, answer)

    @staticmethod
    async def _read(receive: Receive, length: int) -> tuple[list[Message], bytes | None]:
        """The messages read and the body they carry; None when it is not the declared, whole body."""
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None  # a disconnect: the application sees it in turn
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > length:
                return messages, None
            if not message.get("more_body", False):
                return messages, b"".join(chunks) if size == length else None

    @staticmethod
    async def _answer(send: Send, answer: dict[str, Any]) -> None:
        body = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (protocol.SYNC_PATH_HEADER.lower().encode(), b"quiet"),
            (b"x-content-type-options", b"nosniff"),
        ]})
        await send({"type": "http.response.body", "body": body})

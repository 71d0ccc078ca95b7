"""Request body limits and a body read timeout, in front of Django's ASGI handler.

Django's handler reads a request's whole body before any middleware or view
runs, so the views' own checks come too late for a client that declares a
huge ``Content-Length`` and sends nothing: it holds a worker for as long as
it keeps the connection. :class:`BodyLimits` wraps the HTTP application and
guarantees, for every request:

* a declared ``Content-Length`` over the path's limit gets 413 at once,
  before anything is read and without the application running;
* a body that grows over the limit without declaring it (chunked, or a
  false length) is cut off with 413 as soon as it passes it;
* a body that makes no progress for ``timeout_s`` gets 408; the clock is one
  of no progress rather than a total, since a large model upload over a slow
  link is legitimate. Once the body is in, nothing is timed: the wait for the
  client's disconnect that Django keeps up while it answers is its own.

Each refusal closes the connection (the rest of the body is never read), and
the application sees only a disconnect, so it writes nothing. Agent paths
(``/agent/v1/``) answer in the agent protocol's error shape,
``{"error": ..., "field": null}``; others in plain text.

The limits are those the views enforce themselves, looked up by URL name
(:data:`LIMITS`), and only for a body that could be over the smallest of
them: a small request costs a header scan and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings
from django.urls import Resolver404, resolve

from edge_runtime import protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("orchestrator.asgi_limits")

AGENT_PREFIX = "/agent/v1/"
# Any other request: console forms are small (Django refuses non-file form data over
# DATA_UPLOAD_MAX_MEMORY_SIZE anyway); only the model upload carries a file.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# A model upload is a multipart form: the file, plus its boundaries and the version's fields.
MULTIPART_ALLOWANCE_BYTES = 1024 * 1024


# A bundle out of an air-gapped site, uploaded on its page (sites.bundle_views): small (no model travels out).
BUNDLE_OUT_MAX_BYTES = 512 * 1024 * 1024


def model_upload_limit() -> int:
    return int(settings.MAX_MODEL_BYTES) + MULTIPART_ALLOWANCE_BYTES


# The views with a limit of their own (URL name: bytes); other agent endpoints take
# protocol.MAX_AGENT_BODY_BYTES, as sites.agent_api.parse_body does.
LIMITS: dict[str, Callable[[], int]] = {
    "agent-queries:query-result": lambda: protocol.MAX_QUERY_RESULT_BYTES,
    "models_registry:version-upload": model_upload_limit,
    "admin:models_registry_modelversion_add": model_upload_limit,
    "sites:bundle-out-upload": lambda: BUNDLE_OUT_MAX_BYTES + MULTIPART_ALLOWANCE_BYTES,
}


def body_limit(path: str) -> int:
    """The most bytes a request body to ``path`` may have."""
    try:
        match = resolve(path)
    except Resolver404:
        match = None
    if match is not None and match.view_name in LIMITS:
        return LIMITS[match.view_name]()
    if path.startswith(AGENT_PREFIX):
        return protocol.MAX_AGENT_BODY_BYTES
    return DEFAULT_MAX_BODY_BYTES


def smallest_limit() -> int:
    return min(protocol.MAX_AGENT_BODY_BYTES, DEFAULT_MAX_BODY_BYTES, *(limit() for limit in LIMITS.values()))


class BodyLimits:
    """ASGI middleware for HTTP: see the module docstring. Other scope types pass through untouched."""

    def __init__(self, app: ASGIApp, *, timeout_s: float | None = None) -> None:
        self.app = app
        self.timeout_s = float(settings.BODY_TIMEOUT_S if timeout_s is None else timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"the body timeout must be a positive number of seconds, not {self.timeout_s!r}")
        self.floor = smallest_limit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Request(self, scope, receive, send).run()


class _Request:
    """One HTTP request through :class:`BodyLimits`."""

    def __init__(self, limits: BodyLimits, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = limits.app
        self.timeout_s = limits.timeout_s
        self.floor = limits.floor
        self.scope = scope
        self.upstream_receive = receive
        self.upstream_send = send
        self.path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and self.path.startswith(root):
            self.path = self.path[len(root):] or "/"
        self.received = 0
        self.body_done = False
        self.response_started = False
        # Looked up once the body could be over the smallest limit.
        self.limit: int | None = None
        # (status, message) of the refusal to answer once the application has stopped.
        self.refusal: tuple[int, str] | None = None

    async def run(self) -> None:
        declared = self.declared_length()
        if declared is not None and declared > self.floor and declared > self.path_limit():
            await self.refuse(413, f"request body of {declared} bytes exceeds the limit of "
                                   f"{self.path_limit()} bytes for {self.path}")
            return
        await self.app(self.scope, self.receive, self.send)
        if self.refusal is not None and not self.response_started:
            await self.refuse(*self.refusal)

    def declared_length(self) -> int | None:
        for name, value in self.scope.get("headers", ()):
            if name == b"content-length":
                # The server has checked the framing; a value it let through that is not a number is no claim.
                return int(value) if value.isdigit() else None
        return None

    def path_limit(self) -> int:
        if self.limit is None:
            self.limit = body_limit(self.path)
        return self.limit

    async def receive(self) -> Message:
        if self.refusal is not None:
            return {"type": "http.disconnect"}
        if self.body_done:
            return await self.upstream_receive()
        try:
            async with asyncio.timeout(self.timeout_s):
                message = await self.upstream_receive()
        except TimeoutError:
            return self.stop(408, f"no part of the request body came for {self.timeout_s:g} s")
        if message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.floor and self.received > self.path_limit():
            return self.stop(413, f"request body exceeds the limit of {self.path_limit()} bytes for {self.path}")
        if not message.get("more_body", False):
            self.body_done = True
        return message

    def stop(self, status: int, message: str) -> Message:
        """Note the refusal and tell the application the client went: it stops without answering."""
        self.refusal = (status, message)
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self.upstream_send(message)

    async def refuse(self, status: int, message: str) -> None:
        client = self.scope.get("client") or ("?", 0)
        logger.info("%d for %s %s from %s: %s", status, self.scope.get("method", ""), self.path, client[0], message)
        if self.path.startswith(AGENT_PREFIX):
            body = json.dumps({"error": message, "field": None}).encode()
            content_type = b"application/json"
        else:
            body = message.encode()
            content_type = b"text/plain; charset=utf-8"
        # The rest of the body is never read: the connection cannot carry another request.
        await self.upstream_send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await self.upstream_send({"type": "http.response.body", "body": body})

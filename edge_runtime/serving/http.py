"""The model server's HTTP/1.1: an asyncio protocol on httptools' parser, with no per-request task.

A request is parsed by httptools (llhttp), handed to :meth:`OIPApp.dispatch`
as method, path, headers and body, and answered in one write, either at once
or when the batcher's future resolves, through a callback rather than a
coroutine (why not a general ASGI server:
docs/decisions/0001-model-server-http-layer.md). The server that accepts the
connections, sweeps them and shuts down is :mod:`.http_server`.

What it does, for the clients that talk to a node:

* HTTP/1.1 keep-alive (and 1.0 with or without it); pipelined requests are
  answered in order, and reading pauses while too many wait.
* Request bodies by ``Content-Length`` or chunked; ``Expect: 100-continue``
  gets its interim answer; a body over ``max_body_bytes`` gets 413 as soon
  as that is known (from the declared length, or once the bytes exceed it),
  and the rest of it is read and dropped so that the connection stays usable.
* A request line and headers over ``MAX_HEAD_BYTES`` get 431; a request the
  parser rejects gets 400; both close the connection.
* Idle keep-alive connections close after ``keep_alive_s``; a client that
  stops reading pauses its connection's reading (write flow control).
* A request's line and headers must be in within ``header_timeout_s`` of
  its first byte (however slowly they trickle in), and its body must not
  stall for ``body_timeout_s``; past either the request is answered 408 and
  the connection closed. A client that reads nothing of its answers for
  ``body_timeout_s`` is cut off too. The body's clock is one of no
  progress rather than a total: a large model input over a slow site link
  is legitimate, and a stalled sender is what holds a connection; the
  connection cap bounds those that trickle. Time does not run while the
  connection still owes answers that the client reads (it may rightly wait
  for them, or for its ``100 Continue``).
* All of these are checked by one sweep over the connections, every
  quarter of the shortest of the three limits, so that each is acted on at
  most half the shortest limit late. There is no timer per request, and
  the request path keeps only a counter and a flag for the sweep: the sweep
  notes what it saw of each request and when, and a request that looks the
  same for a limit's time has stalled.
* At most ``max_connections`` connections per serving process: the one
  beyond gets 503 and is closed at once, and the log says so (at most one
  line per ``LOG_INTERVAL_S`` for each kind of event, with a count, so that
  a thousand slow or refused clients do not flood it). A connection frees
  its place as soon as its client goes.
* :meth:`~.http_server.HTTPServer.close` stops accepting, lets every request in progress
  finish and be answered (a stalled one times out as above), then closes
  the connections.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Protocol

import httptools

if TYPE_CHECKING:
    from edge_runtime.serving.app import Answer, OIPApp

MAX_HEAD_BYTES = 64 * 1024
# Pipelined requests waiting for their answers before reading pauses.
MAX_PIPELINED = 32
DEFAULT_KEEP_ALIVE_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# Per serving process; a node's total is this times its serving processes.
DEFAULT_MAX_CONNECTIONS = 1024

_REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def render(status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, keep_alive: bool,
           head_only: bool = False) -> bytes:
    """One whole HTTP/1.1 response: status line, headers, content-length, body."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))]
    for name, value in headers:
        parts += [name, b": ", value, b"\r\n"]
    parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("data", "keep_alive")

    def __init__(self, keep_alive: bool) -> None:
        self.data: bytes | None = None
        self.keep_alive = keep_alive


class _Notice(Protocol):
    def add(self, now: float) -> None: ...


class ConnectionOwner(Protocol):
    """What a connection needs of the server that accepted it (``.http_server.HTTPServer``)."""

    @property
    def app(self) -> OIPApp: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def connections(self) -> set[Connection]: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def refusal(self) -> bytes: ...

    @property
    def refused(self) -> _Notice: ...

    @property
    def closing(self) -> bool: ...

    @property
    def header_timeout_s(self) -> float: ...

    @property
    def body_timeout_s(self) -> float: ...

    def connection_closed(self) -> None: ...


class Connection(asyncio.Protocol):
    """One client connection: its requests parsed, dispatched and answered in order."""

    def __init__(self, server: ConnectionOwner) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[_Slot] = collections.deque()
        # When the connection last finished a request or an answer (loop time): the idle sweep reads it.
        self.last_active = self.loop.time()
        self.reading_paused = False
        self.writing_paused = False
        self.closed = False
        # Between a request's first byte and its last: no idle timeout meanwhile.
        self.in_request = False
        # Between a request's first byte and the end of its headers: the header timeout runs.
        self.in_head = False
        # Requests begun on this connection, so that the sweep tells one request from the next.
        self.serial = 0
        # What the sweep last saw of a stalling client, and when: (serial, body bytes, -1 in the head or -2 when
        # it does not read, bytes waiting to be written to it).
        self.seen: tuple[int, int, int] | None = None
        self.seen_at = 0.0
        # A request could not be parsed: its answer is queued, nothing more is read.
        self.broken = False
        self.url = b""
        self.head_bytes = 0
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        # The request got its answer before its body ended (413): drop the rest.
        self.answered = False

    # asyncio -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= server.max_connections:
            # Refused before anything is read: the client learns why, and holds nothing.
            self.closed = True
            self.broken = True
            transport.write(server.refusal)  # type: ignore[attr-defined]
            transport.close()
            server.refused.add(self.loop.time())
            return
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.connection_closed()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not served here")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._update_reading()

    # httptools callbacks -------------------------------------------------------

    # These run for every request: few calls, no timers.

    def on_message_begin(self) -> None:
        self.in_request = True
        self.in_head = True
        self.serial += 1
        self.url = b""
        self.head_bytes = 0
        self.headers = {}
        self.chunks = []
        self.size = 0
        self.answered = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES:
            self._head_too_large()
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.closed:
            return
        declared = self.headers.get(b"content-length")
        limit = self.app.max_body_bytes
        expects = self.headers.get(b"expect", b"").lower() == b"100-continue"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # A client that asked first will not send the body: the connection
            # cannot carry on past it, so it closes after the answer.
            self._answer_early(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes",
                               keep_alive=not expects)
        elif expects:
            # An interim answer, in its place after the answers still owed.
            slot = _Slot(keep_alive=True)
            slot.data = b"HTTP/1.1 100 Continue\r\n\r\n"
            self.pending.append(slot)
            self._flush()

    def on_body(self, body: bytes) -> None:
        # Counted also while a refused body is dropped: the body timeout sees its progress.
        self.size += len(body)
        if self.answered or self.closed:
            return
        if self.size > self.app.max_body_bytes:
            self.chunks = []
            self._answer_early(413, f"request body is over the limit of {self.app.max_body_bytes} bytes")
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.in_request = False
        self.last_active = self.loop.time()
        if self.answered or self.closed:
            return
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        method = self.parser.get_method().decode("ascii", "replace")
        keep_alive = self.parser.should_keep_alive() and not self.server.closing
        slot = _Slot(keep_alive)
        self.pending.append(slot)
        try:
            path = httptools.parse_url(self.url).path.decode("utf-8", "replace")
        except httptools.HttpParserInvalidURLError:
            self._settle(slot, (400, *self.app.error_answer(f"invalid request target {self.url[:200]!r}")),
                         method)
            return
        answer = self.app.dispatch(method, path, self.headers, body,
                                   lambda later: self._settle(slot, later, method))
        if answer is None:
            if len(self.pending) >= MAX_PIPELINED:
                self._update_reading()
        else:
            self._settle(slot, answer, method)

    # answers -----------------------------------------------------------------

    def _settle(self, slot: _Slot, answer: Answer, method: str) -> None:
        status, headers, body = answer
        # A server that is stopping closes each connection after the answers it owes.
        slot.keep_alive = slot.keep_alive and not self.server.closing
        slot.data = render(status, headers, body, keep_alive=slot.keep_alive, head_only=method == "HEAD")
        self._flush()

    def _flush(self) -> None:
        """Write the answers at the head of the line that are ready, in order."""
        pending = self.pending
        while pending and pending[0].data is not None:
            slot = pending.popleft()
            if self.closed or self.transport is None:
                continue
            self.transport.write(slot.data)  # type: ignore[arg-type]
            if not slot.keep_alive:
                self.transport.close()
                self.closed = True
        if self.reading_paused:
            self._update_reading()
        if not pending:
            self.last_active = self.loop.time()
            if self.server.closing and self.transport is not None and not self.closed and not self.in_request:
                self.transport.close()
                self.closed = True

    def _answer_early(self, status: int, message: str, *, keep_alive: bool = True) -> None:
        """Answer the request being read now, before its body is in; the rest of the body is dropped."""
        self.answered = True
        slot = _Slot(keep_alive and self.parser.should_keep_alive() and not self.server.closing)
        self.pending.append(slot)
        self._settle(slot, (status, *self.app.error_answer(message)), "POST")

    def _fail(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer it after those before it, then close."""
        if self.broken:
            return
        self.broken = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.reading_paused = True
        slot = _Slot(keep_alive=False)
        self.pending.append(slot)
        self._settle(slot, (status, *self.app.error_answer(message)), "GET")

    def _head_too_large(self) -> None:
        self._fail(431, f"request line and headers are over {MAX_HEAD_BYTES} bytes")
        raise httptools.HttpParserCallbackError("head too large")

    def _update_reading(self) -> None:
        if self.transport is None or self.closed or self.broken:
            return
        pause = self.writing_paused or len(self.pending) >= MAX_PIPELINED
        if pause and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif not pause and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    def sweep(self, now: float, idle_before: float) -> str | None:
        """The sweep's look at this connection: close it if idle since ``idle_before``, or cut off a stalled
        client; what stalled (``"head"``, ``"body"`` or ``"reading"``), if it was cut off."""
        if self.closed or self.transport is None:
            return None
        if self.writing_paused:
            # The client does not read its answers; what it has read of them since the last sweep is progress.
            seen = (self.serial, -2, self.transport.get_write_buffer_size())
            stalled, limit = "reading", self.server.body_timeout_s
        elif not self.in_request:
            self.seen = None
            if self.last_active < idle_before:
                self.close_if_idle()
            return None
        elif self.pending:
            # Answers are owed: the client may rightly wait for them (or for its 100 Continue), and reading
            # may be paused by this side: the client's time starts once they are written.
            self.seen = None
            return None
        elif self.in_head:
            # However slowly the head trickles in, it is one stall: the header timeout is a total.
            seen = (self.serial, -1, 0)
            stalled, limit = "head", self.server.header_timeout_s
        else:
            seen = (self.serial, self.size, 0)
            stalled, limit = "body", self.server.body_timeout_s
        if seen != self.seen:
            self.seen = seen
            self.seen_at = now
            return None
        if now - self.seen_at < limit:
            return None
        if stalled == "reading":
            # Whatever is buffered for it would never leave.
            self.closed = True
            self.transport.abort()
        elif self.answered or self.broken:
            # Its answer is written already (a 413 whose body was being dropped): a second would be a stray.
            self.closed = True
            self.transport.close()
        elif stalled == "head":
            self._fail(408, f"the request line and headers were not complete within {limit:g} s")
        else:
            self._fail(408, f"no part of the request body came for {limit:g} s")
        return stalled

    def close_if_idle(self) -> None:
        if not self.pending and not self.in_request and self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True

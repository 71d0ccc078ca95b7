"""The model server's listening side: accepts connections on a bound socket, sweeps them, shuts down gracefully.

* At most ``max_connections`` connections per serving process: the one
  beyond gets 503 and is closed at once, and the log says so (at most one
  line per ``LOG_INTERVAL_S`` for each kind of event, with a count).
* One sweep over the connections, every quarter of the shortest of the
  keep-alive, header and body limits, closes idle connections and times out
  stalled requests (see :mod:`.http`): no timer per request.
* :meth:`HTTPServer.close` stops accepting, lets every request in progress
  finish and be answered (a stalled one times out), then closes the
  connections; those still busy after its timeout are aborted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import TYPE_CHECKING

from edge_runtime.serving.http import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    Connection,
    render,
)

if TYPE_CHECKING:
    from edge_runtime.serving.app import OIPApp

logger = logging.getLogger("edge_runtime.serving")

# The shortest time between two log lines about the same kind of event.
LOG_INTERVAL_S = 10.0


class _Notice:
    """A log line for what may happen a thousand times a second: the first at once, then at most one every
    ``LOG_INTERVAL_S`` with the count of those it stands for."""

    __slots__ = ("count", "level", "logged_at", "message")

    def __init__(self, level: int, message: str) -> None:
        self.level = level
        # One ``%d``: how many times it happened.
        self.message = message
        self.count = 0
        self.logged_at = float("-inf")

    def add(self, now: float, count: int = 1) -> None:
        """Count ``count`` more (0: only log what is counted, if it is time)."""
        self.count += count
        if now - self.logged_at >= LOG_INTERVAL_S:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Log what is counted, if anything, now."""
        if self.count:
            logger.log(self.level, self.message, self.count)
            self.count = 0
            self.logged_at = now


class HTTPServer:
    """Serves ``app`` on an already bound socket; :meth:`close` shuts it down gracefully."""

    def __init__(self, app: OIPApp, *, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        for name, value in (("keep_alive_s", keep_alive_s), ("header_timeout_s", header_timeout_s),
                            ("body_timeout_s", body_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()
        headers, body = app.error_answer(f"this server already holds {max_connections} connections, its limit")
        self.refusal = render(503, [*headers, (b"retry-after", b"1")], body, keep_alive=False)
        self.refused = _Notice(logging.WARNING, (
            f"refused %d connection(s): this serving process already holds {max_connections} connections, its limit; "
            f"raise it with edge-runtime's --max-connections (EDGEWISE_SERVE_MAX_CONNECTIONS) if these clients "
            f"are legitimate"))
        self.stall_notices = {
            "head": _Notice(logging.INFO, (
                f"closed %d connection(s) whose request line and headers were not complete within "
                f"{header_timeout_s:g} s (the header timeout): slow or stalled clients")),
            "body": _Notice(logging.INFO, (
                f"closed %d connection(s) whose request body stalled for {body_timeout_s:g} s (the body timeout): "
                f"slow or stalled clients")),
            "reading": _Notice(logging.INFO, (
                f"closed %d connection(s) whose client read nothing of its answers for {body_timeout_s:g} s "
                f"(the body timeout)")),
        }
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket) -> None:
        self._server = await self.loop.create_server(lambda: Connection(self), sock=sock)
        self._sweep()

    def _sweep(self) -> None:
        """Close the connections idle for ``keep_alive_s`` and time out stalled requests; again every quarter of
        the shortest limit.

        One timer for the server rather than one per connection re-armed at
        every request: a connection only notes when it was last active and
        counts its requests; the sweep remembers what it saw.
        """
        now = self.loop.time()
        before = now - self.keep_alive_s
        stalled = collections.Counter(connection.sweep(now, before) for connection in list(self.connections))
        for kind, notice in self.stall_notices.items():
            notice.add(now, stalled[kind])
        self.refused.add(now, 0)
        interval = min(self.keep_alive_s, self.header_timeout_s, self.body_timeout_s) / 4
        self._sweeper = self.loop.call_later(max(interval, 0.01), self._sweep)

    def connection_closed(self) -> None:
        if self.closing and not self.connections:
            self._all_closed.set()

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, answer every request in progress, close every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        try:
            await self._close_connections(timeout)
        finally:
            # Swept until here: a stalled request does not hold the stop up past its timeout.
            if self._sweeper is not None:
                self._sweeper.cancel()
            for notice in (*self.stall_notices.values(), self.refused):
                notice.flush(self.loop.time())
        if self._server is not None:
            await self._server.wait_closed()

    async def _close_connections(self, timeout: float) -> None:
        if self.connections:
            self._all_closed.clear()
            for connection in list(self.connections):
                connection.close_if_idle()
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except TimeoutError:
                logger.warning("closing %d connection(s) with requests still in progress", len(self.connections))
                for connection in list(self.connections):
                    if connection.transport is not None:
                        connection.transport.abort()

"""Running the model server on an asyncio loop: the agent's own, or a standalone one.

The HTTP is :mod:`.http` (httptools' parser, one write per answer, uvloop
when the loop is ours); the application is
:class:`~edge_runtime.serving.app.OIPApp`. The socket is bound here, so
that a port already in use is an exception naming it, and so that port 0
gives a free port whose number the handle reports.

With ``processes`` above 1 the node serves from that many processes on the
one port (:mod:`.workers`): this one, and workers that mirror its registry.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime.serving.app import DEFAULT_MAX_BODY_BYTES, OIPApp
from edge_runtime.serving.http import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
)
from edge_runtime.serving.http_server import HTTPServer
from edge_runtime.serving.registry import ModelRegistry, settle_heap

if TYPE_CHECKING:
    from edge_runtime.serving.workers import WorkerPool

BACKLOG = 2048


class ServerError(Exception):
    """The server could not start; the message says why."""


@dataclass
class ServerHandle:
    app: OIPApp
    host: str
    port: int
    _server: HTTPServer
    # The other processes serving on this port, if any.
    pool: WorkerPool | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting connections, finish the requests in progress, and return."""
        self.app.live = False
        try:
            if self.pool is not None:
                await asyncio.gather(self._server.close(), self.pool.close())
            else:
                await self._server.close()
        finally:
            self._stopped.set()

    async def wait(self) -> None:
        """Return when the server has stopped."""
        await self._stopped.wait()


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port``; with ``reuse_port``, one that other sockets of this user may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


async def run_server(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8000, *,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, app: OIPApp | None = None,
                     keep_alive_s: float = DEFAULT_KEEP_ALIVE_S, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                     body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                     processes: int = 1, reuse_port: bool = False, model_control: str = "none") -> ServerHandle:
    """Start serving ``registry`` on the running loop; returns once the port accepts connections.

    ``app`` serves instead of a plain :class:`OIPApp` of ``registry`` (a
    subclass with extra routes, say; workers build the same class, so it must
    live in an importable module); ``max_body_bytes`` is then the app's own.
    ``processes`` above 1 starts a :class:`~.workers.WorkerPool` of the rest,
    which join as soon as something serves. ``reuse_port`` is for a worker's
    own socket. ``model_control`` "explicit" lets clients load and unload
    through the repository extension (see :mod:`.extensions`; the app's own
    when ``app`` is given). ``header_timeout_s``, ``body_timeout_s`` and
    ``max_connections`` are the HTTP layer's limits (:mod:`.http`), each
    serving process with its own ``max_connections``.
    """
    if app is None:
        app = OIPApp(registry, max_body_bytes=max_body_bytes, model_control=model_control)
    # The HTTP layer's limits, the same in every serving process.
    limits: dict[str, Any] = {"keep_alive_s": keep_alive_s, "header_timeout_s": header_timeout_s,
                              "body_timeout_s": body_timeout_s, "max_connections": max_connections}
    if processes > 1:
        from edge_runtime.serving.workers import WorkerPool, app_path

        app_class = app_path(type(app))  # before anything listens: a class workers cannot import is refused
    if processes > 1 and port != 0:
        # Sockets that share a port do not see each other as a conflict: check
        # first that nobody else listens there, as a plain bind would.
        bind(host, port).close()
    # Before the socket is bound: a limit that is not one is refused without leaving a socket behind.
    try:
        server = HTTPServer(app, **limits)
    except ValueError as exc:
        raise ServerError(f"the model server did not start: {exc}") from exc
    sock = bind(host, port, reuse_port=reuse_port or processes > 1)
    handle = ServerHandle(app=app, host=host, port=await _listen(server, sock), _server=server)
    if processes > 1:
        handle.pool = WorkerPool(registry, processes - 1, host=host, port=handle.port, app_class=app_class,
                                 max_body_bytes=app.max_body_bytes, server_name=app.server_name, **limits)
        app.node_metrics = handle.pool.node_metrics
        # Workers send this process the requests only it can answer (the repository, statistics).
        handle.pool.http = app.answer
        app.extensions.refresh_peers = handle.pool.refresh_metrics
        handle.pool.start()
    return handle


async def _listen(server: HTTPServer, sock: socket.socket) -> int:
    """Start accepting on ``sock`` (closed if that fails); the port it listens on."""
    settle_heap()
    try:
        sock.listen(BACKLOG)
        await server.start(sock)
    except OSError as exc:
        sock.close()
        raise ServerError(f"the model server did not start: {exc}") from exc
    return int(sock.getsockname()[1])

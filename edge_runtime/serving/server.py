"""Running the model server on an asyncio loop: the agent's own, or a standalone one.

uvicorn with httptools (and uvloop when the loop is ours) carries the HTTP;
the application is :class:`~edge_runtime.serving.app.OIPApp`. The socket is
bound here rather than by uvicorn, so that a port already in use is an
exception naming it (uvicorn would exit the process), and so that port 0
gives a free port whose number the handle reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from edge_runtime.serving.app import DEFAULT_MAX_BODY_BYTES, OIPApp
from edge_runtime.serving.registry import ModelRegistry

STARTUP_TIMEOUT_S = 30.0


class ServerError(Exception):
    """The server could not start; the message says why."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process that embeds the server (the agent, serve_main) owns
        # SIGINT and SIGTERM and stops the server through its handle.
        yield


@dataclass
class ServerHandle:
    app: OIPApp
    host: str
    port: int
    _server: _Server
    _task: asyncio.Task[None]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting connections, finish the requests in progress, and return."""
        self.app.live = False
        self._server.should_exit = True
        await self._task

    async def wait(self) -> None:
        """Return when the server stops (by :meth:`stop` or by failing)."""
        await asyncio.shield(self._task)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


async def run_server(registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8000, *,
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, app: OIPApp | None = None) -> ServerHandle:
    """Start serving ``registry`` on the running loop; returns once the port accepts connections.

    ``app`` serves instead of a plain :class:`OIPApp` of ``registry`` (a
    subclass with extra routes, say); ``max_body_bytes`` is then the app's own.
    """
    if app is None:
        app = OIPApp(registry, max_body_bytes=max_body_bytes)
    sock = bind(host, port)
    # No proxy-headers middleware: clients reach the node directly, and it
    # would cost every request a header scan for X-Forwarded-For.
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", http="httptools",
                            timeout_keep_alive=30, server_header=False, proxy_headers=False)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="model-server")
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
    while not server.started:
        if task.done():
            exc = task.exception()
            sock.close()
            raise ServerError(f"the model server did not start: {exc!r}")
        if asyncio.get_running_loop().time() > deadline:
            server.should_exit = True
            raise ServerError(f"the model server did not start within {STARTUP_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.01)
    return ServerHandle(app=app, host=host, port=int(sock.getsockname()[1]), _server=server, _task=task)

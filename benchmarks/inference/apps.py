"""The benchmark's apps: the node's app with a no-op route, and a naive one without the batcher.

In a module of their own because the server's worker processes build the
same app class by module name (see ``edge_runtime.serving.workers``).
"""

from __future__ import annotations

import asyncio
import time

from edge_runtime.serving.answer import JSON_TYPE
from edge_runtime.serving.app import Answer, OIPApp, Reply
from edge_runtime.serving.batcher import ModelUnavailable
from edge_runtime.serving.request import HTTPError, parse_request
from edge_runtime.serving.tensors import Array


class WithNoop(OIPApp):
    def route(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, reply: Reply
              ) -> Answer | None:
        if path == "/noop":  # the body has been read, like any other request's
            return 200, JSON_TYPE, b"{}"
        return super().route(method, path, headers, body, reply)


class Naive(WithNoop):
    """One ``session.run`` per request in the registry's thread pool; nothing else differs."""

    def infer(self, name: str, version: str | None, headers: dict[bytes, bytes], body: bytes, reply: Reply) -> None:
        served = self._resolve(name, version)
        started = time.perf_counter()
        request, feeds, wanted = parse_request(served, body, headers)
        if served.batcher.closing:
            raise HTTPError(503, str(ModelUnavailable()))
        work = asyncio.get_running_loop().run_in_executor(self.registry.executor, served.model.run, feeds)

        def done(outputs: asyncio.Future[list[Array]]) -> None:
            outcome = outputs.exception() or outputs.result()
            reply(self._complete(outcome, served, request, wanted, started))

        work.add_done_callback(done)

"""The servers under test, each run as its own process by ``run.py``.

``python -m benchmarks.inference.server MODE MODEL_DIR PORT [MAX_BATCH_SIZE [INLINE_BELOW_MS]]``

* ``batched``: the node's model server exactly as ``edge-runtime serve``
  builds it (:class:`ModelRegistry` defaults, :func:`run_server`), plus a
  ``POST /noop`` route that reads the body and answers ``{}``: the floor that
  HTTP on this stack costs (the node's HTTP layer on httptools and uvloop,
  the app's routing and answer path).
* ``naive``: the same HTTP stack, the same parsing and answers, but no
  batcher: each request does its own ``session.run`` in the thread pool, as a
  straightforward server would.

It prints ``ready`` once the port accepts connections and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import uvloop

from edge_runtime.serving import ModelRegistry, run_server
from edge_runtime.serving.app import JSON_TYPE, Answer, HTTPError, OIPApp, Reply
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS, ModelUnavailable
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
        request, feeds, wanted = self._parse(served, body, headers)
        if served.batcher.closing:
            raise HTTPError(503, str(ModelUnavailable()))
        work = asyncio.get_running_loop().run_in_executor(self.registry.executor, served.model.run, feeds)

        def done(outputs: asyncio.Future[list[Array]]) -> None:
            outcome = outputs.exception() or outputs.result()
            reply(self._complete(outcome, served, request, wanted, started))

        work.add_done_callback(done)


async def serve(mode: str, model_dir: Path, port: int, max_batch_size: int, inline_below_ms: float) -> None:
    registry = ModelRegistry()
    for path in sorted(model_dir.glob("*.onnx")):
        status = await registry.load(path.stem, "1", path, max_batch_size=max_batch_size,
                                     inline_below_ms=inline_below_ms)
        if status.state != "serving":
            raise SystemExit(f"{path.name}: {status.error}")
    app = Naive(registry) if mode == "naive" else WithNoop(registry)
    await run_server(registry, "127.0.0.1", port, app=app)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    mode, model_dir, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    max_batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    inline_below_ms = float(sys.argv[5]) if len(sys.argv) > 5 else DEFAULT_INLINE_BELOW_MS
    if mode not in ("batched", "naive"):
        raise SystemExit(f"unknown mode {mode!r}")
    uvloop.run(serve(mode, model_dir, port, max_batch_size, inline_below_ms))


if __name__ == "__main__":
    main()

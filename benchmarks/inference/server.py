"""The servers under test, each run as its own process by ``run.py``.

``python -m benchmarks.inference.server MODE MODEL_DIR PORT [MAX_BATCH_SIZE [INLINE_BELOW_MS [PROCESSES]]]``

* ``batched``: the node's model server exactly as ``edge-runtime serve``
  builds it (:class:`ModelRegistry` defaults, :func:`run_server`, as many
  serving processes as the node would choose, or PROCESSES), plus a
  ``POST /noop`` route that reads the body and answers ``{}``: the floor that
  HTTP on this stack costs (the node's HTTP layer on httptools and uvloop,
  the app's routing and answer path).
* ``naive``: the same HTTP stack, the same parsing and answers, but no
  batcher: each request does its own ``session.run`` in the thread pool, as a
  straightforward server would.

The apps are in :mod:`.apps`. It prints ``ready`` and its number of
processes once every process accepts connections, and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop

from benchmarks.inference.apps import Naive, WithNoop
from edge_runtime.serving import ModelRegistry, run_server
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS
from edge_runtime.serving.workers import cpu_share, resolve_processes


async def serve(mode: str, model_dir: Path, port: int, max_batch_size: int, inline_below_ms: float,
                processes: int) -> None:
    registry = ModelRegistry(cpus=cpu_share(processes))
    for path in sorted(model_dir.glob("*.onnx")):
        status = await registry.load(path.stem, "1", path, max_batch_size=max_batch_size,
                                     inline_below_ms=inline_below_ms)
        if status.state != "serving":
            raise SystemExit(f"{path.name}: {status.error}")
    app = Naive(registry) if mode == "naive" else WithNoop(registry)
    handle = await run_server(registry, "127.0.0.1", port, app=app, processes=processes)
    if handle.pool is not None:
        await handle.pool.wait_serving()
    print("ready", processes, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    mode, model_dir, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    max_batch_size = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    inline_below_ms = float(sys.argv[5]) if len(sys.argv) > 5 else DEFAULT_INLINE_BELOW_MS
    processes = resolve_processes(int(sys.argv[6]) if len(sys.argv) > 6 else 0)
    if mode not in ("batched", "naive"):
        raise SystemExit(f"unknown mode {mode!r}")
    uvloop.run(serve(mode, model_dir, port, max_batch_size, inline_below_ms, processes))


if __name__ == "__main__":
    main()

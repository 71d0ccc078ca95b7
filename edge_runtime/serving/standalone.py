"""Serving a folder of ONNX models with no control plane (``edge-runtime serve``).

Every ``*.onnx`` file in the folder is served under its file name without
the suffix, as version ``"1"``. Files whose name is not a usable model name,
or that fail to load or smoke-test, are reported and skipped; the others
serve. SIGINT or SIGTERM stops the server after the requests in progress.
No hash or signature is checked here: the operator chose these files by
hand; models from the control plane go through :mod:`edge_runtime.models`.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_runtime.serving.app import DEFAULT_MAX_BODY_BYTES
from edge_runtime.serving.http import DEFAULT_MAX_CONNECTIONS
from edge_runtime.serving.loader import DEFAULT_PROVIDER_PRIORITY
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.serving.server import ServerError, ServerHandle, run_server
from edge_runtime.serving.workers import cpu_share, resolve_processes

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STANDALONE_VERSION = "1"


def serve_main(
    model_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 0.0,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    provider_priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
    instances: int = 0,
    processes: int = 0,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    model_control: str = "none",
    out: TextIO | None = None,
) -> int:
    """Serve every ``.onnx`` file in ``model_dir`` until SIGINT/SIGTERM; the process exit code.

    ``model_control`` "explicit" lets clients unload these models and load them
    again through the repository API (see :mod:`.extensions`).
    0 after a clean stop; 1 if no model could be loaded or the port cannot be
    used; 2 if ``model_dir`` is not a folder or holds no ``.onnx`` file.
    """
    stream = out or sys.stdout
    if not model_dir.is_dir():
        print(f"error: model folder {model_dir} does not exist or is not a folder", file=stream, flush=True)
        return 2
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".onnx" and p.is_file())
    if not files:
        print(f"error: no .onnx files in {model_dir}", file=stream, flush=True)
        return 2
    # A list of its own (not the default priority) is the only providers this server uses, as in _serve.
    only = list(provider_priority) if tuple(provider_priority) != DEFAULT_PROVIDER_PRIORITY else None
    try:
        processes = resolve_processes(processes, providers=only)
    except ValueError as exc:
        print(f"error: {exc}", file=stream, flush=True)
        return 2
    main = _serve(files, host, port, stream, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                  max_body_bytes=max_body_bytes, provider_priority=provider_priority, instances=instances,
                  processes=processes, max_connections=max_connections, model_control=model_control)
    try:
        import uvloop  # not on every platform: the faster loop where it is
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


async def _serve(files: list[Path], host: str, port: int, stream: TextIO, *, max_batch_size: int,
                 max_queue_delay_ms: float, max_body_bytes: int, provider_priority: Sequence[str],
                 instances: int, processes: int, max_connections: int, model_control: str) -> int:
    only = list(provider_priority) if tuple(provider_priority) != DEFAULT_PROVIDER_PRIORITY else None
    registry = ModelRegistry(provider_priority=provider_priority, instances=instances, cpus=cpu_share(processes),
                             providers_only=only)
    served = 0
    for path in files:
        name = path.stem
        if not NAME.match(name):
            print(f"skipped {path.name}: '{name}' is not a model name (letters, digits, '.', '_', '-')",
                  file=stream, flush=True)
            continue
        status = await registry.load(name, STANDALONE_VERSION, path, max_batch_size=max_batch_size,
                                     max_queue_delay_ms=max_queue_delay_ms)
        if status.state == "serving":
            served += 1
            print(f"loaded {name} on {status.provider} ({status.placement_text()})", file=stream, flush=True)
        else:
            registry.metrics.load_failed(name)
            print(f"skipped {path.name}: {status.error}", file=stream, flush=True)
    if not served:
        print("error: no model could be loaded", file=stream, flush=True)
        await registry.close()
        return 1
    try:
        handle = await run_server(registry, host, port, max_body_bytes=max_body_bytes, processes=processes,
                                  max_connections=max_connections, model_control=model_control)
    except ServerError as exc:
        print(f"error: {exc}", file=stream, flush=True)
        await registry.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving {served} model(s) on {handle.url} (Open Inference Protocol v2)", file=stream, flush=True)
    joined = asyncio.ensure_future(_report_workers(handle, stream))
    waiter = asyncio.ensure_future(handle.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    joined.cancel()
    if not waiter.done():
        await handle.stop()
    await registry.close()
    print("stopped", file=stream, flush=True)
    return 0


async def _report_workers(handle: ServerHandle, stream: TextIO) -> None:
    """Say when every other serving process has joined (the first serves meanwhile)."""
    pool = handle.pool
    if pool is None:
        return
    await pool.wait_serving(timeout=None)
    print(f"all {len(pool.workers) + 1} serving processes are up", file=stream, flush=True)

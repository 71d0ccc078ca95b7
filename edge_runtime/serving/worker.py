"""A serving worker process: ``python -m edge_runtime.serving.worker FD SLOT`` (started by :mod:`.workers`).

FD is its end of the control pipe to the first process; SLOT names it in
logs. It loads what it is told, listens on the node's port when told, and
exits when told to stop or when the pipe closes (the first process ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from edge_runtime.serving.registry import LoadSpec, ModelRegistry
from edge_runtime.serving.server import ServerHandle, run_server
from edge_runtime.serving.workers import Channel, WorkerError

logger = logging.getLogger("edge_runtime.serving")


class Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.registry: ModelRegistry | None = None
        self.config: dict[str, Any] = {}
        self.handle: ServerHandle | None = None
        self.channel: Channel | None = None
        self.done = asyncio.Event()

    async def run(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        self.channel = await Channel.over(sock, self.answer)
        closed = asyncio.ensure_future(self.channel.closed.wait())
        done = asyncio.ensure_future(self.done.wait())
        await asyncio.wait({closed, done}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        done.cancel()
        await self.stop()
        await self.channel.aclose()

    async def stop(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            await handle.stop()
        if self.registry is not None:
            registry, self.registry = self.registry, None
            await registry.close()

    def _registry(self) -> ModelRegistry:
        if self.registry is None:
            raise WorkerError("not configured")
        return self.registry

    async def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "configure":
            self.config = message
            for entry in reversed(message["sys_path"]):
                if entry not in sys.path:
                    sys.path.insert(0, entry)
            logging.getLogger("edge_runtime").setLevel(int(message["log_level"]))
            self.registry = ModelRegistry(provider_priority=message["provider_priority"],
                                          intra_op_threads=message["intra_op_threads"],
                                          instances=message["instances"], cpus=message["cpus"],
                                          providers_only=message.get("providers_only"))
            return {}
        if op == "load":
            spec = LoadSpec.from_json(message["spec"])
            if spec.sha256:
                # The first process checked this file when it loaded it; it may have changed on disk since.
                found = await asyncio.to_thread(_file_sha256, Path(spec.path))
                if found != spec.sha256:
                    raise WorkerError(f"model {spec.name} version {spec.version}: {spec.path} has sha256 "
                                      f"{found}, not {spec.sha256}; not loaded")
            status = await self._registry().load(spec.name, spec.version, Path(spec.path), **spec.load_options(),
                                                 retire_others=bool(message["retire_others"]))
            return {"status": status.model_dump(mode="json")}
        if op == "unload":
            await self._registry().unload(message["name"], message.get("version"))
            return {}
        if op == "listen":
            return {"port": await self.listen(message["host"], int(message["port"]))}
        if op == "metrics":
            return {"series": self._registry().metrics.export()}
        if op == "stop":
            await self.stop()
            self.done.set()
            return {}
        raise WorkerError(f"unknown request {op!r}")

    async def listen(self, host: str, port: int) -> int:
        module, _, name = self.config["app_class"].partition(":")
        app_class = getattr(importlib.import_module(module), name)
        registry = self._registry()
        app = app_class(registry, max_body_bytes=self.config["max_body_bytes"],
                        server_name=self.config["server_name"])
        channel = self.channel
        assert channel is not None

        async def node_metrics() -> str:
            answer = await channel.call("node_metrics", timeout=10.0)
            return str(answer["text"])

        async def first_process(method: str, path: str, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            answer = await channel.call("http", method=method, path=path, body=body.decode("latin-1"))
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer["headers"]]
            return int(answer["status"]), headers, str(answer["body"]).encode("latin-1")

        app.node_metrics = node_metrics
        extensions = getattr(app, "extensions", None)
        if extensions is not None:
            extensions.forward = first_process
        limits = {name: self.config[name] for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s",
                                                      "max_connections")}
        self.handle = await run_server(registry, host, port, app=app, reuse_port=True, **limits)
        return self.handle.port


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise WorkerError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, slot = int(args[0]), int(args[1])
    from edge_runtime.logs import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"%(asctime)s %(levelname)s %(name)s [serving worker {slot}]: %(message)s"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    # The first process stops its workers itself (an interrupt reaches the whole process group, and
    # systemd signals every process of the unit): a worker finishes its requests and exits when told,
    # or when the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = Worker(slot)
    try:
        import uvloop  # not on every platform: the faster loop where it is
    except ImportError:
        asyncio.run(worker.run(fd))
    else:
        uvloop.run(worker.run(fd))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

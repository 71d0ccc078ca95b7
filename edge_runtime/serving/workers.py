"""Serving one node's models from several processes on one port.

The model server's hot path (HTTP, parsing, batching, answers) is Python on
one event loop, so one process serves small models only as fast as one core
runs that loop: the model itself is a few microseconds of each request. A
node with CPUs to spare therefore serves from several processes. The first
(the agent, or ``edge-runtime serve``) keeps the :class:`ModelRegistry` that
decides what serves; each other process is a *worker*
(``python -m edge_runtime.serving.worker``) with a registry of its own that
mirrors it, and its own listening socket on the same port. With
``SO_REUSEPORT`` the kernel shares new connections out among the sockets.

* **Same versions everywhere.** The first process's registry tells the pool
  of every load that succeeded and every unload (:class:`~.registry.Mirror`),
  after it has made the change itself; the pool makes the same change in each
  worker and waits for it. A worker that cannot make it is stopped and started
  again, and a worker that starts loads what serves now before it listens, so
  no connection reaches a process that lacks a model the node serves. While
  a swap is under way a request may still reach the old version in one
  process: it is answered by it, as in one process during a swap.
* **One repository.** The repository extension, the statistics and the
  readiness of a model that does not serve are answered by the first
  process, whichever process the request reaches (the worker passes it on).
* **One /metrics.** Whichever process a scrape reaches asks the first one,
  which adds up every process's figures (:class:`~.metrics.Metrics` peers).
  The node's telemetry and its reported per-model counters read the same sums,
  refreshed every ``REFRESH_S``.
* **CPUs shared out.** Each process gets ``usable CPUs / processes`` for its
  models' instances and threads (see :func:`cpu_share`).
* **Lifetimes.** Workers start when the first model serves, so a node that
  serves nothing runs no extra process. A worker ends when its pipe to the
  first process closes, so it never outlives it, even one killed outright. A
  worker that dies is started again after a back-off.

The control pipe carries one JSON object a line: requests
``{"id": n, "op": ...}`` both ways, answers ``{"re": n, "ok": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge_runtime.serving.loader import CPU, available_providers, usable_cpus
from edge_runtime.serving.registry import LoadSpec, ModelRegistry

logger = logging.getLogger("edge_runtime.serving")

# Most processes chosen automatically; past this, memory (each holds every model) outweighs the gain.
MAX_AUTO_PROCESSES = 4
# Below this much memory a node serves from one process.
MIN_AUTO_MEMORY_BYTES = 2 * 1024**3
REFRESH_S = 1.0
RESTART_FIRST_S = 1.0
RESTART_MOST_S = 30.0
# A worker that ran this long restarts after the shortest back-off again.
STABLE_S = 60.0
CALL_TIMEOUT_S = 600.0
METRICS_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 15.0
LINE_LIMIT = 256 * 1024 * 1024
# Providers that are not a device of their own.
_NOT_ACCELERATORS = {CPU, "AzureExecutionProvider"}


class WorkerError(Exception):
    """A worker did not do what it was asked; the message says what and why."""


def reuse_port_supported() -> bool:
    """Whether this system shares one port's connections among several sockets (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def auto_processes(providers: Sequence[str] | None = None) -> int:
    """How many processes serve models when the node does not say.

    One where the kernel cannot share a port out, where an accelerator is
    present (a model on it is best loaded once: each process would hold its
    own copy in device memory), or where memory is short; otherwise one per
    usable CPU, at most ``MAX_AUTO_PROCESSES``. ``providers``: the list a node
    was given (``--providers``), which it uses and no other; only an
    accelerator on it counts, so a node told to use ``CPUExecutionProvider``
    alone gets the CPU count even where onnxruntime has a GPU.
    """
    if not reuse_port_supported():
        return 1
    usable = [p for p in available_providers() if not providers or p in providers]
    if any(p not in _NOT_ACCELERATORS for p in usable):
        return 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    if memory and memory < MIN_AUTO_MEMORY_BYTES:
        return 1
    return max(1, min(usable_cpus(), MAX_AUTO_PROCESSES))


def resolve_processes(requested: int, *, providers: Sequence[str] | None = None) -> int:
    """``requested`` (0: :func:`auto_processes` for ``providers``) checked against what this system can do.

    Raises ValueError.
    """
    if requested < 0:
        raise ValueError("the number of serving processes must not be negative")
    if requested == 0:
        return auto_processes(providers)
    if requested > 1 and not reuse_port_supported():
        raise ValueError(f"serving from {requested} processes needs SO_REUSEPORT port sharing (Linux); "
                         "use 1 on this system")
    return requested


def cpu_share(processes: int) -> int:
    """The CPUs each of ``processes`` serving processes plans its models' threads for (0: all of them)."""
    if processes <= 1:
        return 0
    return max(1, usable_cpus() // processes)


def app_path(app_class: type) -> str:
    """``module:Class`` of an app class, for a worker to import."""
    module = app_class.__module__
    if module == "__main__":
        raise ValueError(f"{app_class.__qualname__} is defined in __main__; workers import the app class "
                         "by module name, so define it in an importable module")
    return f"{module}:{app_class.__qualname__}"


# The control pipe ------------------------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Channel:
    """Requests and answers both ways over one stream, a JSON object a line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def over(cls, sock: socket.socket, handler: Handler) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer, handler)

    async def call(self, op: str, timeout: float = CALL_TIMEOUT_S, **arguments: Any) -> dict[str, Any]:
        """Send a request and return its answer; raises WorkerError if it failed or the pipe closed."""
        if self.closed.is_set():
            raise WorkerError("the pipe to the other process is closed")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            self._send({"id": ident, "op": op, **arguments})
            answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise WorkerError(f"no answer to {op} within {timeout:g} s") from None
        finally:
            self._waiting.pop(ident, None)
        if not answer.get("ok"):
            raise WorkerError(str(answer.get("error") or f"{op} failed"))
        return answer

    def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(orjson.dumps(message) + b"\n")

    async def _read(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = orjson.loads(line)
                if "re" in message:
                    future = self._waiting.get(message["re"])
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    task = asyncio.get_running_loop().create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            logger.warning("the pipe between serving processes broke: %s", exc)
        finally:
            self.closed.set()
            for future in self._waiting.values():
                if not future.done():
                    future.set_result({"ok": False, "error": "the other process closed the pipe"})

    async def _answer(self, message: dict[str, Any]) -> None:
        try:
            answer = {"ok": True, **await self._handler(message)}
        except Exception as exc:  # noqa: BLE001 - the asker gets the reason, this side carries on
            answer = {"ok": False, "error": str(exc) or type(exc).__name__}
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._send({"re": message.get("id"), **answer})

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading


# The first process's side --------------------------------------------------------------------------


@dataclass
class _Worker:
    slot: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    # Changes reach a worker in the order they were made: each holds this lock while it is sent.
    ops: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Changes made from now on must be sent to it (it has read what serves, or is about to).
    mirrored: bool = False
    # It listens: connections reach it.
    serving: bool = False
    started: float = 0.0


class WorkerPool:
    """The other processes serving this node's models, kept the same as ``registry`` (its mirror)."""

    def __init__(self, registry: ModelRegistry, workers: int, *, host: str, port: int, app_class: str,
                 max_body_bytes: int, keep_alive_s: float, server_name: str, header_timeout_s: float,
                 body_timeout_s: float, max_connections: int) -> None:
        if workers < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.registry = registry
        self.host = host
        self.port = port
        self._config: dict[str, Any] = {
            "app_class": app_class, "max_body_bytes": max_body_bytes, "keep_alive_s": keep_alive_s,
            "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
            "max_connections": max_connections,
            "server_name": server_name, "provider_priority": list(registry.provider_priority),
            "providers_only": list(registry.providers_only) if registry.providers_only is not None else None,
            "intra_op_threads": registry.intra_op_threads, "instances": registry.instances,
            "cpus": registry.cpus, "sys_path": [p for p in sys.path if p],
            "log_level": logging.getLogger("edge_runtime").getEffectiveLevel(),
        }
        self.workers = [_Worker(slot=i + 1) for i in range(workers)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._refresher: asyncio.Task[None] | None = None
        self._wanted = asyncio.Event()
        self.closing = False
        # This process's answer to a request a worker passes on (set by run_server: the app's).
        self.http: Callable[[str, str, bytes], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]] | None = None
        registry.mirror = self

    def start(self) -> None:
        """Supervise the workers; they start once something serves (at once if something does)."""
        loop = asyncio.get_running_loop()
        self._supervisors = [loop.create_task(self._supervise(w)) for w in self.workers]
        self._refresher = loop.create_task(self._refresh_loop())
        if self.registry.loaded():
            self._wanted.set()

    @property
    def serving(self) -> int:
        """Workers whose socket takes connections now."""
        return sum(1 for w in self.workers if w.serving)

    async def wait_serving(self, count: int | None = None, timeout: float | None = 60.0) -> None:
        """Return once ``count`` (default: all) workers serve; raises TimeoutError (None: waits for good)."""
        wanted = len(self.workers) if count is None else count
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.serving < wanted:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.serving} of {wanted} serving workers up after {timeout:g} s")
            await asyncio.sleep(0.05)

    # the mirror ----------------------------------------------------------------------------------

    async def load(self, spec: LoadSpec, retire_others: bool) -> None:
        self._wanted.set()
        await self._everywhere("load", spec=spec.to_json(), retire_others=retire_others)

    async def unload(self, name: str, version: str | None) -> None:
        await self._everywhere("unload", name=name, version=version)

    async def _everywhere(self, op: str, **arguments: Any) -> None:
        targets = [w for w in self.workers if w.mirrored]
        if targets:
            await asyncio.gather(*(self._send_change(w, op, arguments) for w in targets))

    async def _send_change(self, worker: _Worker, op: str, arguments: dict[str, Any]) -> None:
        async with worker.ops:
            if not worker.mirrored or worker.channel is None:
                return  # it ended meanwhile; when it starts again it reads what serves then
            try:
                answer = await worker.channel.call(op, **arguments)
                if op == "load" and answer["status"]["state"] != "serving":
                    raise WorkerError(answer["status"].get("error") or "the load failed")
            except WorkerError as exc:
                logger.error("serving worker %d could not %s as this process did (%s); restarting it",
                             worker.slot, op, exc)
                self._end(worker)

    # the node's metrics -----------------------------------------------------------------------------

    async def refresh_metrics(self) -> None:
        """Read every serving worker's figures now (a worker that does not answer keeps its last ones)."""
        async def one(worker: _Worker) -> None:
            if worker.channel is None:
                return
            try:
                answer = await worker.channel.call("metrics", timeout=METRICS_TIMEOUT_S)
            except WorkerError as exc:
                logger.warning("serving worker %d sent no metrics: %s", worker.slot, exc)
                return
            if worker.serving:
                self.registry.metrics.set_peer(worker.slot, answer["series"])

        await asyncio.gather(*(one(w) for w in self.workers if w.serving))

    async def node_metrics(self) -> str:
        """The whole node's /metrics text, fresh."""
        await self.refresh_metrics()
        return self.registry.metrics.render()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            with contextlib.suppress(Exception):
                await self.refresh_metrics()

    # lifetimes ------------------------------------------------------------------------------------

    async def _supervise(self, worker: _Worker) -> None:
        await self._wanted.wait()
        delay = RESTART_FIRST_S
        while not self.closing:
            try:
                await self._run(worker)
            except (OSError, WorkerError) as exc:
                logger.error("serving worker %d: %s", worker.slot, exc)
            finally:
                self._end(worker)  # kills the process if it still runs
                if worker.process is not None:
                    await worker.process.wait()
                    worker.process = None
                if worker.channel is not None:
                    await worker.channel.aclose()
                    worker.channel = None
            if self.closing:
                return
            if time.monotonic() - worker.started > STABLE_S:
                delay = RESTART_FIRST_S
            logger.warning("serving worker %d ended; starting it again in %.0f s", worker.slot, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MOST_S)

    async def _run(self, worker: _Worker) -> None:
        """Start one worker, make it serve what serves here, and return when it ends."""
        ours, theirs = socket.socketpair()
        worker.started = time.monotonic()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_runtime.serving.worker", str(theirs.fileno()), str(worker.slot),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        channel = worker.channel = await Channel.over(ours, self._answer)
        async with worker.ops:
            await channel.call("configure", **self._config)
            # From here every change is sent to it too, after what serves now (the lock keeps the order).
            worker.mirrored = True
            for spec in self.registry.replay():
                answer = await channel.call("load", spec=spec.to_json(), retire_others=False)
                if answer["status"]["state"] != "serving":
                    raise WorkerError(f"it could not load model {spec.name} version {spec.version}: "
                                      f"{answer['status'].get('error')}")
            await channel.call("listen", host=self.host, port=self.port)
            worker.serving = True
        logger.info("serving worker %d (pid %d) serves on port %d", worker.slot, worker.process.pid, self.port)
        await channel.closed.wait()

    def _end(self, worker: _Worker) -> None:
        """Stop sending it changes and counting it as serving; keep its figures; make its process end."""
        worker.mirrored = worker.serving = False
        self.registry.metrics.retire_peer(worker.slot)
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("op") == "node_metrics":
            return {"text": await self.node_metrics()}
        if message.get("op") == "http" and self.http is not None:
            # Bodies travel as latin-1 text: every byte is one character, both ways.
            status, headers, body = await self.http(str(message["method"]), str(message["path"]),
                                                    str(message["body"]).encode("latin-1"))
            return {"status": status, "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
                    "body": body.decode("latin-1")}
        raise WorkerError(f"unknown request {message.get('op')!r}")

    async def close(self) -> None:
        """Stop every worker: each finishes the requests it has, then exits."""
        self.closing = True
        self._wanted.set()
        if self._refresher is not None:
            self._refresher.cancel()

        async def stop(worker: _Worker) -> None:
            worker.mirrored = worker.serving = False
            if worker.channel is not None and worker.process is not None:
                with contextlib.suppress(WorkerError):
                    await worker.channel.call("stop", timeout=STOP_TIMEOUT_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT_S)

        await asyncio.gather(*(stop(w) for w in self.workers))
        # A supervisor ends its worker on the way out: kills one that did not stop, keeps its figures.
        for task in self._supervisors:
            task.cancel()
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.registry.mirror = None

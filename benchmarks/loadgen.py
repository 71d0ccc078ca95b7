"""A closed-loop load generator: a fixed number of requests in flight.

``closed_loop`` keeps ``concurrency`` requests outstanding for a warm-up and
then a measured window. A request counts in the window when it *completes*
inside it, so throughput is completions per second of window; latency is
the time from issuing a request to having handled its answer (for a node:
parsed and, when present, its desired state verified). No new request starts
after the window closes; those still in flight are awaited but not counted.

``each_once`` runs one request per item with bounded concurrency (enrolling
a fleet, a first round of syncs) and measures it the same way.

Latencies are client-side, so they include the load generator's own time:
``client_cpu`` (fraction of one core) says how busy it was. When it nears
1.0 the client, not the server, sets the pace.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class RequestFailed(Exception):
    """A request got an answer a real node would treat as a failure; ``kind`` groups them."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary_ms(latencies_s: list[float]) -> dict[str, float]:
    values = sorted(latencies_s)
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "p50": round(percentile(values, 50) * 1000, 3),
        "p90": round(percentile(values, 90) * 1000, 3),
        "p99": round(percentile(values, 99) * 1000, 3),
        "max": round(values[-1] * 1000, 3),
        "mean": round(sum(values) / len(values) * 1000, 3),
    }


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    duration_s: float
    requests: int
    throughput_rps: float
    latency_ms: dict[str, float]
    # Failures that completed inside the window, and in the whole phase (warm-up included).
    errors: int
    errors_total: int
    error_kinds: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    client_cpu: float = 0.0
    server_cpu: float | None = None
    # Requests tried a second time after a transport error (setup phases only).
    retried: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.errors_total = 0
        self.kinds: Counter[str] = Counter()
        self.first_error = ""

    async def call(self, request: Callable[[], Awaitable[None]], *, counts: Callable[[float], bool]) -> None:
        t0 = time.perf_counter()
        try:
            await request()
        except (RequestFailed, httpx.HTTPError) as exc:
            t1 = time.perf_counter()
            kind = exc.kind if isinstance(exc, RequestFailed) else type(exc).__name__
            self.errors_total += 1
            self.first_error = self.first_error or str(exc) or kind
            if counts(t1):
                self.errors += 1
                self.kinds[kind] += 1
            return
        t1 = time.perf_counter()
        if counts(t1):
            self.latencies.append(t1 - t0)

    def as_parts(self) -> dict[str, Any]:
        """What another process needs to merge this recorder into its own (:meth:`merge`)."""
        return {"latencies": self.latencies, "errors": self.errors, "errors_total": self.errors_total,
                "kinds": dict(self.kinds), "first_error": self.first_error}

    def merge(self, parts: dict[str, Any]) -> None:
        self.latencies.extend(parts["latencies"])
        self.errors += parts["errors"]
        self.errors_total += parts["errors_total"]
        self.kinds.update(parts["kinds"])
        self.first_error = self.first_error or parts["first_error"]

    def result(self, name: str, concurrency: int, *, duration_s: float, seconds: float, client_cpu: float,
               server_cpu: float | None = None) -> PhaseResult:
        """The phase's figures: throughput is what counted over ``seconds``; ``duration_s`` is reported."""
        return PhaseResult(
            name=name,
            concurrency=concurrency,
            duration_s=duration_s,
            requests=len(self.latencies),
            throughput_rps=round(len(self.latencies) / seconds, 2),
            latency_ms=latency_summary_ms(self.latencies),
            errors=self.errors,
            errors_total=self.errors_total,
            error_kinds=dict(self.kinds),
            first_error=self.first_error,
            client_cpu=client_cpu,
            server_cpu=server_cpu,
        )


async def closed_loop(
    name: str,
    request: Callable[[], Awaitable[None]],
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    server_cpu: Callable[[], float] | None = None,
) -> PhaseResult:
    rec = Recorder()
    start = time.perf_counter()
    window_start = start + warmup
    window_end = window_start + duration
    cpu: dict[str, float] = {}

    def in_window(t: float) -> bool:
        return window_start <= t <= window_end

    async def worker() -> None:
        while time.perf_counter() < window_end:
            await rec.call(request, counts=in_window)

    async def sample_cpu() -> None:
        # Snapshots at the window's edges, taken on the same loop as the requests.
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        cpu["client0"], cpu["server0"] = time.process_time(), server_cpu() if server_cpu else 0.0
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        cpu["client1"], cpu["server1"] = time.process_time(), server_cpu() if server_cpu else 0.0

    await asyncio.gather(sample_cpu(), *(worker() for _ in range(concurrency)))
    return rec.result(
        name, concurrency, duration_s=duration, seconds=duration,
        client_cpu=round((cpu["client1"] - cpu["client0"]) / duration, 3),
        server_cpu=round((cpu["server1"] - cpu["server0"]) / duration, 3) if server_cpu else None,
    )


async def closed_loop_between(request: Callable[[], Awaitable[None]], *, concurrency: int, window_start: float,
                              window_end: float) -> tuple[Recorder, float]:
    """:func:`closed_loop` between two wall-clock times (``time.time()``), so that several processes measure
    one window: their recorder, and the process's CPU seconds inside the window."""
    rec = Recorder()
    cpu: dict[str, float] = {}

    def in_window(t: float) -> bool:
        return window_start <= t <= window_end

    async def worker() -> None:
        while time.time() < window_end:
            await rec.call(request, counts=lambda _t: in_window(time.time()))

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, window_start - time.time()))
        cpu["0"] = time.process_time()
        await asyncio.sleep(max(0.0, window_end - time.time()))
        cpu["1"] = time.process_time()

    await asyncio.gather(sample_cpu(), *(worker() for _ in range(concurrency)))
    return rec, cpu["1"] - cpu["0"]


async def each_once(
    name: str, items: Iterable[T], request: Callable[[T], Awaitable[None]], *, concurrency: int
) -> PhaseResult:
    """One ``request(item)`` per item, at most ``concurrency`` at a time."""
    rec = Recorder()
    queue: asyncio.Queue[T] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    total = queue.qsize()

    async def worker() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            await rec.call(lambda: request(item), counts=lambda t: True)  # noqa: B023 - awaited at once

    start, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))
    elapsed = max(time.perf_counter() - start, 1e-9)
    return rec.result(name, min(concurrency, total), duration_s=round(elapsed, 3), seconds=elapsed,
                      client_cpu=round((time.process_time() - cpu0) / elapsed, 3))

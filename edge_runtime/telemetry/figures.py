"""Telemetry figures: the machine's CPU, memory and disk, and each model version's figures over an interval."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_runtime.protocol import (
    ModelTelemetry,
    NodeResources,
)
from edge_runtime.serving.metrics import SeriesReading

logger = logging.getLogger("edge_runtime.telemetry")

# A point carries at most this many model series (the protocol's limit).
MAX_MODEL_SERIES = 200

ReadModels = Callable[[], Sequence[SeriesReading]]


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram (per-bucket counts, +Inf last), linear within its bucket.

    None for an empty histogram. Observations in the +Inf bucket count as
    the highest finite bound: the histogram cannot tell more.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be between 0 and 1, not {q}")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else None
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            upper = float(bounds[i])
            return lower + (upper - lower) * max(0.0, rank - cumulative) / count
        cumulative += count
    return float(bounds[-1]) if bounds else None


def _delta(now: int, before: int) -> int:
    # A counter that went back was reset (a new process): all of it is new.
    return now - before if now >= before else now


class ModelSampler:
    """Per model version figures over the interval since the previous sample."""

    def __init__(self, read: ReadModels) -> None:
        self.read = read
        self._previous: dict[tuple[str, str], SeriesReading] = {}

    def sample(self) -> list[ModelTelemetry]:
        try:
            readings = list(self.read())
        except Exception as exc:  # noqa: BLE001 - figures that fail must not stop the node's telemetry
            logger.error("cannot read model metrics: %s", exc)
            return []
        out: list[ModelTelemetry] = []
        for r in readings:
            key = (r.model, r.version)
            before = self._previous.get(key)
            self._previous[key] = r
            requests = _delta(r.requests, before.requests if before else 0)
            errors = _delta(r.errors, before.errors if before else 0)
            batches = _delta(r.batches, before.batches if before else 0)
            counts = list(r.latency_counts)
            if before is not None and len(before.latency_counts) == len(counts):
                diffs = [a - b for a, b in zip(counts, before.latency_counts, strict=True)]
                if min(diffs, default=0) >= 0:
                    counts = diffs
            batch_sum = r.batch_size_sum - (before.batch_size_sum if before else 0.0)
            if batch_sum < 0:
                batch_sum = r.batch_size_sum
            p50 = histogram_quantile(0.5, r.latency_bounds, counts)
            p95 = histogram_quantile(0.95, r.latency_bounds, counts)
            out.append(ModelTelemetry(
                model=r.model[:100], version=r.version[:50], requests=requests, errors=errors,
                latency_p50_ms=None if p50 is None else round(p50 * 1000, 3),
                latency_p95_ms=None if p95 is None else round(p95 * 1000, 3),
                batches=batches, batch_size_mean=round(batch_sum / batches, 3) if batches else None,
                queue_depth=max(0, r.queue_depth),
            ))
        # The busiest first, should there be more series than a point may carry.
        out.sort(key=lambda m: (-m.requests, m.model, m.version))
        return out[:MAX_MODEL_SERIES]


def _read_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, or None without /proc."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def _read_meminfo() -> tuple[float, float]:
    """(used, total) MiB from /proc/meminfo; zeros without it."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    info[name] = int(parts[0])
    except (OSError, ValueError):
        return 0.0, 0.0
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return round((total - available) / 1024, 1), round(total / 1024, 1)


class ResourceSampler:
    """The machine's CPU, memory and disk; CPU is the busy share since the previous sample."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self._cpu = _read_cpu_ticks()

    def sample(self, *, inference_queue_depth: int = 0, telemetry_backlog: int = 0) -> NodeResources:
        cpu_percent = 0.0
        now = _read_cpu_ticks()
        if now is not None and self._cpu is not None:
            busy, total = now[0] - self._cpu[0], now[1] - self._cpu[1]
            if total > 0:
                cpu_percent = min(100.0, max(0.0, 100.0 * busy / total))
        self._cpu = now
        used_mb, total_mb = _read_meminfo()
        disk_used = disk_total = 0.0
        with contextlib.suppress(OSError):
            st = os.statvfs(self.disk_path)
            disk_total = st.f_blocks * st.f_frsize / 2**20
            disk_used = (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20
        load1 = 0.0
        with contextlib.suppress(OSError, AttributeError):
            load1 = os.getloadavg()[0]
        return NodeResources(
            cpu_percent=round(cpu_percent, 1), load1=round(max(0.0, load1), 2),
            memory_used_mb=max(0.0, used_mb), memory_total_mb=total_mb,
            disk_used_mb=round(disk_used, 1), disk_total_mb=round(disk_total, 1),
            inference_queue_depth=max(0, inference_queue_depth), telemetry_backlog=max(0, telemetry_backlog),
        )

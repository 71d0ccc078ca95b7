"""Prometheus metrics of the model server, in the text exposition format (0.0.4).

Written here rather than with ``prometheus_client``: the server needs five
metric families with two labels, updated only from the event loop thread (so
no locks), and a site installs one dependency fewer. The format is the plain
text one every Prometheus scraper reads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        # One slot per bucket plus +Inf.
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def add(self, counts: list[int], total: float) -> None:
        """Add another process's figures for the same buckets."""
        for i, n in enumerate(counts[:len(self.counts)]):
            self.counts[i] += n
        self.total += total
        self.count += sum(counts)


@dataclass
class ModelMetrics:
    """The series of one model version."""

    requests: int = 0
    errors: int = 0
    inferences: int = 0
    batches: int = 0
    queue_depth: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def export(self) -> list[Any]:
        """The figures as plain JSON values, for another process to add up (see :meth:`add`)."""
        return [self.requests, self.errors, self.inferences, self.batches, self.queue_depth,
                self.latency.counts, self.latency.total, self.batch_size.counts, self.batch_size.total]

    def add(self, exported: list[Any]) -> None:
        requests, errors, inferences, batches, queue_depth, latency, latency_total, sizes, sizes_total = exported
        self.requests += int(requests)
        self.errors += int(errors)
        self.inferences += int(inferences)
        self.batches += int(batches)
        self.queue_depth += int(queue_depth)
        self.latency.add([int(n) for n in latency], float(latency_total))
        self.batch_size.add([int(n) for n in sizes], float(sizes_total))

# One process's series: [[model, version, ModelMetrics.export()], ...].
Exported = list[list[Any]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class Metrics:
    """Every model version's series, kept after a version is unloaded so counters never go back."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], ModelMetrics] = {}
        # Other processes serving the same node: their latest figures, and what ended ones left.
        self.peers: dict[Any, Exported] = {}
        self.retired: dict[tuple[str, str], ModelMetrics] = {}

    def export(self) -> Exported:
        """This process's own series, for the process that adds the node's up."""
        # A copy of the items: the loop that adds series may be in another thread's hands.
        return [[model, version, m.export()] for (model, version), m in list(self._series.items())]

    def set_peer(self, key: Any, exported: Exported) -> None:
        self.peers[key] = exported

    def retire_peer(self, key: Any) -> None:
        """A peer ended: keep its last figures for good."""
        exported = self.peers.pop(key, None)
        for model, version, figures in exported or ():
            self.retired.setdefault((model, version), ModelMetrics()).add(figures)

    def combined(self, only: tuple[str, str] | None = None) -> dict[tuple[str, str], ModelMetrics]:
        """Every series of the node (or ``only`` that one): this process's own plus its peers'.

        New objects when there are peers; this process's own when there are none.
        """
        if not self.peers and not self.retired:
            return self._series
        total: dict[tuple[str, str], ModelMetrics] = {}
        sources: list[Exported] = [self.export(), *self.peers.values(),
                                   [[m, v, s.export()] for (m, v), s in self.retired.items()]]
        for exported in sources:
            for model, version, figures in exported:
                if only is None or (model, version) == only:
                    total.setdefault((model, version), ModelMetrics()).add(figures)
        return total

    def of(self, model: str, version: str) -> ModelMetrics:
        key = (model, version)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = ModelMetrics()
        return series

    def snapshot(self, model: str, version: str) -> tuple[int, int, tuple[float, ...], tuple[int, ...], float] | None:
        """Read-only copy of one version's (requests, errors, latency bounds, latency counts, latency sum).

        None if that version never served here. Creates no series.
        """
        series = self.combined(only=(model, version)).get((model, version))
        if series is None:
            return None
        latency = series.latency
        return series.requests, series.errors, latency.buckets, tuple(latency.counts), latency.total

    def render(self) -> str:
        lines: list[str] = []
        items = sorted(self.combined().items())

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        def labels(model: str, version: str, extra: str = "") -> str:
            base = f'model="{_escape(model)}",version="{_escape(version)}"'
            return "{" + base + (f",{extra}" if extra else "") + "}"

        family("edgewise_inference_requests_total", "counter", "Inference requests received.")
        for (model, version), m in items:
            lines.append(f"edgewise_inference_requests_total{labels(model, version)} {m.requests}")
        family("edgewise_inference_errors_total", "counter", "Inference requests that failed (4xx or 5xx).")
        for (model, version), m in items:
            lines.append(f"edgewise_inference_errors_total{labels(model, version)} {m.errors}")
        family("edgewise_inference_queue_depth", "gauge", "Requests waiting for the model's next batch.")
        for (model, version), m in items:
            lines.append(f"edgewise_inference_queue_depth{labels(model, version)} {m.queue_depth}")
        for name, attr, help_text in (
            ("edgewise_inference_request_duration_seconds", "latency",
             "Time from a request's arrival to its answer."),
            ("edgewise_inference_batch_size", "batch_size", "Requests run together in one session.run."),
        ):
            family(name, "histogram", help_text)
            for (model, version), m in items:
                hist: Histogram = getattr(m, attr)
                cumulative = 0
                for bound, count in zip(hist.buckets, hist.counts, strict=False):
                    cumulative += count
                    le = 'le="' + _number(bound) + '"'
                    lines.append(f"{name}_bucket{labels(model, version, le)} {cumulative}")
                cumulative += hist.counts[-1]
                inf = 'le="+Inf"'
                lines.append(f"{name}_bucket{labels(model, version, inf)} {cumulative}")
                lines.append(f"{name}_sum{labels(model, version)} {_number(hist.total)}")
                lines.append(f"{name}_count{labels(model, version)} {hist.count}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SeriesReading:
    """A copy of one model version's figures at one moment (counters since the process started)."""

    model: str
    version: str
    requests: int
    errors: int
    queue_depth: int
    batches: int
    latency_bounds: tuple[float, ...]
    # Per bucket, not cumulative; the last one is +Inf.
    latency_counts: tuple[int, ...]
    batch_size_sum: float


def read_series(metrics: Metrics) -> list[SeriesReading]:
    """Every series' figures now, for the node's telemetry. Reads only: creates and changes nothing."""
    readings: list[SeriesReading] = []
    # A copy of the items: the event loop that updates them may be in another thread's hands.
    for (model, version), m in sorted(list(metrics.combined().items())):
        readings.append(SeriesReading(
            model=model, version=version, requests=m.requests, errors=m.errors, queue_depth=m.queue_depth,
            batches=m.batches, latency_bounds=m.latency.buckets, latency_counts=tuple(m.latency.counts),
            batch_size_sum=m.batch_size.total,
        ))
    return readings

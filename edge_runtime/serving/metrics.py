"""Prometheus metrics of the model server, in the text exposition format (0.0.4).

Written here rather than with ``prometheus_client``: the server needs a few
metric families with two labels, updated from the event loop thread or under
the batcher's lock (so no locks of their own), and a site installs one
dependency fewer. The format is the plain text one every Prometheus scraper
reads.

The same figures feed the statistics extension (``/v2/models/stats``, see
:mod:`.extensions`): queue time is each request's wait from its arrival to
the start of its batch's run, compute time is the batch's run
(``session.run``, stacking and slicing included). Both are measured with two
clock reads per batch, not per request: a batch's queue time is the sum of
its requests' waits (exact), and its histogram puts every request of the
batch in the bucket of the batch's mean wait (the count and sum are exact,
the spread within one batch is not kept).
"""

from __future__ import annotations

import bisect
import time
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

    def observe_many(self, value: float, n: int, total: float) -> None:
        """``n`` observations of about ``value`` that sum to ``total`` (a batch's requests)."""
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.total += total
        self.count += n

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
    # Rows run (a request of 4 rows is 4), as Triton's inference_count.
    inferences: int = 0
    batches: int = 0
    queue_depth: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    # Seconds from arrival to answer of the requests that failed (the rest of latency.total succeeded).
    failed_seconds: float = 0.0
    # Per request: arrival to the start of its batch's run. Per batch: the run itself.
    queue: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    compute: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    # Each batch's run time once per request in it (Triton's per-request compute_infer).
    compute_per_request: float = 0.0
    # Rows of a batch -> [batches of that size, their compute seconds] (Triton's batch_stats).
    batch_compute: dict[int, list[float]] = field(default_factory=dict)
    # time.monotonic() when this process last finished a batch (0: never; no wall clock read per batch),
    # and the latest that figures added from other processes report, in ms since the epoch.
    last_inference: float = 0.0
    added_last_inference_ms: int = 0
    # The execution provider the version runs on ("" until a batcher ran it).
    provider: str = ""

    def observe_batch(self, rows: int, requests: int, waited: float, computed: float, ended: float) -> None:
        """One batch run: ``waited`` its requests' summed queue seconds, ``computed`` its run's seconds.

        ``ended`` is ``time.monotonic()`` when the run ended. Called under the batcher's lock.
        """
        if not requests:
            return
        self.queue.observe_many(waited / requests, requests, waited)
        self.compute.observe(computed)
        self.compute_per_request += computed * requests
        entry = self.batch_compute.get(rows)
        if entry is None:
            self.batch_compute[rows] = [1, computed]
        else:
            entry[0] += 1
            entry[1] += computed
        self.last_inference = ended

    def last_inference_ms(self) -> int:
        """The last inference as Triton reports it: milliseconds since the epoch (0: never)."""
        own = 0
        if self.last_inference:
            own = int((time.time() - (time.monotonic() - self.last_inference)) * 1000)
        return max(own, self.added_last_inference_ms)

    def export(self) -> list[Any]:
        """The figures as plain JSON values, for another process to add up (see :meth:`add`)."""
        extra = {"failed_seconds": self.failed_seconds, "queue": [self.queue.counts, self.queue.total],
                 "compute": [self.compute.counts, self.compute.total],
                 "compute_per_request": self.compute_per_request,
                 "batch_compute": [[rows, n, s] for rows, (n, s) in self.batch_compute.items()],
                 "last_inference_ms": self.last_inference_ms(), "provider": self.provider}
        return [self.requests, self.errors, self.inferences, self.batches, self.queue_depth,
                self.latency.counts, self.latency.total, self.batch_size.counts, self.batch_size.total, extra]

    def add(self, exported: list[Any]) -> None:
        requests, errors, inferences, batches, queue_depth, latency, latency_total, sizes, sizes_total = exported[:9]
        self.requests += int(requests)
        self.errors += int(errors)
        self.inferences += int(inferences)
        self.batches += int(batches)
        self.queue_depth += int(queue_depth)
        self.latency.add([int(n) for n in latency], float(latency_total))
        self.batch_size.add([int(n) for n in sizes], float(sizes_total))
        # A process of an earlier release exports the first nine only.
        extra: dict[str, Any] = exported[9] if len(exported) > 9 else {}
        if not extra:
            return
        self.failed_seconds += float(extra["failed_seconds"])
        self.compute_per_request += float(extra["compute_per_request"])
        for name in ("queue", "compute"):
            counts, total = extra[name]
            getattr(self, name).add([int(n) for n in counts], float(total))
        for rows, n, seconds in extra["batch_compute"]:
            entry = self.batch_compute.setdefault(int(rows), [0, 0.0])
            entry[0] += int(n)
            entry[1] += float(seconds)
        self.added_last_inference_ms = max(self.added_last_inference_ms, int(extra["last_inference_ms"]))
        self.provider = self.provider or str(extra["provider"])


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
        # Per model: loads that failed or were refused. Counted by the process that decides what serves
        # (the first), so never added up across processes.
        self.load_failures: dict[str, int] = {}

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

    def load_failed(self, model: str) -> None:
        """A load of ``model`` failed or was refused (what served before, if anything, still does)."""
        self.load_failures[model] = self.load_failures.get(model, 0) + 1

    def render(self) -> str:
        lines: list[str] = []
        items = sorted(self.combined().items())
        for name, attr, help_text in COUNTERS:
            _family(lines, name, "counter" if name.endswith("_total") else "gauge", help_text)
            for (model, version), m in items:
                lines.append(f"{name}{_labels(model, version)} {getattr(m, attr)}")
        for name, attr, help_text in HISTOGRAMS:
            _family(lines, name, "histogram", help_text)
            for (model, version), m in items:
                _histogram(lines, name, model, version, getattr(m, attr))
        _family(lines, "edgewise_model_load_failures_total", "counter",
                "Loads of a model that failed or were refused (what served before kept serving).")
        for model, count in sorted(self.load_failures.items()):
            lines.append(f'edgewise_model_load_failures_total{{model="{_escape(model)}"}} {count}')
        _family(lines, "edgewise_model_info", "gauge",
                "1 for each model version that ran here, labelled with its execution provider.")
        for (model, version), m in items:
            if m.provider:
                provider = 'provider="' + _escape(m.provider) + '"'
                lines.append(f"edgewise_model_info{_labels(model, version, provider)} 1")
        return "\n".join(lines) + "\n"


# (name, ModelMetrics attribute, help) of the plain series; a name ending in _total is a counter.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("edgewise_inference_requests_total", "requests", "Inference requests received."),
    ("edgewise_inference_errors_total", "errors", "Inference requests that failed (4xx or 5xx)."),
    ("edgewise_inference_rows_total", "inferences", "Rows run through the model (a request of 4 rows is 4)."),
    ("edgewise_inference_batches_total", "batches", "Batches run (session.run calls, or runs of one request)."),
    ("edgewise_inference_queue_depth", "queue_depth", "Requests waiting for the model's next batch."),
)
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("edgewise_inference_request_duration_seconds", "latency", "Time from a request's arrival to its answer."),
    ("edgewise_inference_batch_size", "batch_size", "Requests run together in one session.run."),
    ("edgewise_inference_queue_duration_seconds", "queue",
     "Time from a request's arrival to the start of its batch's run (each request of a batch at the "
     "batch's mean)."),
    ("edgewise_inference_compute_duration_seconds", "compute", "Time one batch's run took (session.run)."),
)


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _labels(model: str, version: str, extra: str = "") -> str:
    base = f'model="{_escape(model)}",version="{_escape(version)}"'
    return "{" + base + (f",{extra}" if extra else "") + "}"


def _histogram(lines: list[str], name: str, model: str, version: str, hist: Histogram) -> None:
    cumulative = 0
    for bound, count in zip(hist.buckets, hist.counts, strict=False):
        cumulative += count
        le = 'le="' + _number(bound) + '"'
        lines.append(f"{name}_bucket{_labels(model, version, le)} {cumulative}")
    cumulative += hist.counts[-1]
    inf = 'le="+Inf"'
    lines.append(f"{name}_bucket{_labels(model, version, inf)} {cumulative}")
    lines.append(f"{name}_sum{_labels(model, version)} {_number(hist.total)}")
    lines.append(f"{name}_count{_labels(model, version)} {hist.count}")


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

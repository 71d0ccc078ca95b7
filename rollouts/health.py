"""Serving health of model versions on nodes, for rollout gates.

Nodes report cumulative counters per serving version in every sync
(``ModelStatus.stats``: requests, errors and a latency histogram since the
version was loaded). :func:`health_record` stores what a set of nodes last
reported as :class:`~orchestrator.models.HealthSample` rows (only when it is
newer than what is stored), and :func:`model_health` turns the samples into
one window: the growth of the counters between ``since`` and ``until``,
summed over the nodes. A counter that goes down means the node's process
restarted and counting began again; the window then counts from zero at that
point rather than going negative.

Gates read health only through :func:`model_health`, so live telemetry can
feed the same samples later without the gates changing.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.db.models import Max

from edge_runtime.policy.rollout import HealthWindow, window_sum
from rollouts.models import HealthSample
from sites.models import Node


def _reported_stats(node: Node, model: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for status in (node.actual_state or {}).get("models") or []:
        if isinstance(status, dict) and status.get("name") == model and isinstance(status.get("stats"), dict):
            found.append((str(status.get("version", "")), status["stats"]))
    return found


def health_record(nodes: Iterable[Node], *, model: str) -> int:
    """Store each node's latest report for ``model`` (at its last sync) if not stored yet; how many were new."""
    nodes = [n for n in nodes if n.last_seen_at is not None]
    if not nodes:
        return 0
    latest = {(row["node_id"], row["version"]): row["last"] for row in
              HealthSample.objects.filter(node__in=[n.pk for n in nodes], model=model)
              .values("node_id", "version").annotate(last=Max("at"))}
    new = []
    for node in nodes:
        seen = node.last_seen_at
        assert seen is not None  # nodes that never synced were left out above
        for version, stats in _reported_stats(node, model):
            last = latest.get((node.pk, version))
            if last is not None and last >= seen:
                continue
            try:
                new.append(HealthSample(
                    node=node, model=model, version=version, at=seen,
                    requests=int(stats.get("requests", 0)), errors=int(stats.get("errors", 0)),
                    latency_bounds=[float(b) for b in stats.get("latency_bounds") or []],
                    latency_counts=[int(c) for c in stats.get("latency_counts") or []]))
            except (TypeError, ValueError):
                continue  # a garbled report is no data, which gates treat as missing
    HealthSample.objects.bulk_create(new)
    return len(new)


def _delta(samples: Sequence[HealthSample], base: HealthSample | None) -> HealthWindow | None:
    if not samples:
        return None
    bounds = tuple(float(b) for b in samples[-1].latency_bounds)
    requests = errors = 0.0
    counts = [0.0] * (len(bounds) + 1)
    previous = base
    for sample in samples:
        restarted = previous is None or sample.requests < previous.requests or sample.errors < previous.errors \
            or list(sample.latency_bounds) != list(previous.latency_bounds)
        if restarted:
            requests += sample.requests
            errors += sample.errors
            these = list(sample.latency_counts)
        else:
            assert previous is not None
            requests += sample.requests - previous.requests
            errors += sample.errors - previous.errors
            these = [a - b for a, b in zip(sample.latency_counts, previous.latency_counts, strict=False)]
        if tuple(float(b) for b in sample.latency_bounds) != bounds or len(these) != len(counts):
            return HealthWindow(float("nan"), float("nan"), bounds, tuple(float("nan") for _ in counts))
        for index, count in enumerate(these):
            counts[index] += max(0, count)
        previous = sample
    return HealthWindow(requests, errors, bounds, tuple(counts))


def model_health(nodes: Iterable[Node], model: str, version: str, since: dt.datetime | None = None,
                 until: dt.datetime | None = None) -> HealthWindow | None:
    """``version`` of ``model`` on ``nodes`` between ``since`` (None: since it loaded) and ``until`` (None: now).

    None when no node has any sample in the window.
    """
    ids = [n.pk for n in nodes]
    samples = HealthSample.objects.filter(node__in=ids, model=model, version=version)
    if until is not None:
        samples = samples.filter(at__lte=until)
    by_node: dict[int, list[HealthSample]] = defaultdict(list)
    for sample in samples.order_by("node_id", "at", "pk"):
        by_node[sample.node_id].append(sample)
    windows = []
    for node_samples in by_node.values():
        base = None
        inside = node_samples
        if since is not None:
            before = [s for s in node_samples if s.at <= since]
            base = before[-1] if before else None
            inside = [s for s in node_samples if s.at > since]
        windows.append(_delta(inside, base))
    return window_sum(windows)

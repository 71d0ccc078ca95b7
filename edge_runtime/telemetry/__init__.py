"""Telemetry of one node: taken every few seconds, kept on disk while the
control plane is out of reach, sent over the agent's websocket in order.

Three parts:

* **Collection** (:class:`ResourceSampler`, :class:`ModelSampler`): every
  interval (default 5 s, ``--telemetry-interval``) one
  :class:`~edge_runtime.protocol.TelemetryPoint`: the node's CPU (all cores,
  from ``/proc/stat``), load, memory (``/proc/meminfo``: total less
  available), the file system of the state directory (``statvfs``), the
  inference queue depth and the telemetry backlog; and per model version the
  requests, errors, batches and mean batch size *in that interval*, the
  latency p50/p95 from the latency histogram's buckets in that interval
  (linear within a bucket, as Prometheus' ``histogram_quantile`` does), and
  the queue depth. Model figures come from
  :func:`edge_runtime.serving.metrics.read_series`, which only reads. On a
  machine without ``/proc`` the machine figures are zero.
* **Store and forward** (:class:`TelemetryQueue`): every point goes first
  into a SQLite file in the state directory (``telemetry.sqlite3``, WAL), with
  a sequence number one higher than the last, persisted with the point in
  the same transaction, so numbers never repeat across restarts. A point
  leaves the file only when the control plane acknowledges its sequence
  number, which it does after committing it; it skips numbers it already
  holds, so a point sent twice (an ack lost on the way) counts once.
  The points' encoded size is held within a **disk budget** (default 64 MiB,
  ``--telemetry-budget``; the file itself is larger by SQLite's page
  overhead). When a new point would exceed it, the *oldest* points go (the
  newest say most about the site now) and their place is taken by one
  explicit **gap** record: the first and last sequence numbers lost, how many,
  and the period they covered. Consecutive losses extend the same gap. Gaps
  travel in sequence order like points, so the control plane knows exactly
  what it will never receive. Points in a frame awaiting its ack are not
  evicted (the budget may be exceeded by that one frame meanwhile), so a
  point the control plane received is never also counted lost; only when a
  connection drops with a frame unacknowledged, and the budget then evicts
  that frame's points, may the node's own count of lost points exceed the
  control plane's, which stays exact.
* **Sending** (:meth:`Telemetry.run_session`): runs inside the agent's
  websocket session. It sends what waits, oldest first, in frames of at most
  200 items and about 256 KiB, one frame in flight: the next goes after the
  previous one's ack. Each ack carries the highest number the control plane
  holds for this node; the node forgets everything up to it (and, should its
  own counter be behind, as after restoring an old state directory, moves
  past it so that new points are not taken for duplicates). No ack within
  30 s ends the session; the agent reconnects and everything
  unacknowledged goes again (what the control plane already holds is
  skipped there).

The queue's SQLite calls run on the event loop and never wait on the
network (see docs/decisions/0009-telemetry-queue-on-the-event-loop.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_runtime.protocol import (
    TelemetryAck,
    TelemetryPoint,
)
from edge_runtime.telemetry.figures import (
    MAX_MODEL_SERIES,
    ModelSampler,
    ReadModels,
    ResourceSampler,
    histogram_quantile,
)
from edge_runtime.telemetry.queue import (
    DEFAULT_BUDGET_BYTES,
    FRAME_TARGET_BYTES,
    MIN_BUDGET_BYTES,
    QUEUE_FILE,
    QueuedItem,
    QueueStats,
    TelemetryQueue,
    read_queue_stats,
)

logger = logging.getLogger("edge_runtime.telemetry")

__all__ = [
    "ACK_TIMEOUT_S", "DEFAULT_BUDGET_BYTES", "DEFAULT_INTERVAL_S", "FRAME_TARGET_BYTES", "MAX_MODEL_SERIES",
    "MIN_BUDGET_BYTES", "MIN_INTERVAL_S", "QUEUE_FILE", "ModelSampler", "QueueStats", "QueuedItem", "ReadModels",
    "ResourceSampler", "Telemetry", "TelemetryQueue", "TelemetryStalled", "histogram_quantile", "read_queue_stats",
]

DEFAULT_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.1
ACK_TIMEOUT_S = 30.0


class TelemetryStalled(Exception):
    """The control plane stopped acknowledging; the session ends and the agent reconnects."""


class Telemetry:
    """The node's telemetry: a collect loop beside the agent, a send session inside its websocket."""

    def __init__(self, queue: TelemetryQueue, *, interval_s: float = DEFAULT_INTERVAL_S,
                 read_models: ReadModels | None = None, disk_path: Path | None = None,
                 rng: random.Random | None = None) -> None:
        if interval_s < MIN_INTERVAL_S:
            raise ValueError(f"the telemetry interval must be at least {MIN_INTERVAL_S} s, not {interval_s}")
        self.queue = queue
        self.interval_s = interval_s
        self.models = ModelSampler(read_models) if read_models is not None else None
        self.resources = ResourceSampler(disk_path or queue.path.parent)
        self.rng = rng or random.Random()  # noqa: S311 - start offset, not secrets
        self.produced = asyncio.Event()
        self._acked = asyncio.Event()
        self._last_sample = time.monotonic()

    def collect_once(self) -> TelemetryPoint:
        """Take one point and store it in the queue."""
        now = time.monotonic()
        interval = min(3600.0, max(0.001, now - self._last_sample))
        self._last_sample = now
        models = self.models.sample() if self.models is not None else []
        resources = self.resources.sample(inference_queue_depth=sum(m.queue_depth for m in models),
                                          telemetry_backlog=self.queue.pending_points)
        at = dt.datetime.now(dt.UTC)
        point = self.queue.put(lambda seq: TelemetryPoint(seq=seq, at=at, interval_s=round(interval, 3),
                                                          resources=resources, models=models))
        self.produced.set()
        return point

    async def collect_loop(self) -> None:
        # A random start within the first interval, so that a fleet started
        # together does not report in lockstep.
        await asyncio.sleep(self.rng.uniform(0, self.interval_s))
        deadline = time.monotonic()
        while True:
            deadline += self.interval_s
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            try:
                self.collect_once()
            except (sqlite3.Error, OSError) as exc:
                # The disk is the problem, not the node: say so and keep trying.
                logger.error("cannot store a telemetry point: %s", exc)
            if time.monotonic() - deadline > self.interval_s:
                deadline = time.monotonic()  # fell behind (a suspended machine): do not burst to catch up

    def on_ack(self, ack: TelemetryAck) -> None:
        """An ack from the control plane: everything up to ``ack.seq`` is committed there."""
        self.queue.ack(ack.seq)
        self._acked.set()

    async def run_session(self, send: Callable[[str], Awaitable[None]]) -> None:
        """Send what waits, in order, one frame in flight, until cancelled. Raises TelemetryStalled."""
        try:
            await self._send_all(send)
        finally:
            self.queue.in_flight_upto = 0

    async def _send_all(self, send: Callable[[str], Awaitable[None]]) -> None:
        sent_upto = self.queue.acked_seq
        while True:
            batch = self.queue.pending(after=sent_upto)
            if not batch:
                self.produced.clear()
                batch = self.queue.pending(after=sent_upto)  # a point put between the read and the clear
                if not batch:
                    await self.produced.wait()
                    continue
            await send('{"type":"telemetry","items":[' + ",".join(item.body for item in batch) + "]}")
            sent_upto = batch[-1].last_seq
            self.queue.in_flight_upto = sent_upto
            deadline = time.monotonic() + ACK_TIMEOUT_S
            while self.queue.acked_seq < sent_upto:
                self._acked.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TelemetryStalled(f"no ack for telemetry up to seq {sent_upto} within {ACK_TIMEOUT_S:.0f}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._acked.wait(), timeout=remaining)
            # Anything acknowledged past what was sent (another session's) is skipped too.
            sent_upto = max(sent_upto, self.queue.acked_seq)

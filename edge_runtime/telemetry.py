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

SQLite calls run on the event loop: each touches a few rows of a local file
(well under a millisecond), and the loop's other work, inference included,
never waits on the network because of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import sqlite
from edge_runtime.protocol import (
    MAX_TELEMETRY_ITEMS,
    ModelTelemetry,
    NodeResources,
    TelemetryAck,
    TelemetryPoint,
)
from edge_runtime.serving.metrics import SeriesReading

logger = logging.getLogger("edge_runtime.telemetry")

QUEUE_FILE = "telemetry.sqlite3"
DEFAULT_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.1
DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
# Below this not even a few points fit; a budget that small is a typo.
MIN_BUDGET_BYTES = 4 * 1024
FRAME_TARGET_BYTES = 256 * 1024
ACK_TIMEOUT_S = 30.0
# A point carries at most this many model series (the protocol's limit).
MAX_MODEL_SERIES = 200

ReadModels = Callable[[], Sequence[SeriesReading]]


class TelemetryStalled(Exception):
    """The control plane stopped acknowledging; the session ends and the agent reconnects."""


# -- figures --------------------------------------------------------------------


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


# -- the store-and-forward queue --------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    pending_points: int
    pending_gaps: int
    pending_bytes: int
    budget_bytes: int
    next_seq: int
    acked_seq: int
    # Every point ever lost to the budget, acknowledged gaps included.
    lost_points: int
    # The gaps still waiting to be sent: (first seq, last seq, count).
    gaps: list[tuple[int, int, int]]


@dataclass(frozen=True)
class QueuedItem:
    seq: int
    last_seq: int
    body: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,       -- a point's number, or a gap's first lost number
    last_seq INTEGER NOT NULL,     -- the same for a point; a gap's last lost number
    kind TEXT NOT NULL CHECK (kind IN ('point', 'gap')),
    at TEXT NOT NULL,              -- a point's time; a gap's end
    start TEXT,                    -- a gap's start
    size INTEGER NOT NULL,         -- bytes of body; points' sizes count against the budget
    body TEXT NOT NULL             -- the item as sent (JSON)
);
"""


class TelemetryQueue:
    """Points and gaps waiting for the control plane, in sequence order (see the module docstring)."""

    def __init__(self, path: Path, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"the telemetry disk budget must be at least {MIN_BUDGET_BYTES} bytes, "
                             f"not {budget_bytes}")
        self.path = path
        self.budget_bytes = budget_bytes
        # Items up to this number are in a frame awaiting its ack: not to be evicted.
        self.in_flight_upto = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        # NORMAL: a power cut may lose the last moments of WAL, never corrupt
        # the file; an unacknowledged point lost that way is one the node never
        # told anyone it had, and the sequence restarts after the last durable one.
        # One connection for the queue's life, waiting 5 s for a lock (sqlite3's default).
        self._db = sqlite.connect(path, synchronous="NORMAL", timeout=5.0, schema=_SCHEMA)
        self.next_seq = self._meta("next_seq", 1)
        self.acked_seq = self._meta("acked_seq", 0)
        self.lost_points = self._meta("lost_points", 0)
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM items WHERE kind = 'point'").fetchone()
        self.pending_bytes: int = int(row[0])
        self.pending_points: int = int(row[1])
        highest = self._db.execute("SELECT MAX(last_seq) FROM items").fetchone()[0]
        if highest is not None and highest >= self.next_seq:
            # Only if the meta row was lost; numbers must never repeat.
            self.next_seq = int(highest) + 1

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite.immediate(self._db)

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, value))

    def put(self, build: Callable[[int], TelemetryPoint]) -> TelemetryPoint:
        """Store the point ``build(seq)`` makes with the next sequence number; evict past the budget."""
        with self._transaction() as db:
            point = build(self.next_seq)
            if point.seq != self.next_seq:
                raise ValueError(f"the point must carry seq {self.next_seq}, not {point.seq}")
            body = point.model_dump_json()
            size = len(body.encode())
            db.execute("INSERT INTO items (seq, last_seq, kind, at, size, body) VALUES (?, ?, 'point', ?, ?, ?)",
                       (point.seq, point.seq, point.at.isoformat(), size, body))
            self._set_meta(db, "next_seq", point.seq + 1)
            pending_bytes, pending_points, lost, new_gap = self.pending_bytes + size, self.pending_points + 1, 0, False
            while pending_bytes > self.budget_bytes and pending_points > 0:
                evicted = self._evict_oldest(db)
                if evicted is None:
                    break  # all in flight: over budget until the ack
                freed, started = evicted
                pending_bytes -= freed
                pending_points -= 1
                lost += 1
                new_gap = new_gap or started
            if lost:
                self._set_meta(db, "lost_points", self.lost_points + lost)
        self.next_seq = point.seq + 1
        self.pending_bytes, self.pending_points = pending_bytes, pending_points
        if lost:
            self.lost_points += lost
            # Once per gap, not once per point: a long outage would otherwise fill the log instead.
            logger.log(logging.WARNING if new_gap else logging.DEBUG,
                       "telemetry disk budget of %d bytes full: the oldest points give way to a gap record "
                       "(%d lost so far)", self.budget_bytes, self.lost_points)
        return point

    def _evict_oldest(self, db: sqlite3.Connection) -> tuple[int, bool] | None:
        """Replace the oldest point not in flight by (an extension of) the gap before it.

        Returns (bytes freed, whether a new gap began), or None when every point is in flight.
        """
        row = db.execute("SELECT seq, at, size FROM items WHERE kind = 'point' AND seq > ? ORDER BY seq LIMIT 1",
                         (self.in_flight_upto,)).fetchone()
        if row is None:
            return None
        seq, at, size = row
        db.execute("DELETE FROM items WHERE seq = ?", (seq,))
        before = db.execute("SELECT seq, start FROM items WHERE kind = 'gap' AND last_seq = ?", (seq - 1,)).fetchone()
        first, start = (int(before[0]), str(before[1])) if before else (int(seq), str(at))
        gap = {"kind": "gap", "seq": first, "last_seq": int(seq), "count": int(seq) - first + 1,
               "start": start, "end": str(at), "reason": "disk_budget"}
        body = json.dumps(gap, separators=(",", ":"))
        db.execute("INSERT INTO items (seq, last_seq, kind, at, start, size, body) VALUES (?, ?, 'gap', ?, ?, ?, ?) "
                   "ON CONFLICT(seq) DO UPDATE SET last_seq = excluded.last_seq, at = excluded.at, "
                   "size = excluded.size, body = excluded.body",
                   (first, int(seq), str(at), start, len(body), body))
        return int(size), before is None

    def pending(self, *, after: int, max_items: int = MAX_TELEMETRY_ITEMS,
                max_bytes: int = FRAME_TARGET_BYTES) -> list[QueuedItem]:
        """Items whose numbers come after ``after``, oldest first, at most ``max_items`` / about ``max_bytes``."""
        rows = self._db.execute("SELECT seq, last_seq, body FROM items WHERE last_seq > ? ORDER BY seq LIMIT ?",
                                (after, max_items)).fetchall()
        out: list[QueuedItem] = []
        total = 0
        for seq, last_seq, body in rows:
            if out and total + len(body) > max_bytes:
                break
            out.append(QueuedItem(int(seq), int(last_seq), str(body)))
            total += len(body)
        return out

    def ack(self, seq: int) -> None:
        """The control plane holds everything up to ``seq``: forget it. Safe to repeat."""
        if seq < 0:
            raise ValueError(f"ack seq must not be negative, not {seq}")
        with self._transaction() as db:
            db.execute("DELETE FROM items WHERE last_seq <= ?", (seq,))
            acked = max(self.acked_seq, seq)
            self._set_meta(db, "acked_seq", acked)
            next_seq = max(self.next_seq, seq + 1)
            if next_seq != self.next_seq:
                logger.warning("the control plane holds telemetry up to seq %d, beyond this node's %d; "
                               "continuing from %d", seq, self.next_seq - 1, next_seq)
                self._set_meta(db, "next_seq", next_seq)
            row = db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM items WHERE kind = 'point'").fetchone()
        self.acked_seq, self.next_seq = acked, next_seq
        self.pending_bytes, self.pending_points = int(row[0]), int(row[1])

    def stats(self) -> QueueStats:
        gaps = self._db.execute("SELECT seq, last_seq FROM items WHERE kind = 'gap' ORDER BY seq").fetchall()
        return QueueStats(
            pending_points=self.pending_points, pending_gaps=len(gaps), pending_bytes=self.pending_bytes,
            budget_bytes=self.budget_bytes, next_seq=self.next_seq, acked_seq=self.acked_seq,
            lost_points=self.lost_points, gaps=[(int(a), int(b), int(b) - int(a) + 1) for a, b in gaps],
        )


def read_queue_stats(state_dir: Path) -> QueueStats | None:
    """The queue's figures from its file, for ``edge-runtime status`` (None if there is none yet)."""
    path = state_dir / QUEUE_FILE
    if not path.exists():
        return None
    queue = TelemetryQueue(path, budget_bytes=max(MIN_BUDGET_BYTES, 1))
    try:
        stats = queue.stats()
    finally:
        queue.close()
    return stats


# -- collection and sending -------------------------------------------------------


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

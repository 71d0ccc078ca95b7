"""The store-and-forward queue of telemetry points and gaps, in a SQLite file of the state directory."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import sqlite
from edge_runtime.protocol import (
    MAX_TELEMETRY_ITEMS,
    TelemetryPoint,
)

logger = logging.getLogger("edge_runtime.telemetry")

QUEUE_FILE = "telemetry.sqlite3"
DEFAULT_BUDGET_BYTES = 64 * 1024 * 1024
# Below this not even a few points fit; a budget that small is a typo.
MIN_BUDGET_BYTES = 4 * 1024
FRAME_TARGET_BYTES = 256 * 1024


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
    """Points and gaps waiting for the control plane, in sequence order (see :mod:`edge_runtime.telemetry`)."""

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

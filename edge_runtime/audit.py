"""The node's own audit chain: an append-only, hash-chained log in a SQLite file.

Every event is ``(seq, at, action, detail, prev_hash, hash)`` where ``hash``
is the sha256 of the canonical JSON of the other five fields, and
``prev_hash`` is the previous event's hash (64 zeros for the first). Altering,
removing or reordering any record breaks the chain from that record on;
:meth:`NodeAudit.verify` recomputes it and names the first record that does
not match. A ``head`` row holds the last seq and hash, so that dropping the
newest records is detected too (unless the head is rewritten with them: the
control plane, which holds the uploaded chain, catches that).

The file is ``<state_dir>/audit.sqlite3`` by default. Appends are
serialised with ``BEGIN IMMEDIATE``, so the agent and the model server may
append from separate processes; each append is durable when it returns.
It is written for any node event (queries, policy decisions, model loads),
and :meth:`NodeAudit.events_after` reads batches for upload, idempotent by seq.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime import sqlite
from edge_runtime.signing import canonical_json

AUDIT_FILE = "audit.sqlite3"
GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


class AuditError(Exception):
    """The audit log cannot be written or read; nothing that needed the record went ahead."""


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    at: str
    action: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "action": self.action, "detail": self.detail,
                "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    reason: str


def event_hash(*, seq: int, at: str, action: str, detail_json: str, prev_hash: str) -> str:
    """The hash of one event; ``detail_json`` is the canonical JSON stored in the record."""
    payload = canonical_json({"seq": seq, "at": at, "action": action, "detail": detail_json, "prev_hash": prev_hash})
    return hashlib.sha256(payload.encode()).hexdigest()


class NodeAudit:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO head (id, seq, hash) VALUES (1, 0, ?)", (GENESIS_HASH,))
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(path)!r} cannot be opened: {exc}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> NodeAudit:
        return cls(state_dir / AUDIT_FILE)

    def _connect(self, *, durable: bool = True) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # A connection per operation: safe from any thread or process.
        return sqlite.connection(self.path, synchronous="FULL" if durable else "NORMAL")

    def append(self, action: str, detail: dict[str, Any] | None = None, *, durable: bool = True) -> AuditEvent:
        """Append one event and return it; :class:`AuditError` if it could not be written.

        ``durable``: synced to disk before this returns. A non-durable event is in the log (other readers see
        it) and becomes durable with the next durable one, since the write-ahead log is synced in order: a
        query's "received" record is written so, its decision durably before anything is released.
        """
        if not action or len(action) > 80:
            raise ValueError("an audit action is 1 to 80 characters")
        detail = detail or {}
        detail_json = canonical_json(detail)
        at = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        try:
            with self._connect(durable=durable) as conn, sqlite.immediate(conn):
                seq, prev = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
                seq += 1
                digest = event_hash(seq=seq, at=at, action=action, detail_json=detail_json, prev_hash=prev)
                conn.execute("INSERT INTO events (seq, at, action, detail, prev_hash, hash) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (seq, at, action, detail_json, prev, digest))
                conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(self.path)!r} cannot be written: {exc}") from None
        return AuditEvent(seq=seq, at=at, action=action, detail=json.loads(detail_json), prev_hash=prev,
                          hash=digest)

    def head(self) -> tuple[int, str]:
        with self._connect() as conn:
            seq, digest = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
        return int(seq), str(digest)

    def events_after(self, seq: int = 0, limit: int = 500) -> list[AuditEvent]:
        """Events with a seq above ``seq``, oldest first (an upload batch)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT seq, at, action, detail, prev_hash, hash FROM events WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [AuditEvent(seq=r[0], at=r[1], action=r[2], detail=json.loads(r[3]), prev_hash=r[4], hash=r[5])
                for r in rows]

    def verify(self, *, batch_size: int = 2000) -> tuple[int, ChainBreak | None]:
        """Recompute the chain. Returns (records checked, the first break or None)."""
        expected_prev = GENESIS_HASH
        expected_seq = 1
        checked = 0
        with self._connect() as conn:
            last = 0
            while True:
                rows = conn.execute("SELECT seq, at, action, detail, prev_hash, hash FROM events WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (last, batch_size)).fetchall()
                if not rows:
                    break
                for seq, at, action, detail_json, prev_hash, digest in rows:
                    if seq != expected_seq:
                        return checked, ChainBreak(expected_seq, f"record #{expected_seq} is missing "
                                                   f"(next is #{seq})")
                    if prev_hash != expected_prev:
                        return checked, ChainBreak(seq, "its previous-hash does not match the record before it")
                    recomputed = event_hash(seq=seq, at=at, action=action, detail_json=detail_json,
                                            prev_hash=prev_hash)
                    if recomputed != digest:
                        return checked, ChainBreak(seq, "its content does not match its hash (the record was "
                                                   "altered)")
                    expected_prev = digest
                    expected_seq += 1
                    checked += 1
                last = rows[-1][0]
            head_seq, head_hash = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
        if head_seq != checked:
            return checked, ChainBreak(checked + 1, f"the chain head says #{head_seq} but the chain ends at "
                                       f"#{checked}")
        if checked and head_hash != expected_prev:
            return checked, ChainBreak(checked, "the chain head's hash does not match the last record")
        return checked, None

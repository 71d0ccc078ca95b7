"""The node's own audit log: an append-only, hash-chained Merkle log in a SQLite file.

Every event is ``(seq, at, action, detail, prev_hash, hash)`` where ``hash``
is the sha256 of the event's leaf data (the canonical JSON of the other five
fields, :func:`~edge_runtime.protocol.audit.entry_leaf_data`), and
``prev_hash`` is the previous event's hash (64 zeros for the first). Altering,
removing or reordering any record breaks the chain from that record on;
:meth:`NodeAudit.verify` recomputes it and names the first record that does
not match. A ``head`` row holds the last seq and hash, so that dropping the
newest records is detected too (unless the head is rewritten with them: the
control plane, which witnesses the log, catches that).

The events are also the leaves of an RFC 9162 Merkle tree (leaf ``seq - 1``
is ``leaf_hash`` of the event's leaf data, :mod:`edge_runtime.merkle`). The
``tree`` table keeps the hash of every perfect subtree, written in the same
transaction as the event that completes it, so the root of any size and every
inclusion or consistency proof is one batched lookup (:meth:`NodeAudit.nodes`
is a :class:`~edge_runtime.merkle.Tree`). A log written before the tree
existed gets it on open, built once from its events.

The control plane is the log's witness: on every sync the node signs a
checkpoint of its whole log and sends the entries the control plane lacks
(:mod:`edge_runtime.audit_upload`); the ``witness`` row keeps how many entries
the control plane holds and the last checkpoint it cosigned.

The file is ``<state_dir>/audit.sqlite3`` by default. Appends are
serialised with ``BEGIN IMMEDIATE``, so the agent and the model server may
append from separate processes; each append is durable when it returns.
It is written for any node event (queries, policy decisions, model loads,
desired states applied or refused).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import sqlite
from edge_runtime.audit_upload import (
    AuditError,
    WitnessState,
    build_upload,
    cosigned_note,
    read_witness,
    sent_checkpoint,
)
from edge_runtime.canonical import canonical_json
from edge_runtime.merkle import Frontier, Key, cover, leaf_hash
from edge_runtime.merkle import inclusion_proof as merkle_inclusion_proof
from edge_runtime.merkle import root as merkle_root
from edge_runtime.protocol.audit import MAX_ENTRY_DETAIL, AuditAck, AuditUpload, entry_chain_hash, entry_leaf_data

__all__ = ["AUDIT_FILE", "GENESIS_HASH", "AuditError", "AuditEvent", "ChainBreak", "NodeAudit", "WitnessState",
           "event_hash", "node_log_origin"]

_logger = logging.getLogger("edge_runtime.audit")

AUDIT_FILE = "audit.sqlite3"
GENESIS_HASH = "0" * 64
# Keys per lookup of the tree: well under SQLite's limit of bound parameters.
_LOOKUP_CHUNK = 400

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
CREATE TABLE IF NOT EXISTS tree (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS witness (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    stored INTEGER NOT NULL,
    cosigned_size INTEGER NOT NULL,
    note_size INTEGER NOT NULL,
    note_root TEXT NOT NULL,
    note TEXT NOT NULL
);
"""


def node_log_origin(node_id: str) -> str:
    """The origin line of a node's log checkpoints (and the name its identity key signs them under)."""
    return f"edgewise/node/{node_id}"


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
    return entry_chain_hash(entry_leaf_data(seq=seq, at=at, action=action, detail=detail_json, prev_hash=prev_hash))


def _nodes(conn: sqlite3.Connection, keys: Iterable[Key]) -> dict[Key, bytes]:
    """The stored hashes of the given perfect subtrees, a few hundred keys per query."""
    wanted = list(dict.fromkeys(keys))
    found: dict[Key, bytes] = {}
    for i in range(0, len(wanted), _LOOKUP_CHUNK):
        chunk = wanted[i:i + _LOOKUP_CHUNK]
        values = ",".join(["(?, ?)"] * len(chunk))
        rows = conn.execute(f"WITH k(level, idx) AS (VALUES {values}) SELECT t.level, t.idx, t.hash "  # noqa: S608 - placeholders only
                            "FROM k JOIN tree t ON t.level = k.level AND t.idx = k.idx",
                            [part for key in chunk for part in key]).fetchall()
        found.update(((level, idx), bytes(digest)) for level, idx, digest in rows)
    return found


def _store(conn: sqlite3.Connection, completed: list[tuple[Key, bytes]]) -> None:
    # REPLACE: rows past the head (left by records dropped from the tail) give way to the log as it now is;
    # the witness, which cosigned the old tail, sees the fork.
    conn.executemany("INSERT OR REPLACE INTO tree (level, idx, hash) VALUES (?, ?, ?)",
                     [(level, idx, digest) for (level, idx), digest in completed])


def _frontier(conn: sqlite3.Connection, size: int) -> Frontier:
    keys = cover(0, size) if size else []
    found = _nodes(conn, keys)
    try:
        return Frontier(size, [found[key] for key in keys])
    except KeyError as exc:
        raise AuditError(f"the audit log's Merkle tree lacks the subtree {exc.args[0]} (level, index)") from None


def _frontier_at_head(conn: sqlite3.Connection, size: int) -> Frontier:
    """The frontier of the tree of ``size`` leaves, adding the leaves it lacks from the events first.

    A log written before the tree existed (or by an older runtime since) lacks them: they are built from its
    events in seq order, in the caller's transaction.
    """
    (leaves,) = conn.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM tree WHERE level = 0").fetchone()
    if leaves >= size:
        return _frontier(conn, size)
    frontier = _frontier(conn, leaves)
    while frontier.size < size:
        rows = conn.execute("SELECT seq, at, action, detail, prev_hash FROM events WHERE seq > ? AND seq <= ? "
                            "ORDER BY seq LIMIT 2000", (frontier.size, size)).fetchall()
        for seq, at, action, detail, prev_hash in rows:
            if seq != frontier.size + 1:
                break
            data = entry_leaf_data(seq=seq, at=at, action=action, detail=detail, prev_hash=prev_hash)
            _store(conn, frontier.append(leaf_hash(data)))
        if not rows or frontier.size != rows[-1][0]:
            raise AuditError(f"the audit log lacks record #{frontier.size + 1} (its head is #{size}), so its "
                             "Merkle tree cannot be built: the file was altered")
    return frontier


class _SnapshotTree:
    """The tree as one read transaction sees it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def nodes(self, keys: Iterable[Key]) -> dict[Key, bytes]:
        return _nodes(self.conn, keys)


class NodeAudit:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with self._connect() as conn:
                conn.executescript(_SCHEMA)
                with sqlite.immediate(conn):
                    conn.execute("INSERT OR IGNORE INTO head (id, seq, hash) VALUES (1, 0, ?)", (GENESIS_HASH,))
                    conn.execute("INSERT OR IGNORE INTO witness (id, stored, cosigned_size, note_size, note_root, "
                                 "note) VALUES (1, 0, 0, 0, '', '')")
                    (size,) = conn.execute("SELECT seq FROM head WHERE id = 1").fetchone()
                    _frontier_at_head(conn, size)
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(path)!r} cannot be opened: {exc}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> NodeAudit:
        return cls(state_dir / AUDIT_FILE)

    def _connect(self, *, durable: bool = True) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # A connection per operation: safe from any thread or process.
        return sqlite.connection(self.path, synchronous="FULL" if durable else "NORMAL")

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[tuple[sqlite3.Connection, _SnapshotTree, int]]:
        """One read transaction: (connection, the tree, the log's size) as of its start."""
        with self._connect() as conn:
            conn.execute("BEGIN")
            try:
                (size,) = conn.execute("SELECT seq FROM head WHERE id = 1").fetchone()
                yield conn, _SnapshotTree(conn), int(size)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def append(self, action: str, detail: dict[str, Any] | None = None, *, durable: bool = True) -> AuditEvent:
        """Append one event and return it; :class:`AuditError` if it could not be written.

        ``durable``: synced to disk before this returns. A non-durable event is in the log (other readers see
        it) and becomes durable with the next durable one, since the write-ahead log is synced in order: a
        query's "received" record is written so, its decision durably before anything is released.
        """
        if not action or len(action) > 80 or "\x00" in action:
            raise ValueError("an audit action is 1 to 80 characters, without NUL")
        detail_json = canonical_json(detail or {})
        if len(detail_json) > MAX_ENTRY_DETAIL:
            raise ValueError(f"the detail of audit action {action!r} is {len(detail_json)} characters of JSON; "
                             f"at most {MAX_ENTRY_DETAIL} are logged")
        at = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        try:
            with self._connect(durable=durable) as conn, sqlite.immediate(conn):
                seq, prev = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
                frontier = _frontier_at_head(conn, seq)
                seq += 1
                data = entry_leaf_data(seq=seq, at=at, action=action, detail=detail_json, prev_hash=prev)
                digest = entry_chain_hash(data)
                conn.execute("INSERT INTO events (seq, at, action, detail, prev_hash, hash) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (seq, at, action, detail_json, prev, digest))
                _store(conn, frontier.append(leaf_hash(data)))
                conn.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, digest))
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(self.path)!r} cannot be written: {exc}") from None
        return AuditEvent(seq=seq, at=at, action=action, detail=json.loads(detail_json), prev_hash=prev,
                          hash=digest)

    def record(self, action: str, detail: dict[str, Any]) -> None:
        """Append an event that nothing waits on: one that cannot be written is logged, never raised."""
        try:
            self.append(action, detail)
        except (AuditError, ValueError) as exc:
            _logger.error("cannot audit %s: %s", action, " ".join(str(exc).split()))

    def head(self) -> tuple[int, str]:
        with self._connect() as conn:
            seq, digest = conn.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
        return int(seq), str(digest)

    def size(self) -> int:
        """The number of entries in the log (the tree's size)."""
        return self.head()[0]

    def nodes(self, keys: Iterable[Key]) -> dict[Key, bytes]:
        """The stored hashes of the given perfect subtrees (:class:`~edge_runtime.merkle.Tree`)."""
        with self._connect() as conn:
            return _nodes(conn, keys)

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` entries (all of them by default)."""
        with self._snapshot() as (_, tree, current):
            return merkle_root(tree, current if size is None else _within(size, current))

    def inclusion_proof(self, seq: int, size: int | None = None) -> tuple[int, list[bytes]]:
        """(tree size, proof) that entry ``seq`` is leaf ``seq - 1`` of the tree of ``size`` (now: the whole log)."""
        with self._snapshot() as (_, tree, current):
            size = current if size is None else _within(size, current)
            if not 1 <= seq <= size:
                raise ValueError(f"entry #{seq} is not in the audit log's tree of {size} entries")
            return size, merkle_inclusion_proof(tree, seq - 1, size)

    def witness(self) -> WitnessState:
        """What the control plane, as this log's witness, holds of it."""
        with self._connect() as conn:
            return read_witness(conn)

    def upload(self, key: Ed25519PrivateKey, origin: str) -> AuditUpload:
        """This sync's upload: a checkpoint of the whole log signed by ``key`` as ``origin``, the entries the
        control plane lacks (a batch) and the two consistency proofs (see :mod:`edge_runtime.audit_upload`)."""
        try:
            with self._snapshot() as (conn, tree, size):
                return build_upload(conn, tree, size, key=key, origin=origin)
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(self.path)!r} cannot be read: {exc}") from None

    def uploads(self, key: Ed25519PrivateKey, origin: str) -> list[AuditUpload]:
        """Every entry the control plane lacks, as uploads of one checkpoint in order (one, at least), for a
        bundle out: each upload starts where the one before ended, and all carry the same cosigned size."""
        try:
            with self._snapshot() as (conn, tree, size):
                uploads = [build_upload(conn, tree, size, key=key, origin=origin)]
                while uploads[-1].end < size:
                    uploads.append(build_upload(conn, tree, size, key=key, origin=origin, start=uploads[-1].end))
                return uploads
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(self.path)!r} cannot be read: {exc}") from None

    def acknowledge(self, upload: AuditUpload, ack: AuditAck) -> str | None:
        """Keep what the control plane's answer to ``upload`` says; returns what is wrong, None if nothing is.

        With ``ok`` (and ``refused``, which says where the control plane stands so that the next upload fits)
        its counts of stored entries and of the last size it cosigned are taken as they are, also when they
        went down: a control plane restored from a backup gets those entries again (it stores them
        idempotently by seq) and a proof from a checkpoint it knows. With ``ok`` the cosigned checkpoint is
        kept if it is the one sent. Any other state changes nothing.
        """
        if ack.state not in ("ok", "refused"):
            return f"the control plane did not accept the audit log ({ack.state}): {ack.message or 'no reason given'}"
        sent = sent_checkpoint(upload)
        note, problem = cosigned_note(upload, ack.cosigned) if ack.state == "ok" else ("", None)
        try:
            with self._connect() as conn, sqlite.immediate(conn):
                conn.execute("UPDATE witness SET stored = ?, cosigned_size = ? WHERE id = 1",
                             (max(0, min(ack.stored, sent.size)), max(0, min(ack.cosigned_size, sent.size))))
                if note:
                    conn.execute("UPDATE witness SET note_size = ?, note_root = ?, note = ? WHERE id = 1",
                                 (sent.size, sent.root.hex(), note))
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {str(self.path)!r} cannot be written: {exc}") from None
        if ack.state == "refused":
            return f"the control plane refused the audit upload: {ack.message or 'no reason given'}"
        return problem

    def events_after(self, seq: int = 0, limit: int = 500) -> list[AuditEvent]:
        """Events with a seq above ``seq``, oldest first."""
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


def _within(size: int, current: int) -> int:
    if not 0 <= size <= current:
        raise ValueError(f"the audit log holds {current} entries, not {size}")
    return size

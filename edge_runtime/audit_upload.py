"""What the node's audit log sends its witness, the control plane, and what it keeps of the answer.

:func:`build_upload` makes the :class:`~edge_runtime.protocol.AuditUpload` of
one sync from one read snapshot of the log (:meth:`edge_runtime.audit.NodeAudit.upload`):

* a checkpoint of the **whole** log, signed with the node's identity key
  under the log's origin, on every sync (also when nothing new was logged), so
  the control plane always holds a fresh, signed statement of the log's state;
* the entries from ``stored`` (what the control plane said it holds) on, at
  most :data:`~edge_runtime.protocol.audit.AUDIT_BATCH_MAX` of them and
  :data:`~edge_runtime.protocol.audit.AUDIT_BATCH_BYTES` of JSON, and always
  one at least when any is pending, so a backlog drains whatever its entries' size;
* a consistency proof from the last checkpoint the control plane cosigned to
  this one, and one from the end of the batch to this one.

A log that holds fewer entries than the control plane cosigned (its tail was
dropped) cannot prove anything from there: the upload says so by carrying
the cosigned size with no proof, and the control plane flags the fork.

:func:`cosigned_note` checks the control plane's answer: the note it returns
must be exactly the checkpoint this node sent, with a cosignature added. The
witness's key is not checked here (the node does not hold it yet): the note
is kept as it came, for an auditor to check.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edge_runtime.merkle import Tree, consistency_proof, root
from edge_runtime.notes import Checkpoint, NoteError, parse_note, sign_note
from edge_runtime.protocol.audit import AUDIT_BATCH_BYTES, AUDIT_BATCH_MAX, AuditUpload, LogEntry, encode_proof

logger = logging.getLogger("edge_runtime.audit")

# A cosignature's blob after its key id: an 8-byte timestamp and an Ed25519 signature.
_COSIGNATURE_BLOB = 8 + 64


class AuditError(Exception):
    """The audit log cannot be written or read; nothing that needed the record went ahead."""


@dataclass(frozen=True)
class WitnessState:
    """What the control plane holds of this node's log, as its last answers said."""

    # Entries the control plane holds: the next upload starts after them.
    stored: int = 0
    # The size of the last checkpoint the control plane says it cosigned: the next proof starts there.
    cosigned_size: int = 0
    # The last cosigned checkpoint this node received: its size, root (hex) and the note (0 and "": none yet).
    note_size: int = 0
    note_root: str = ""
    note: str = ""


def read_witness(conn: sqlite3.Connection) -> WitnessState:
    stored, cosigned_size, note_size, note_root, note = conn.execute(
        "SELECT stored, cosigned_size, note_size, note_root, note FROM witness WHERE id = 1").fetchone()
    return WitnessState(stored=int(stored), cosigned_size=int(cosigned_size), note_size=int(note_size),
                        note_root=str(note_root), note=str(note))


def _batch(conn: sqlite3.Connection, start: int, size: int) -> list[LogEntry]:
    """The entries after ``start``, as many as one upload carries (one at least, if any is there)."""
    rows = conn.execute("SELECT seq, at, action, detail, prev_hash FROM events WHERE seq > ? AND seq <= ? "
                        "ORDER BY seq LIMIT ?", (start, size, AUDIT_BATCH_MAX)).fetchall()
    entries: list[LogEntry] = []
    total = 0
    for seq, at, action, detail, prev_hash in rows:
        try:
            entry = LogEntry(seq=seq, at=at, action=action, detail=detail, prev_hash=prev_hash)
        except ValidationError as exc:
            raise AuditError(f"record #{seq} of the audit log cannot be uploaded: "
                             f"{exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
        total += len(entry.model_dump_json().encode()) + 1  # and the comma between entries
        if entries and total > AUDIT_BATCH_BYTES:
            break
        entries.append(entry)
    return entries


def build_upload(conn: sqlite3.Connection, tree: Tree, size: int, *, key: Ed25519PrivateKey,
                 origin: str, start: int | None = None) -> AuditUpload:
    """The upload of the log of ``size`` entries that ``conn`` and ``tree`` see (one read transaction).

    ``start``: the entries after this one (default: after what the control plane holds); a bundle out
    carries several uploads of one checkpoint, each starting where the one before ended.

    Raises AuditError when the log cannot make one (a record that breaks the wire contract, a tree that
    lacks a subtree, an origin that is no key name); sqlite3.Error when the file cannot be read.
    """
    witness = read_witness(conn)
    start = min(witness.stored if start is None else start, size)
    try:
        entries = _batch(conn, start, size)
        checkpoint = sign_note(Checkpoint(origin, size, root(tree, size)).body(), origin, key)
        if witness.cosigned_size <= size:
            from_cosigned = consistency_proof(tree, witness.cosigned_size, size)
        else:
            logger.error("the audit log holds %d entries, fewer than the %d its witness cosigned: it was cut "
                         "short on this node", size, witness.cosigned_size)
            from_cosigned = []
        return AuditUpload(checkpoint=checkpoint, cosigned_size=witness.cosigned_size,
                           proof_from_cosigned=encode_proof(from_cosigned), start=start, entries=entries,
                           proof_from_batch=encode_proof(consistency_proof(tree, start + len(entries), size)))
    except (LookupError, NoteError) as exc:
        raise AuditError(f"the audit log's upload cannot be built: {exc}") from None
    except ValidationError as exc:
        raise AuditError(f"the audit log's upload cannot be built: {exc.errors()[0]['msg']}") from None


def sent_checkpoint(upload: AuditUpload) -> Checkpoint:
    """The checkpoint this node signed into ``upload``."""
    try:
        return Checkpoint.parse(parse_note(upload.checkpoint).text)
    except NoteError as exc:
        raise AuditError(f"the upload's checkpoint is not one this node signed: {exc}") from None


def cosigned_note(upload: AuditUpload, cosigned: str) -> tuple[str, str | None]:
    """(the cosigned note to keep or "", what is wrong with it or None)."""
    if not cosigned:
        return "", None
    try:
        note = parse_note(cosigned)
    except NoteError as exc:
        return "", f"the control plane's cosigned checkpoint is not a signed note: {exc}"
    if note.text != parse_note(upload.checkpoint).text:
        return "", "the control plane cosigned a checkpoint other than the one this node sent; not kept"
    if not any(len(signature.blob) == _COSIGNATURE_BLOB for signature in note.signatures):
        return "", "the control plane's cosigned checkpoint carries no cosignature; not kept"
    return cosigned, None

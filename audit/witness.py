"""The control plane as the witness of every node's audit log.

On each sync a node uploads its signed checkpoint, the entries this control
plane lacks and two consistency proofs (:class:`edge_runtime.protocol.AuditUpload`).
:func:`node_log_ingest` takes it in the sync's transaction:

1. the checkpoint must verify with the node's registered identity key and name
   the node's log;
2. the proof from the last checkpoint this control plane cosigned must verify:
   a log that shrank, or whose history changed since, is **forked**;
3. entries are stored idempotently by index (one already stored must be the
   same leaf, else forked), and when they pass a cosigned size the tree they
   make must have that checkpoint's root (else forked);
4. the proof from the end of the batch to the checkpoint must verify (the
   entries are the checkpoint's);
5. the checkpoint is cosigned (C2SP cosignature, the audit log key, the time).

A forked log is flagged once (an audit event, the console's banner, the node's
page), keeps the node's signed checkpoint as evidence, and takes nothing more:
it is never silently accepted. Verification of what is stored, against the
checkpoints, is :mod:`audit.node_verify`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import transaction
from django.utils import timezone

from audit import checkpoints
from audit.log_models import NodeLog, NodeLogCheckpoint, NodeLogEntry, NodeLogState
from audit.models import AuditEvent
from audit.services import Actor, audit_record
from audit.trees import TreeStore
from edge_runtime import merkle, notes, protocol
from edge_runtime.audit import node_log_origin
from edge_runtime.protocol.audit import AuditState, decode_proof


class Forked(Exception):
    """The upload proves the node's log is not the one this control plane witnessed."""


class Refused(Exception):
    """The upload cannot be taken as it is (nothing was stored); the message says why."""


@dataclasses.dataclass
class Ingest:
    log: NodeLog
    upload: protocol.AuditUpload
    checkpoint: notes.Checkpoint
    tree: TreeStore
    frontier: merkle.Frontier


def node_log_ingest(*, node_uuid: uuid.UUID, site_uuid: uuid.UUID, public_key: Ed25519PublicKey | None,
                    key_mismatch: bool, upload: protocol.AuditUpload) -> protocol.AuditAck:
    """Take one upload (inside the sync's transaction) and say what became of it."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("node_log_ingest runs inside the transaction of the node's sync")
    log = _log_locked(node_uuid, site_uuid)
    if public_key is None:
        return _ack(log, "no_identity_key",
                    message="the control plane has no identity key of this node: nothing was taken")
    if key_mismatch:
        return _ack(log, "identity_key_mismatch",
                    message="this node presents another identity key than the one registered; an operator must "
                            "accept it on the node's page before its log is taken")
    if log.state == NodeLogState.FORKED:
        return _ack(log, "forked", message=log.fork_reason)
    try:
        with transaction.atomic():  # a fork found part-way stores none of the upload
            ingest = _opened(log, upload, public_key)
            _check_extends_cosigned(ingest)
            _store_entries(ingest)
            _check_batch_proof(ingest)
            cosigned = _cosign(ingest)
    except Refused as exc:
        log.refresh_from_db()
        return _ack(log, "refused", message=str(exc))
    except Forked as exc:
        log.refresh_from_db()
        _flag_forked(log, str(exc), upload.checkpoint)
        return _ack(log, "forked", message=str(exc))
    return _ack(log, "ok", cosigned=cosigned)


def _ack(log: NodeLog, state: AuditState, *, message: str = "", cosigned: str = "") -> protocol.AuditAck:
    return protocol.AuditAck(state=state, stored=log.stored, cosigned_size=log.cosigned_size, cosigned=cosigned,
                             message=message)


def _log_locked(node_uuid: uuid.UUID, site_uuid: uuid.UUID) -> NodeLog:
    log, _ = NodeLog.objects.select_for_update().get_or_create(
        node_uuid=node_uuid, defaults={"site_uuid": site_uuid, "origin": node_log_origin(str(node_uuid))})
    return log


def _opened(log: NodeLog, upload: protocol.AuditUpload, public_key: Ed25519PublicKey) -> Ingest:
    try:
        _, checkpoint = notes.open_checkpoint(upload.checkpoint, log.origin, public_key)
    except notes.NoteError as exc:
        raise Refused(f"the checkpoint does not verify with this node's identity key: {exc}") from None
    if checkpoint.origin != log.origin:
        raise Refused(f"the checkpoint is of the log {checkpoint.origin!r}, not this node's {log.origin!r}")
    if checkpoint.size < max(log.cosigned_size, log.stored):
        raise Forked(f"the node's log shrank: it signed a checkpoint of {checkpoint.size} entries after this "
                     f"control plane cosigned {log.cosigned_size} and holds {log.stored}")
    if upload.end > checkpoint.size:
        raise Refused(f"the entries run to #{upload.end}, past the checkpoint's {checkpoint.size}")
    frontier = merkle.Frontier(log.stored, [bytes.fromhex(h) for h in log.frontier])
    return Ingest(log, upload, checkpoint, TreeStore(str(log.node_uuid)), frontier)


def _cosigned_root(log: NodeLog, size: int) -> bytes | None:
    if size == 0:
        return merkle.EMPTY_ROOT
    if size == log.cosigned_size:
        return bytes.fromhex(log.cosigned_root)
    row = NodeLogCheckpoint.objects.filter(node_uuid=log.node_uuid, size=size).values_list("root", flat=True).first()
    return bytes.fromhex(row) if row else None


def _check_extends_cosigned(ingest: Ingest) -> None:
    old = ingest.upload.cosigned_size
    old_root = _cosigned_root(ingest.log, old)
    if old_root is None:
        raise Refused(f"this control plane never cosigned a checkpoint of {old} entries of this log")
    if not merkle.verify_consistency(old, ingest.checkpoint.size, old_root, ingest.checkpoint.root,
                                     decode_proof(ingest.upload.proof_from_cosigned)):
        raise Forked(f"the node's checkpoint of {ingest.checkpoint.size} entries does not extend the checkpoint of "
                     f"{old} entries this control plane cosigned: its history changed")


def _store_entries(ingest: Ingest) -> None:
    log, upload = ingest.log, ingest.upload
    if upload.start > log.stored:
        raise Refused(f"the entries start at #{upload.start + 1}; this control plane holds {log.stored}: "
                      f"send from #{log.stored + 1}")
    entries = upload.entries
    duplicates = entries[: max(0, log.stored - upload.start)]
    if duplicates:
        stored = ingest.tree.nodes((0, e.seq - 1) for e in duplicates)
        for entry in duplicates:
            if stored.get((0, entry.seq - 1)) != entry.leaf_hash():
                raise Forked(f"entry #{entry.seq} differs from the one this control plane stored")
    fresh = entries[len(duplicates):]
    if not fresh:
        return
    checks: dict[int, str] = {}
    if log.stored < log.cosigned_size:
        # A backlog: checkpoints were cosigned beyond what is stored; the entries must make each of them.
        checks = dict(NodeLogCheckpoint.objects.filter(node_uuid=log.node_uuid, size__gt=log.stored,
                                                       size__lte=fresh[-1].seq).values_list("size", "root"))
        if log.cosigned_size <= fresh[-1].seq:
            checks[log.cosigned_size] = log.cosigned_root
    now, completed = timezone.now(), []
    for entry in fresh:
        completed.extend(ingest.frontier.append(entry.leaf_hash()))
        expected = checks.get(entry.seq)
        if expected is not None and ingest.frontier.root().hex() != expected:
            raise Forked(f"the entries up to #{entry.seq} do not make the checkpoint of {entry.seq} entries this "
                         "control plane cosigned")
    ingest.tree.add(completed)
    NodeLogEntry.objects.bulk_create([_entry_row(log, entry, now) for entry in fresh], batch_size=1000)
    log.stored = ingest.frontier.size
    log.frontier = [h.hex() for h in ingest.frontier.hashes]


def _entry_row(log: NodeLog, entry: protocol.LogEntry, now: dt.datetime) -> NodeLogEntry:
    try:
        created = dt.datetime.fromisoformat(entry.at)
        created = created if created.tzinfo else created.replace(tzinfo=dt.UTC)
    except ValueError:
        created = now  # the node's clock text is kept as sent; it is only ordered by arrival
    return NodeLogEntry(node_uuid=log.node_uuid, site_uuid=log.site_uuid, seq=entry.seq, at=entry.at,
                        created_at=created, action=entry.action, detail=entry.detail, prev_hash=entry.prev_hash,
                        received_at=now)


def _check_batch_proof(ingest: Ingest) -> None:
    end, size = ingest.upload.end, ingest.checkpoint.size
    if end == 0 or end > ingest.log.stored:
        return  # nothing sent (the proof from the cosigned checkpoint covered the checkpoint)
    root_at_end = (ingest.frontier.root() if end == ingest.frontier.size else merkle.root(ingest.tree, end))
    if not merkle.verify_consistency(end, size, root_at_end, ingest.checkpoint.root,
                                     decode_proof(ingest.upload.proof_from_batch)):
        raise Forked(f"the entries up to #{end} are not the first {end} of the node's checkpoint of {size} entries")


def _cosign(ingest: Ingest) -> str:
    log, checkpoint = ingest.log, ingest.checkpoint
    key = checkpoints.checkpoint_key()
    note = notes.add_cosignature(ingest.upload.checkpoint, key.name, key.private, int(time.time()))
    if checkpoint.size > log.cosigned_size or ingest.upload.entries:
        now = timezone.now()
        if checkpoint.size > log.cosigned_size:
            NodeLogCheckpoint.objects.create(node_uuid=log.node_uuid, site_uuid=log.site_uuid, size=checkpoint.size,
                                             root=checkpoint.root.hex(), note=note, cosigned_at=now)
            log.cosigned_size, log.cosigned_root, log.cosigned_note, log.cosigned_at = (
                checkpoint.size, checkpoint.root.hex(), note, now)
        log.save(update_fields=["stored", "frontier", "cosigned_size", "cosigned_root", "cosigned_note", "cosigned_at",
                                "updated_at"])
    return note


def _flag_forked(log: NodeLog, reason: str, evidence: str) -> None:
    log.state, log.forked_at, log.fork_reason, log.fork_evidence = (
        NodeLogState.FORKED, timezone.now(), reason[:500], evidence)
    log.save(update_fields=["state", "forked_at", "fork_reason", "fork_evidence", "updated_at"])
    audit_record(actor=Actor.system("witness"), action="node.audit_forked", site_uuid=log.site_uuid,
                 object_repr=f"audit log of node {log.node_uuid}",
                 after={"node": str(log.node_uuid), "reason": reason, "cosigned_size": log.cosigned_size,
                        "stored": log.stored})


# -- node heads in the control plane's own log ----------------------------------------------------------------------

NODE_HEADS_ACTION = "audit.node_heads"
NODE_HEADS_MAX = 5000


def node_heads_record() -> int:
    """Append one event listing the node checkpoints cosigned since the last such event; returns how many.

    Sequenced into the control plane's next checkpoint, which the anchors keep
    outside the database: a node log rewritten later, with all its hashes
    recomputed, no longer has the root the control plane's log recorded.
    """
    with transaction.atomic():
        last = (AuditEvent.objects.filter(action=NODE_HEADS_ACTION).order_by("-seq")
                .values_list("after", flat=True).first())
        through = int(last.get("through", 0)) if isinstance(last, dict) else 0
        rows = list(NodeLogCheckpoint.objects.filter(pk__gt=through).order_by("pk")
                    .values_list("pk", "node_uuid", "site_uuid", "size", "root")[:NODE_HEADS_MAX])
        if not rows:
            return 0
        heads: dict[str, Any] = {str(node): [size, root] for _, node, _, size, root in rows}
        audit_record(actor=Actor.system("witness"), action=NODE_HEADS_ACTION, object_repr=f"{len(heads)} node logs",
                     after={"through": rows[-1][0], "heads": heads})
    return len(heads)

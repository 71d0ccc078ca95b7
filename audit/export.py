"""The auditor's export: the whole estate's audit trail as one bundle, which ``edge-runtime audit-verify`` checks.

The bundle's format is :mod:`edge_runtime.audit_bundle` (version 1). It
holds the control plane's log (every position, its event's leaf data exactly
as the leaf was computed), every signed checkpoint of it, oldest first, with
the consistency proofs between successive ones; and every node log the
control plane witnessed, with its entries, the checkpoints it cosigned, their
proofs and the node's verifier key.

What the export guarantees:

* It first takes a checkpoint (:func:`audit.checkpoints.checkpoint_take`), so
  the control plane's log in the bundle ends at a fresh signed checkpoint; it
  holds the positions below that checkpoint's size and nothing after, so a
  checkpoint signed while it runs changes nothing in it.
* Entries are streamed from the database in batches of ``BATCH`` rows
  (``values_list``) and written straight into the zip: a log of a million
  entries is never held in memory.
* Each entry is checked against the leaf stored when it was logged (the
  control plane's ``AuditLogLeaf``; a node's level-0 ``TreeNode``). A record
  changed since is refused, naming its position (or node and ``#seq``): the
  export never writes a bundle from a log it knows to be altered. A rewrite
  that also recomputed the stored leaves is caught by the verifier, against
  the signed checkpoints.
* A node's log is bounded by what was stored when it was read (entries up to
  ``NodeLog.stored``, the cosigned checkpoints up to that size); each of its
  checkpoints in the bundle verify with the node's registered identity key (a
  bundle names one key per node log). Checkpoints signed with a key the node
  held before an operator accepted its current one are left out and counted
  in the summary: a later checkpoint covers their entries. A log with no
  checkpoint under its current key (its node has not synced since) is
  refused, naming the node.
  A log that stores no entry (a node that has not uploaded any) is left out.
* A node whose backlog is still arriving may have had a checkpoint cosigned
  beyond what is stored; the summary lists such logs in ``incomplete``: the
  verifier will report that the control plane recorded more of them than the
  bundle holds, until the node has uploaded the rest and a new export is made.

The node's identity key lives in the sites app, which sits above this one: it
registers a lookup with :func:`node_keys_register` from its AppConfig.ready().
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from django.db import transaction
from pydantic import ValidationError

from audit.checkpoints import checkpoint_latest, checkpoint_take
from audit.log_key import log_key
from audit.log_models import CONTROL_PLANE_LOG, NodeLog, NodeLogCheckpoint, NodeLogEntry, TreeNode
from audit.models import LEAF_FIELDS, AuditCheckpoint, AuditLogLeaf, leaf_data
from audit.services import Actor, audit_record
from audit.trees import TreeStore
from edge_runtime import merkle, notes, signing
from edge_runtime.audit_bundle import BundleWriter, proofs_between
from edge_runtime.protocol.audit import LogEntry

BATCH = 5000
EXPORT_ACTION = "audit.export"

# Node uuid -> its identity key (base64 of the raw Ed25519 public key); the sites app registers it.
_node_keys: list[Callable[[Iterable[str]], Mapping[Any, str]]] = []


def node_keys_register(source: Callable[[Iterable[str]], Mapping[Any, str]]) -> None:
    """Register what maps node uuids to their identity keys (called from an AppConfig.ready())."""
    if source not in _node_keys:
        _node_keys.append(source)


def node_keys(uuids: Iterable[str]) -> dict[str, str]:
    """The registered identity keys of the nodes among ``uuids`` (base64 raw Ed25519), by node uuid."""
    wanted = {str(u) for u in uuids}
    found: dict[str, str] = {}
    for source in _node_keys:
        found.update({str(node): key for node, key in source(wanted).items() if key})
    return found


def may_export(user: Any) -> bool:
    """Whether ``user`` may export the whole trail: it holds every site's events, so only estate-wide readers."""
    return bool(user.is_authenticated and user.is_active
                and (user.is_superuser or user.has_perm("audit.view_auditevent")))


def node_vkey(origin: str, key_b64: str) -> str:
    """The C2SP verifier key of a node's log: its identity key, named after the log's origin."""
    return notes.vkey(origin, signing.public_key_from_b64(key_b64))


class ExportError(Exception):
    """The trail cannot be exported as it is stored; the message names the record or the log."""


@dataclasses.dataclass
class ExportSummary:
    """What a bundle holds, and the key an auditor pins to check it."""

    origin: str
    vkey: str
    checkpoint_size: int = 0
    checkpoint_root: str = ""
    entries: int = 0
    checkpoints: int = 0
    nodes: int = 0
    node_entries: int = 0
    node_checkpoints: int = 0
    bytes: int = 0
    # Node logs with a checkpoint cosigned beyond the entries stored yet: (node, stored, cosigned size).
    incomplete: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    # Node logs with checkpoints signed by an identity key the node held before its current one: (node, count).
    earlier_key: list[tuple[str, int]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        text = [f"control plane log: {self.entries} entries, {self.checkpoints} checkpoints, "
                f"the last of size {self.checkpoint_size} (root {self.checkpoint_root})",
                f"node logs: {self.nodes}, {self.node_entries} entries, {self.node_checkpoints} cosigned checkpoints",
                f"{self.bytes} bytes"]
        text += [f"warning: node {node}: a checkpoint of {cosigned} entries was cosigned but {stored} are stored "
                 "yet; export again once it has uploaded the rest" for node, stored, cosigned in self.incomplete]
        text += [f"note: node {node}: {count} checkpoints signed with an earlier identity key left out (the later "
                 "ones cover their entries)" for node, count in self.earlier_key]
        return text


def audit_export(target: str | Path | BinaryIO, *, actor: Actor | None = None) -> ExportSummary:
    """Write the estate's audit bundle to ``target`` (a path, or a seekable binary file); ExportError if refused.

    A path is removed again when the export is refused. With ``actor``, the
    export is recorded in the audit trail (``audit.export``: who, and sizes).
    """
    checkpoint_take()
    key, latest = log_key(), checkpoint_latest()
    if latest is None:  # checkpoint_take signs one whenever the log has none
        raise ExportError("the audit log has no checkpoint: nothing vouches for any of it")
    summary = ExportSummary(origin=key.name, vkey=key.vkey, checkpoint_size=latest.size, checkpoint_root=latest.root)
    try:
        with BundleWriter(target, origin=key.name, vkey=key.vkey) as bundle:
            _control_plane(bundle, latest.size, summary)
            logs = list(NodeLog.objects.filter(stored__gt=0).order_by("node_uuid"))
            keys = node_keys(str(log.node_uuid) for log in logs)
            for log in logs:
                _node(bundle, log, keys.get(str(log.node_uuid)), summary)
    except BaseException:
        if isinstance(target, str | Path):
            Path(target).unlink(missing_ok=True)
        raise
    summary.bytes = _size(target)
    if actor is not None:
        with transaction.atomic():
            audit_record(actor=actor, action=EXPORT_ACTION, object_repr="audit bundle of the estate",
                         after={k: v for k, v in summary.to_json().items() if k not in ("vkey", "incomplete")})
    return summary


def _size(target: str | Path | BinaryIO) -> int:
    if isinstance(target, str | Path):
        return os.stat(target).st_size
    return target.seek(0, os.SEEK_END)


# -- the control plane's log ----------------------------------------------------------------------------------------

def _control_plane(bundle: BundleWriter, size: int, summary: ExportSummary) -> None:
    sizes_notes = list(AuditCheckpoint.objects.filter(size__lte=size).order_by("size").values_list("size", "note"))
    sizes = [s for s, _ in sizes_notes]
    bundle.control_plane(entries=_control_plane_entries(size, summary), checkpoints=[n for _, n in sizes_notes],
                         proofs=proofs_between(TreeStore(CONTROL_PLANE_LOG), sizes))
    summary.checkpoints = len(sizes_notes)


def _control_plane_entries(size: int, summary: ExportSummary) -> Iterator[tuple[int, str]]:
    """(position, leaf data) for positions 0..size-1, each checked against its stored leaf; ExportError if not."""
    fields = [f"event__{name}" for name in LEAF_FIELDS]
    for start in range(0, size, BATCH):
        end = min(start + BATCH, size)
        rows = (AuditLogLeaf.objects.filter(position__gte=start, position__lt=end).order_by("position")
                .values_list("position", "leaf", *fields))
        expected = start
        for position, leaf, *values in rows:
            if position != expected:
                raise ExportError(f"position {expected} of the control plane's log is missing from the database")
            data = leaf_data(tuple(values))
            if merkle.leaf_hash(data) != bytes(leaf):
                raise ExportError(f"position {position} of the control plane's log (event #{values[0]}, "
                                  f"{values[5]}) does not match the leaf logged for it: the record was changed")
            yield position, data.decode()
            expected += 1
        if expected != end:
            raise ExportError(f"position {expected} of the control plane's log is missing from the database")
        summary.entries = end


# -- the nodes' logs ------------------------------------------------------------------------------------------------

def _node(bundle: BundleWriter, log: NodeLog, key_b64: str | None, summary: ExportSummary) -> None:
    node = str(log.node_uuid)
    if not key_b64:
        raise ExportError(f"the control plane holds no identity key of node {node}, whose log holds {log.stored} "
                          "entries: its checkpoints cannot be checked")
    vkey = node_vkey(log.origin, key_b64)
    name, public = notes.parse_vkey(vkey)
    rows = []
    earlier_key = 0
    for size, note in (NodeLogCheckpoint.objects.filter(node_uuid=log.node_uuid, size__lte=log.stored)
                       .order_by("size").values_list("size", "note")):
        try:
            notes.open_checkpoint(note, name, public)
        except notes.NoteError:
            # Signed with a key the node held before an operator accepted its current one: the later
            # checkpoints, signed with the current key, cover the same entries and more.
            earlier_key += 1
            continue
        rows.append((size, note))
    if not rows:
        raise ExportError(f"no cosigned checkpoint of node {node}'s log verifies with the node's registered "
                          f"identity key ({log.stored} entries stored): if a new key was accepted, the node has not "
                          "synced with it yet; export again after its next sync")
    if earlier_key:
        summary.earlier_key.append((node, earlier_key))
    if NodeLogCheckpoint.objects.filter(node_uuid=log.node_uuid, size__gt=log.stored).exists():
        summary.incomplete.append((node, log.stored, log.cosigned_size))
    sizes = [size for size, _ in rows]
    bundle.node(node=node, site=str(log.site_uuid), origin=log.origin, vkey=vkey,
                entries=_node_entries(log, summary), checkpoints=[n for _, n in rows],
                proofs=proofs_between(TreeStore(node), sizes))
    summary.nodes += 1
    summary.node_checkpoints += len(rows)


def _node_entries(log: NodeLog, summary: ExportSummary) -> Iterator[LogEntry]:
    """The node's entries #1..#stored, each checked against its stored leaf; ExportError if not."""
    node = str(log.node_uuid)
    for start in range(1, log.stored + 1, BATCH):
        end = min(start + BATCH, log.stored + 1)
        leaves = dict(TreeNode.objects.filter(log=node, level=0, index__gte=start - 1, index__lt=end - 1)
                      .values_list("index", "hash"))
        rows = (NodeLogEntry.objects.filter(node_uuid=log.node_uuid, seq__gte=start, seq__lt=end).order_by("seq")
                .values_list("seq", "at", "action", "detail", "prev_hash"))
        expected = start
        for seq, at, action, detail, prev_hash in rows:
            if seq != expected:
                break
            entry = _entry(node, seq, at, action, detail, prev_hash)
            stored = leaves.get(seq - 1)
            if stored is None or entry.leaf_hash() != bytes(stored):
                raise ExportError(f"entry #{seq} of node {node}'s log does not match the leaf stored for it: "
                                  "the record was changed")
            yield entry
            expected += 1
        if expected != end:
            raise ExportError(f"entry #{expected} of node {node}'s log is missing from the database")
        summary.node_entries += end - start


def _entry(node: str, seq: int, at: str, action: str, detail: str, prev_hash: str) -> LogEntry:
    try:
        return LogEntry(seq=seq, at=at, action=action, detail=detail, prev_hash=prev_hash)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ExportError(f"entry #{seq} of node {node}'s log is not a valid entry "
                          f"({'.'.join(map(str, first['loc']))}: {first['msg']}): the record was changed") from None

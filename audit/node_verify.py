"""Verify the nodes' audit logs as this control plane stores them, against every checkpoint it cosigned.

What a node log must match, per node:

* the checkpoints recorded in the control plane's own log (``audit.node_heads``
  events): anchored outside the database with that log's checkpoints, so a
  rewrite that recomputed every hash and every table still differs from them;
* the cosigned checkpoints kept in the database, each checked first: its
  cosignature must verify with the audit log key and name the size and root
  the row says.

Entries are walked in seq order, their leaves recomputed from their fields;
the first entry whose leaf differs from the stored tree, a missing entry, a
root that differs at a checkpoint's size, and a log shorter than a
checkpoint are each named.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.log_key import LogKey
from audit.log_models import NodeLog, NodeLogCheckpoint, NodeLogEntry, TreeNode
from audit.models import AuditEvent
from audit.witness import NODE_HEADS_ACTION
from edge_runtime import merkle, notes
from edge_runtime.protocol.audit import entry_leaf_data


@dataclasses.dataclass(frozen=True)
class NodeLogBreak:
    node_uuid: str
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"node {self.node_uuid}: {self.reason}"


@dataclasses.dataclass
class NodeLogsReport:
    logs: int = 0
    entries: int = 0
    breaks: list[NodeLogBreak] = dataclasses.field(default_factory=list)


def node_logs_verify(key: LogKey | None = None, *, vkeys: Sequence[str] | None = None,
                     batch_size: int = 5000) -> NodeLogsReport:
    """Check every node log; the report names at most the first break of each.

    The cosignatures are checked with ``key``'s public half, or, given ``vkeys`` (verifier keys an auditor
    pinned), with any of those; NoteError if one of them is no verifier key.
    """
    if vkeys:
        cosigners = [notes.parse_vkey(text) for text in vkeys]
    elif key is not None:
        cosigners = [(key.name, key.public)]
    else:
        raise ValueError("node_logs_verify needs the audit log key or the verifier keys to check cosignatures with")
    report = NodeLogsReport()
    expected, breaks = _expected_heads(cosigners)
    report.breaks.extend(breaks)
    nodes = {str(u) for u in NodeLog.objects.values_list("node_uuid", flat=True)}
    nodes |= {str(u) for u in NodeLogEntry.objects.values_list("node_uuid", flat=True).distinct()}
    nodes |= set(expected)
    for node in sorted(nodes):
        report.logs += 1
        checked, brk = _verify_one(node, expected.get(node, {}), batch_size)
        report.entries += checked
        if brk is not None:
            report.breaks.append(brk)
    return report


def _cosigned(note: notes.Note, cosigners: Sequence[tuple[str, Ed25519PublicKey]]) -> None:
    """NoteError unless one of ``cosigners`` cosigned ``note``."""
    problem: notes.NoteError | None = None
    for name, public in cosigners:
        try:
            notes.verify_cosignature(note, name, public)
            return
        except notes.NoteError as exc:
            problem = exc
    assert problem is not None
    raise problem


def _expected_heads(cosigners: Sequence[tuple[str, Ed25519PublicKey]],
                    ) -> tuple[dict[str, dict[int, str]], list[NodeLogBreak]]:
    """Per node: checkpoint size -> root (hex) that its stored log must have."""
    expected: dict[str, dict[int, str]] = defaultdict(dict)
    breaks: list[NodeLogBreak] = []
    for after in AuditEvent.objects.filter(action=NODE_HEADS_ACTION).order_by("seq").values_list("after", flat=True):
        for node, (size, root) in (after or {}).get("heads", {}).items():
            expected[node][int(size)] = root
    rows = NodeLogCheckpoint.objects.order_by("node_uuid", "size").values_list("node_uuid", "size", "root", "note")
    for node_uuid, size, root, note in rows:
        node = str(node_uuid)
        try:
            parsed = notes.parse_note(note)
            _cosigned(parsed, cosigners)
            checkpoint = notes.Checkpoint.parse(parsed.text)
        except notes.NoteError as exc:
            breaks.append(NodeLogBreak(node, size, f"the cosigned checkpoint of {size} entries does not verify: {exc}"))
            continue
        if checkpoint.size != size or checkpoint.root.hex() != root:
            breaks.append(NodeLogBreak(node, size, f"the checkpoint row of {size} entries is not the checkpoint "
                                                   "its cosigned note holds (the row was altered)"))
            continue
        recorded = expected[node].get(size)
        if recorded is not None and recorded != root:
            breaks.append(NodeLogBreak(node, size, f"two roots for the checkpoint of {size} entries: the control "
                                                   "plane's log and the cosigned note differ"))
        expected[node][size] = root
    return expected, breaks


def _rows(node: str, batch_size: int) -> Iterator[tuple[int, str, str, str, str]]:
    last = 0
    while True:
        batch = list(NodeLogEntry.objects.filter(node_uuid=uuid.UUID(node), seq__gt=last).order_by("seq")
                     .values_list("seq", "at", "action", "detail", "prev_hash")[:batch_size])
        if not batch:
            return
        yield from batch
        last = batch[-1][0]


def _stored_leaves(node: str, start: int, end: int) -> dict[int, bytes]:
    rows = TreeNode.objects.filter(log=node, level=0, index__gte=start, index__lt=end).values_list("index", "hash")
    return {index: bytes(digest) for index, digest in rows}


def _verify_one(node: str, expected: dict[int, str], batch_size: int) -> tuple[int, NodeLogBreak | None]:
    frontier = merkle.Frontier()
    leaves: dict[int, bytes] = {}
    for seq, at, action, detail, prev_hash in _rows(node, batch_size):
        if seq != frontier.size + 1:
            return frontier.size, NodeLogBreak(node, frontier.size + 1, f"entry #{frontier.size + 1} is missing "
                                               f"(the next stored is #{seq})")
        if frontier.size % batch_size == 0:
            leaves = _stored_leaves(node, frontier.size, frontier.size + batch_size)
        leaf = merkle.leaf_hash(entry_leaf_data(seq=seq, at=at, action=action, detail=detail, prev_hash=prev_hash))
        if leaves.get(seq - 1) not in (None, leaf):
            return frontier.size, NodeLogBreak(node, seq, f"entry #{seq} does not match its leaf hash (it was "
                                               "altered)")
        frontier.append(leaf)
        root = expected.get(seq)
        if root is not None and frontier.root().hex() != root:
            return frontier.size, NodeLogBreak(node, seq, f"the entries up to #{seq} do not make the cosigned "
                                               f"checkpoint of {seq} entries: an entry at or before #{seq} was "
                                               "changed, inserted or reordered")
    if expected and frontier.size < max(expected):
        return frontier.size, NodeLogBreak(node, frontier.size + 1, f"the log holds {frontier.size} entries but the "
                                           f"control plane cosigned {max(expected)}: its tail is missing")
    return frontier.size, None

"""One entry's inclusion proof, as the file an auditor downloads from its page (``edge-runtime audit-verify FILE``).

A control plane event is proved in the log's latest signed checkpoint; a
node's entry in the latest checkpoint of the node's log that the control
plane cosigned and holds every entry of. The document format is
:mod:`edge_runtime.audit_inclusion`. An entry that no checkpoint covers yet,
or whose record no longer matches the leaf logged for it, has no proof:
:class:`NoProof` says why.
"""

from __future__ import annotations

from typing import Any

from audit.checkpoints import checkpoint_latest
from audit.export import node_keys, node_vkey
from audit.log_key import log_key
from audit.log_models import CONTROL_PLANE_LOG, NodeLog, NodeLogCheckpoint, NodeLogEntry
from audit.models import LEAF_FIELDS, AuditEvent, AuditLogLeaf, leaf_data
from audit.trees import TreeStore
from edge_runtime import merkle
from edge_runtime.audit_inclusion import inclusion_proof_document
from edge_runtime.protocol.audit import LogEntry


class NoProof(Exception):
    """The entry has no inclusion proof (yet); the message says why."""


def event_inclusion_proof(event: AuditEvent) -> dict[str, Any]:
    """The inclusion proof of a control plane event in the log's latest signed checkpoint."""
    leaf = AuditLogLeaf.objects.filter(event=event).values_list("position", "leaf").first()
    latest = checkpoint_latest()
    if leaf is None or latest is None or latest.size <= leaf[0]:
        raise NoProof(f"audit event #{event.seq} is not in a signed checkpoint yet; its proof can be downloaded "
                      "after the next checkpoint")
    position, stored = leaf
    values = AuditEvent.objects.filter(pk=event.pk).values_list(*LEAF_FIELDS).get()
    data = leaf_data(values)
    if merkle.leaf_hash(data) != bytes(stored):
        raise NoProof(f"audit event #{event.seq} does not match the leaf logged for it at position {position}: "
                      "the record was changed (run audit_verify)")
    proof = merkle.inclusion_proof(TreeStore(CONTROL_PLANE_LOG), position, latest.size)
    key = log_key()
    return inclusion_proof_document(origin=key.name, vkey=key.vkey, index=position, proof=proof,
                                    checkpoint=latest.note, leaf_data=data.decode())


def node_entry_inclusion_proof(entry: NodeLogEntry) -> dict[str, Any]:
    """The inclusion proof of a node's entry in the latest cosigned checkpoint of its log that covers it."""
    node = str(entry.node_uuid)
    log = NodeLog.objects.filter(node_uuid=entry.node_uuid).first()
    checkpoint = None
    if log is not None:
        checkpoint = (NodeLogCheckpoint.objects.filter(node_uuid=entry.node_uuid, size__gte=entry.seq,
                                                       size__lte=log.stored)
                      .order_by("-size").values_list("size", "note").first())
    if log is None or checkpoint is None:
        raise NoProof(f"entry #{entry.seq} of node {node}'s log is not in a cosigned checkpoint yet; its proof can "
                      "be downloaded once the node's next sync is cosigned")
    identity_key = node_keys([node]).get(node)
    if not identity_key:
        raise NoProof(f"the control plane holds no identity key of node {node}: its checkpoints cannot be checked")
    size, note = checkpoint
    document = LogEntry(seq=entry.seq, at=entry.at, action=entry.action, detail=entry.detail,
                        prev_hash=entry.prev_hash)
    stored = TreeStore(node).nodes([(0, entry.seq - 1)]).get((0, entry.seq - 1))
    if stored is None or document.leaf_hash() != stored:
        raise NoProof(f"entry #{entry.seq} of node {node}'s log does not match the leaf stored for it: the record "
                      "was changed (run audit_verify)")
    proof = merkle.inclusion_proof(TreeStore(node), entry.seq - 1, size)
    return inclusion_proof_document(origin=log.origin, vkey=node_vkey(log.origin, identity_key), index=entry.seq - 1,
                                    proof=proof, checkpoint=note, entry=document, cosigner_vkey=log_key().vkey)

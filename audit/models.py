"""The tamper-evident audit trail: one Merkle log for the whole estate (RFC 9162).

Every state change, by a person, a node or the system, appends one
:class:`AuditEvent` in the same transaction as the change, with its own
content hash and a row in the pending queue (:class:`AuditPending`); an
append takes no lock that other appends wait for. The checkpointer
(:mod:`audit.checkpoints`) then gives pending events their positions in the
log (:class:`AuditLogLeaf`), keeps the tree's subtree hashes
(:class:`audit.log_models.TreeNode`) and signs a checkpoint of the tree's
size and root (:class:`AuditCheckpoint`), which is also written outside the
database (:mod:`audit.anchors`). ``manage.py audit_verify`` recomputes the
tree from the records and compares it with every checkpoint it knows.

Events of the old hash chain (before the log) keep their ``prev_hash`` link;
new events have none. The tables are append-only for the application: the
models refuse updates and deletes, and on PostgreSQL and SQLite triggers
refuse them for any client of the application's role (migrations 0002, 0004).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from django.db import models

from core.permissions import RestrictedQuerySet, Scope
from edge_runtime.canonical import canonical_json

GENESIS_HASH = "0" * 64


class AppendOnlyError(Exception):
    """Raised on any attempt to change or remove an audit record."""


class ActorType(models.TextChoices):
    USER = "user", "User"  # a person in the console, the admin or a command
    NODE = "node", "Node"  # an edge runtime, authenticated by its credential
    SYSTEM = "system", "System"  # the control plane itself (sweeps, workers)


class AuditEventQuerySet(RestrictedQuerySet["AuditEvent"]):
    """Append-only: a queryset that refuses to update or delete."""

    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyError("audit events cannot be updated")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("audit events cannot be deleted")


class AuditEvent(models.Model):
    seq = models.BigIntegerField(unique=True, editable=False)
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    created_at = models.DateTimeField(editable=False, db_index=True)
    actor_type = models.CharField(max_length=10, choices=ActorType.choices)
    # Username, node uuid or "system": kept as text so that the record stays
    # meaningful after the user or node is gone.
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=80, db_index=True)
    object_type = models.CharField(max_length=80, blank=True)
    object_id = models.CharField(max_length=80, blank=True, db_index=True)
    object_repr = models.CharField(max_length=200, blank=True)
    # The site the change concerns, if any; scopes who may read the record.
    site_uuid = models.UUIDField(null=True, blank=True, db_index=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    # The hash of the event before it in the old hash chain; empty for events of the Merkle log.
    prev_hash = models.CharField(max_length=64, editable=False, blank=True)
    hash = models.CharField(max_length=64, unique=True, editable=False)

    objects = AuditEventQuerySet.as_manager()
    scope = Scope.site("site_uuid", key="uuid", bypass="audit.view_auditevent")

    class Meta:
        ordering = ["-seq"]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_repr}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("audit events cannot be updated")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("audit events cannot be deleted")

    def hashed_fields(self) -> dict[str, Any]:
        return hashed_fields(tuple(getattr(self, name) for name in LEAF_FIELDS))

    def leaf_data(self) -> bytes:
        """What the event's leaf in the log and its content hash are computed from."""
        return leaf_data(tuple(getattr(self, name) for name in LEAF_FIELDS))

    def compute_hash(self) -> str:
        return hashlib.sha256(self.leaf_data()).hexdigest()


# The fields an event's leaf covers, in the order ``leaf_data`` takes their values (as ``values_list`` reads them).
LEAF_FIELDS = ("seq", "uuid", "created_at", "actor_type", "actor", "action", "object_type", "object_id",
               "object_repr", "site_uuid", "before", "after", "source_ip", "prev_hash")


def hashed_fields(values: tuple[Any, ...]) -> dict[str, Any]:
    (seq, uid, created_at, actor_type, actor, action, object_type, object_id, object_repr, site_uuid, before, after,
     source_ip, prev_hash) = values
    return {
        "seq": seq, "uuid": str(uid), "created_at": created_at.isoformat(), "actor_type": actor_type,
        "actor": actor, "action": action, "object_type": object_type, "object_id": object_id,
        "object_repr": object_repr, "site_uuid": str(site_uuid) if site_uuid else None, "before": before,
        "after": after, "source_ip": source_ip, "prev_hash": prev_hash,
    }


def leaf_data(values: tuple[Any, ...]) -> bytes:
    """The canonical JSON of an event's hashed fields (``LEAF_FIELDS`` values): its leaf is ``leaf_hash`` of it.

    Defined once, for the appender, the checkpointer, the migration that
    sequenced the old chain and the verifier: changing it would make every
    signed checkpoint disagree with its records.
    """
    return canonical_json(hashed_fields(values)).encode()


class AuditPending(models.Model):
    """An event committed but not yet given a position in the log: the checkpointer's queue."""

    event = models.OneToOneField(AuditEvent, on_delete=models.PROTECT, primary_key=True, related_name="pending")

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    def __str__(self) -> str:
        return f"pending audit event {self.event_id}"


class AuditLogLeaf(models.Model):
    """An event's position in the control plane's Merkle log, and its leaf hash there. Written once."""

    position = models.BigIntegerField(unique=True)
    event = models.OneToOneField(AuditEvent, on_delete=models.PROTECT, related_name="log_leaf")
    leaf = models.BinaryField(max_length=32)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    def __str__(self) -> str:
        return f"audit log position {self.position}"

    @property
    def leaf_hex(self) -> str:
        return bytes(self.leaf).hex()


class AuditCheckpoint(models.Model):
    """A signed checkpoint of the log: its size and root, as a C2SP signed note (signed and timestamped)."""

    size = models.BigIntegerField(unique=True)
    root = models.CharField(max_length=64)  # hex, as in the note (where it is base64)
    note = models.TextField()
    created_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    class Meta:
        ordering = ["-size"]

    def __str__(self) -> str:
        return f"audit checkpoint {self.size}"


from audit.log_models import NodeLog, NodeLogCheckpoint, NodeLogEntry, NodeLogState, TreeNode  # noqa: E402  (Django finds them here)

__all__ = [
    "LEAF_FIELDS", "ActorType", "AppendOnlyError", "AuditCheckpoint", "AuditEvent", "AuditEventQuerySet",
    "AuditLogLeaf", "AuditPending", "NodeLog", "NodeLogCheckpoint", "NodeLogEntry", "NodeLogState", "TreeNode",
    "hashed_fields", "leaf_data",
]

"""The tamper-evident audit trail: one hash chain for the whole estate.

Every state change, by a person, a node or the system, appends one
:class:`AuditEvent` in the same transaction as the change. Each event's hash
covers its own fields and the previous event's hash, so altering, removing or
reordering any record breaks every hash after it; ``manage.py audit_verify``
recomputes the chain and names the first record that does not match.

The table is append-only for the application: the model refuses updates and
deletes, and on PostgreSQL a trigger refuses them for any client of the
application's role (see migration 0002).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from django.db import models

from core.permissions import RestrictedQuerySet, Scope
from edge_runtime.signing import canonical_json

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
    prev_hash = models.CharField(max_length=64, editable=False)
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
        return {
            "seq": self.seq,
            "uuid": str(self.uuid),
            "created_at": self.created_at.isoformat(),
            "actor_type": self.actor_type,
            "actor": self.actor,
            "action": self.action,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "object_repr": self.object_repr,
            "site_uuid": str(self.site_uuid) if self.site_uuid else None,
            "before": self.before,
            "after": self.after,
            "source_ip": self.source_ip,
            "prev_hash": self.prev_hash,
        }

    def compute_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.hashed_fields()).encode()).hexdigest()


class AuditChainHead(models.Model):
    """A single row: the chain's last sequence number and hash.

    Appenders lock it (``select_for_update``) so that events are chained one
    after another even when many transactions append at once.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default=GENESIS_HASH)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.estate()

    def __str__(self) -> str:
        return f"audit head #{self.seq}"


from audit.log_models import NodeLog, NodeLogCheckpoint, NodeLogEntry, NodeLogState, TreeNode  # noqa: E402  (Django finds them here)

__all__ = [
    "ActorType", "AppendOnlyError", "AuditChainHead", "AuditEvent", "AuditEventQuerySet", "NodeLog",
    "NodeLogCheckpoint", "NodeLogEntry", "NodeLogState", "TreeNode",
]

"""Appending to the audit log: one event per change, in the change's own transaction, with no global lock.

An append inserts the event, numbered from a database sequence (PostgreSQL;
SQLite, which serialises its writers, takes the next number), with its own
content hash, and queues it for the checkpointer (:class:`AuditPending`).
:func:`audit.checkpoints.checkpoint_take` gives queued events their positions
in the Merkle log and signs a checkpoint: every
``AUDIT_CHECKPOINT_INTERVAL_S`` (Celery beat), and sooner once a process has
appended ``AUDIT_CHECKPOINT_ENTRIES`` events.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import signature
from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Max
from django.http import HttpRequest
from django.utils import timezone

from audit.models import ActorType, AuditEvent, AuditPending
from audit.verify import VerifyReport, audit_verify

logger = logging.getLogger(__name__)

# The checkpointer's task (audit.tasks.checkpoint_take_task).
CHECKPOINT_TASK = "audit.checkpoint_take"
# The PostgreSQL sequence that numbers events (migration 0004).
SEQ_SEQUENCE = "audit_event_seq"

__all__ = ["CHECKPOINT_TASK", "Actor", "VerifyReport", "audit_record", "audit_verify", "client_ip"]


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who did something, and from where."""

    type: str
    label: str
    ip: str | None = None

    @classmethod
    def user(cls, user: Any, ip: str | None = None) -> Actor:
        return cls(ActorType.USER, user.get_username(), ip)

    @classmethod
    def from_request(cls, request: HttpRequest) -> Actor:
        return cls.user(request.user, client_ip(request))

    @classmethod
    def node(cls, node: Any, ip: str | None = None) -> Actor:
        return cls(ActorType.NODE, str(node.uuid), ip)

    @classmethod
    def system(cls, what: str = "system") -> Actor:
        return cls(ActorType.SYSTEM, what)


def client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is set by whoever sends the request,
    # so trusting it would let anyone write any address into the audit trail.
    return request.META.get("REMOTE_ADDR") or None


def audit_record(
    *,
    actor: Actor,
    action: str,
    obj: models.Model | None = None,
    site_uuid: Any = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    object_repr: str = "",
) -> AuditEvent:
    """Append one event to the log, inside the caller's transaction.

    Must be called in the same transaction as the change it records, so that
    the change and its record commit or roll back together. Takes no lock
    that another append waits for; numbers increase within a transaction.
    """
    return audit_record_many(actor=actor, action=action, entries=[
        AuditEntry(obj=obj, site_uuid=site_uuid, before=before, after=after, object_repr=object_repr)])[0]


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """One event of :func:`audit_record_many`: what :func:`audit_record` takes besides the actor and action."""

    obj: models.Model | None = None
    site_uuid: Any = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    object_repr: str = ""


def audit_record_many(*, actor: Actor, action: str, entries: Sequence[AuditEntry]) -> list[AuditEvent]:
    """:func:`audit_record` for many events of one actor and action (a sweep's transitions), in a few
    statements whatever their number; numbered in the order given."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit_record must run inside the transaction of the change it records")
    if not entries:
        return []
    now = timezone.now()
    events = []
    for seq, entry in zip(_next_seqs(len(entries)), entries, strict=True):
        obj = entry.obj
        event = AuditEvent(
            seq=seq,
            created_at=now,
            actor_type=actor.type,
            actor=actor.label[:150],
            action=action,
            object_type=obj._meta.label_lower if obj is not None else "",
            object_id=str(getattr(obj, "uuid", getattr(obj, "pk", ""))) if obj is not None else "",
            object_repr=(entry.object_repr or (str(obj) if obj is not None else ""))[:200],
            site_uuid=entry.site_uuid,
            before=entry.before,
            after=entry.after,
            source_ip=actor.ip,
            prev_hash="",
        )
        event.hash = event.compute_hash()
        events.append(event)
    if len(events) == 1:
        events[0].save(force_insert=True)
        AuditPending.objects.create(event=events[0])
    else:
        AuditEvent.objects.bulk_create(events, batch_size=1000)
        AuditPending.objects.bulk_create([AuditPending(event=e) for e in events], batch_size=1000)
    for _ in events:
        transaction.on_commit(_appended)
    return events


def _next_seqs(count: int) -> list[int]:
    if count == 1:
        return [_next_seq()]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT nextval(%s) FROM generate_series(1, %s)", [SEQ_SEQUENCE, count])
            return sorted(int(row[0]) for row in cursor.fetchall())
    first = _next_seq()
    return list(range(first, first + count))


def _next_seq() -> int:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT nextval(%s)", [SEQ_SEQUENCE])
            return int(cursor.fetchone()[0])
    # SQLite holds its one write lock from the first statement of the transaction (IMMEDIATE) to its end.
    return int(AuditEvent.objects.aggregate(last=Max("seq"))["last"] or 0) + 1


class _AppendCounter:
    """Appends committed by this process since it last asked for a checkpoint."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def add(self) -> bool:
        """Count one; True (and start again) when a checkpoint is due."""
        with self.lock:
            self.count += 1
            if self.count < settings.AUDIT_CHECKPOINT_ENTRIES:
                return False
            self.count = 0
            return True


_appends = _AppendCounter()


def _appended() -> None:
    if not _appends.add():
        return
    try:
        signature(CHECKPOINT_TASK).apply_async()
    except Exception:  # the change is committed; the periodic checkpoint will take these entries
        logger.warning("could not ask for an audit checkpoint; the periodic one will take the entries", exc_info=True)

"""Appending to and verifying the audit chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from django.db import models, transaction
from django.http import HttpRequest
from django.utils import timezone

from audit.models import GENESIS_HASH, ActorType, AuditChainHead, AuditEvent


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
    """Append one event to the chain, inside the caller's transaction.

    Must be called in the same transaction as the change it records, so that
    the change and its record commit or roll back together.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit_record must run inside the transaction of the change it records")
    head, _ = AuditChainHead.objects.select_for_update().get_or_create(id=1)
    event = AuditEvent(
        seq=head.seq + 1,
        created_at=timezone.now(),
        actor_type=actor.type,
        actor=actor.label[:150],
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(getattr(obj, "uuid", getattr(obj, "pk", ""))) if obj is not None else "",
        object_repr=(object_repr or (str(obj) if obj is not None else ""))[:200],
        site_uuid=site_uuid,
        before=before,
        after=after,
        source_ip=actor.ip,
        prev_hash=head.hash,
    )
    event.hash = event.compute_hash()
    event.save(force_insert=True)
    AuditChainHead.objects.filter(id=1).update(seq=event.seq, hash=event.hash)
    return event


@dataclasses.dataclass(frozen=True)
class ChainBreak:
    seq: int
    reason: str


def audit_verify(*, batch_size: int = 2000) -> tuple[int, ChainBreak | None]:
    """Recompute the whole chain. Returns (records checked, first break or None)."""
    expected_prev = GENESIS_HASH
    expected_seq = 1
    checked = 0
    for event in _iter_chain(batch_size):
        if event.seq != expected_seq:
            return checked, ChainBreak(expected_seq, f"record #{expected_seq} is missing (next is #{event.seq})")
        if event.prev_hash != expected_prev:
            return checked, ChainBreak(event.seq, "its previous-hash does not match the record before it")
        if event.compute_hash() != event.hash:
            return checked, ChainBreak(event.seq, "its content does not match its hash (the record was altered)")
        expected_prev = event.hash
        expected_seq += 1
        checked += 1
    head = AuditChainHead.objects.filter(id=1).first()
    if head is not None and head.seq != checked:
        return checked, ChainBreak(checked + 1, f"the chain head says #{head.seq} but the chain ends at #{checked}")
    return checked, None


def _iter_chain(batch_size: int) -> Iterator[AuditEvent]:
    last = 0
    while True:
        batch = list(AuditEvent.objects.filter(seq__gt=last).order_by("seq")[:batch_size])
        if not batch:
            return
        yield from batch
        last = batch[-1].seq

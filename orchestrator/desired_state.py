"""A node's desired state: built from the features, signed, stored and published.

The one place a desired state is made. Its content is the node's identity
and site plus what every registered feature contributes
(:mod:`orchestrator.features`); it is signed in the epoch in force
(:mod:`orchestrator.keys`) and stored as :class:`~orchestrator.models.DesiredState`.

Guarantees:

* Publishing identical content is a no-op (the generation stays), so it is
  safe to call after any change that might affect a node.
* Every publish that moves a generation is signed, audited and nudges the
  node after the commit, the nudge carrying the new signed state.
* Within an epoch a node's generation only rises, and it ends above
  ``above`` when given (a node that applied more than the database remembers).
* One node out of generations does not fail the publish of the others.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from audit.services import Actor, AuditEntry, audit_record_many
from edge_runtime import protocol, signing
from orchestrator import features, keys, quiet
from orchestrator.models import DesiredState
from orchestrator.realtime import nudge_nodes

# The largest generation the desired-state column holds (PositiveIntegerField).
GENERATION_MAX = 2**31 - 1

logger = logging.getLogger("edgewise.sites")


def desired_state_content(node: Any, *, cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Everything in a node's desired state except its generation, time and epoch.

    ``cache`` is shared by the features while publishing many nodes (a
    site's policy bundle is worked out once per site).
    """
    site = node.site
    return {
        "node_id": str(node.uuid),
        "site": site.slug,
        "labels": {str(k): str(v) for k, v in (site.labels or {}).items()},
        "sync_interval_s": settings.SYNC_INTERVAL_S,
        **features.desired_content(node, {} if cache is None else cache),
    }


def desired_state_publish(*, node: Any, actor: Actor, above: int = 0) -> DesiredState:
    """Sign and store ``node``'s desired state if its content changed.

    ``above``: the generation must end up higher than this (a node that
    applied more in this epoch than the database remembers, after a restore).
    """
    return desired_state_publish_many(nodes=[node], actor=actor, above={node.pk: above} if above else None)[node.pk]


def desired_state_publish_many(*, nodes: Sequence[Any], actor: Actor,
                               above: dict[int, int] | None = None) -> dict[int, DesiredState]:
    """:func:`desired_state_publish` for many nodes in one transaction, by node pk.

    What the nodes share is worked out once: the features' per-site parts, the
    lock on their desired-state rows, the nudges (sent together after commit).
    Each node whose state moved still gets its own signature and audit event.
    A new epoch changes the content, so every node's generation moves.
    """
    published: dict[int, DesiredState] = {}
    moved: dict[str, DesiredState] = {}
    _share_sites(nodes)
    trust = keys.current()
    floors = above or {}
    with transaction.atomic():
        rows = DesiredState.objects.select_for_update().filter(node_id__in=[n.pk for n in nodes])
        current_by_node = {d.node_id: d for d in rows}
        cache: dict[Any, Any] = {}
        now = timezone.now()
        audited: list[AuditEntry] = []
        for node in nodes:
            content = {**desired_state_content(node, cache=cache),
                       "epoch": trust.epoch, "epoch_started_at": trust.epoch_started_at}
            current = current_by_node.get(node.pk)
            state = _signed_if_changed(node, content, current, floors.get(node.pk, 0), trust, now)
            if state is not None and state is not current:
                moved[str(node.uuid)] = state
                audited.append(AuditEntry(obj=node, site_uuid=node.site.uuid, after={
                    "generation": state.generation, "epoch": trust.epoch, "content_hash": state.content_hash}))
            if state is not None:
                published[node.pk] = state
        _store(list(moved.values()))
        audit_record_many(actor=actor, action="desired_state.publish", entries=audited)
        nudge_nodes(state_nudges(moved, trust.chain))
        quiet.attention(moved)
    return published


def _share_sites(nodes: Sequence[Any]) -> None:
    """Give the nodes of one site one site object, so what it loads (its region) is loaded once."""
    sites: dict[int, Any] = {}
    for node in nodes:
        node.site = sites.setdefault(node.site_id, node.site)


_STORED_FIELDS = ["generation", "epoch", "content_hash", "payload", "signature", "key_fingerprint", "published_at"]


_STORE_BATCH = 1000
# The moved states' rows written from one array per column (_STORED_FIELDS, in order).
_UPDATE_FROM_ARRAYS = """
UPDATE sites_desiredstate AS d
   SET generation = v.generation, epoch = v.epoch, content_hash = v.content_hash, payload = v.payload,
       signature = v.signature, key_fingerprint = v.key_fingerprint, published_at = v.published_at
  FROM unnest(%s::bigint[], %s::integer[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
              %s::timestamptz[])
       AS v(id, generation, epoch, content_hash, payload, signature, key_fingerprint, published_at)
 WHERE d.id = v.id
"""


def _store(states: list[DesiredState]) -> None:
    """Write the moved states: the new ones inserted together, the others updated together."""
    # Split before inserting: bulk_create gives the new states their pks.
    updated = [s for s in states if s.pk is not None]
    DesiredState.objects.bulk_create([s for s in states if s.pk is None], batch_size=_STORE_BATCH)
    if connection.vendor != "postgresql":
        DesiredState.objects.bulk_update(updated, _STORED_FIELDS, batch_size=_STORE_BATCH)
        return
    # bulk_update builds a CASE per field and row, which costs more than signing; one UPDATE from
    # arrays per batch costs a few milliseconds.
    with connection.cursor() as cursor:
        for start in range(0, len(updated), _STORE_BATCH):
            batch = updated[start:start + _STORE_BATCH]
            columns = [[getattr(s, f) for s in batch] for f in _STORED_FIELDS]
            cursor.execute(_UPDATE_FROM_ARRAYS, [[s.pk for s in batch], *columns])


def state_nudges(moved: dict[str, DesiredState], chain: Sequence[Any] | None = None) -> dict[str, protocol.Nudge]:
    """The nudges pushing each moved node its new state, their reports spread at NUDGE_REPORTS_PER_S."""
    within = min(len(moved) / settings.NUDGE_REPORTS_PER_S, settings.SYNC_INTERVAL_S, protocol.MAX_REPORT_WITHIN_S)
    chain = list(keys.current().chain if chain is None else chain)
    return {node_uuid: protocol.Nudge(generation=state.generation, desired=signed_desired_state(state, chain),
                                      report_within_s=round(within, 3))
            for node_uuid, state in moved.items()}


def _signed_if_changed(node: Any, content: dict[str, Any], current: DesiredState | None, floor: int,
                       trust: keys.Trust, now: Any) -> DesiredState | None:
    """``current`` itself when the content is unchanged (or the node has no generation left; None when it
    has no state), else the node's new state, signed and not yet stored."""
    content_hash = hashlib.sha256(signing.canonical_json(content).encode()).hexdigest()
    if current is not None and current.content_hash == content_hash and current.generation > floor:
        return current
    generation = max(current.generation if current else 0, floor) + 1
    if generation > GENERATION_MAX:
        logger.error("node %s has no generation left (%d > %d); its desired state was not published",
                     node.uuid, generation, GENERATION_MAX)
        return current
    signed = signing.sign_desired_state(protocol.DesiredState(generation=generation, issued_at=now, **content),
                                        trust.key)
    # A new object, so that "moved" is "not the one read": the row read is updated through its pk.
    return DesiredState(pk=current.pk if current else None, node=node, generation=generation, epoch=trust.epoch,
                        content_hash=content_hash, payload=signed.payload, signature=signed.signature,
                        key_fingerprint=signed.key_fingerprint, published_at=now)


def signed_desired_state(state: DesiredState, chain: Sequence[Any] | None = None) -> protocol.SignedDesiredState:
    """The stored state as sent, with every key endorsement: a node that pinned an older key follows them.

    ``chain``: the endorsements in force, when the caller has them (a publish of many nodes).
    """
    return protocol.SignedDesiredState(
        payload=state.payload, signature=state.signature, key_fingerprint=state.key_fingerprint,
        key_chain=list(keys.current().chain if chain is None else chain),
    )


def desired_state_republish_all(*, actor: Actor, batch: int = 500) -> int:
    """Publish every enrolled node's desired state again (a new epoch or key changes every one)."""
    # The node model, as the desired state's relation declares it: this layer sits below the sites app.
    node_model = DesiredState._meta.get_field("node").related_model
    assert isinstance(node_model, type)  # a model class, not "self"
    active = node_model._default_manager.filter(revoked_at__isnull=True)
    ids = list(active.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), batch):
        nodes = list(active.filter(pk__in=ids[start:start + batch]).select_related("site"))
        desired_state_publish_many(nodes=nodes, actor=actor)
    return len(ids)

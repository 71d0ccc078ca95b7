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
from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
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
    trust = keys.current()
    floors = above or {}
    with transaction.atomic():
        rows = DesiredState.objects.select_for_update().filter(node_id__in=[n.pk for n in nodes])
        current_by_node = {d.node_id: d for d in rows}
        cache: dict[Any, Any] = {}
        now = timezone.now()
        for node in nodes:
            content = {**desired_state_content(node, cache=cache),
                       "epoch": trust.epoch, "epoch_started_at": trust.epoch_started_at}
            state, changed = _publish_one(node, content, current_by_node.get(node.pk), floors.get(node.pk, 0),
                                        trust, now, actor)
            if changed:
                moved[str(node.uuid)] = state
            if state is not None:
                published[node.pk] = state
        nudge_nodes(state_nudges(moved))
        quiet.attention(moved)
    return published


def state_nudges(moved: dict[str, DesiredState]) -> dict[str, protocol.Nudge]:
    """The nudges pushing each moved node its new state, their reports spread at NUDGE_REPORTS_PER_S."""
    within = min(len(moved) / settings.NUDGE_REPORTS_PER_S, settings.SYNC_INTERVAL_S, protocol.MAX_REPORT_WITHIN_S)
    return {node_uuid: protocol.Nudge(generation=state.generation, desired=signed_desired_state(state),
                                      report_within_s=round(within, 3))
            for node_uuid, state in moved.items()}


def _publish_one(node: Any, content: dict[str, Any], current: DesiredState | None, floor: int,
                 trust: keys.Trust, now: Any, actor: Actor) -> tuple[Any, bool]:
    """(the node's state after this publish, whether it moved); the state is None when the node has none."""
    content_hash = hashlib.sha256(signing.canonical_json(content).encode()).hexdigest()
    if current is not None and current.content_hash == content_hash and current.generation > floor:
        return current, False
    generation = max(current.generation if current else 0, floor) + 1
    if generation > GENERATION_MAX:
        logger.error("node %s has no generation left (%d > %d); its desired state was not published",
                     node.uuid, generation, GENERATION_MAX)
        return current, False
    signed = signing.sign_desired_state(protocol.DesiredState(generation=generation, issued_at=now, **content),
                                        trust.key)
    state = current if current is not None else DesiredState(node=node)
    state.generation = generation
    state.epoch = trust.epoch
    state.content_hash = content_hash
    state.payload = signed.payload
    state.signature = signed.signature
    state.key_fingerprint = signed.key_fingerprint
    state.published_at = now
    state.save()
    audit_record(actor=actor, action="desired_state.publish", obj=node, site_uuid=node.site.uuid,
                 after={"generation": generation, "epoch": trust.epoch, "content_hash": content_hash})
    return state, True


def signed_desired_state(state: DesiredState) -> protocol.SignedDesiredState:
    """The stored state as sent, with every key endorsement: a node that pinned an older key follows them."""
    return protocol.SignedDesiredState(
        payload=state.payload, signature=state.signature, key_fingerprint=state.key_fingerprint,
        key_chain=list(keys.current().chain),
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

"""A node's sync: its report recorded, its features heard, its desired state answered.

The hottest write of the control plane (every node, every few seconds), so a
sync that changes nothing but the heartbeat costs one locked read and one
narrow update, and does not wait for a durable commit: a crash can only lose
a heartbeat that the next sync rewrites. Anything audited commits durably.

The features (models, queries, ...) take part through the one seam
:mod:`orchestrator.features`; this module imports none of them.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from audit.witness import node_log_ingest
from edge_runtime import protocol
from orchestrator import features, keys, quiet
from orchestrator.desired_state import desired_state_publish, signed_desired_state
from orchestrator.models import DesiredState, Epoch
from orchestrator.realtime import FLEET_GROUP, broadcast
from sites.identity import node_identity_report, node_public_key
from sites.liveness import node_status
from sites.models import Node, NodeStatus
from sites.services import TokenRefused

# How far a node may claim to be ahead of the database (after a restore) and be
# believed: a node's claim is not signed, and one that claimed the column's
# limit would leave no generation for its next state.
MAX_AHEAD = 1_000_000

logger = logging.getLogger("edgewise.sites")


def node_sync(*, node: Node, request: protocol.SyncRequest, ip: str | None) -> protocol.SyncResponse:
    """Record a node's report and answer with its desired state if it moved."""
    now = timezone.now()
    actor = Actor("node", str(node.uuid), ip)
    # Before the database is read: a change that commits from here on retires the snapshot taken below.
    begun = quiet.begin(node.uuid)
    with transaction.atomic():
        # of=("self",): lock the node row only; the desired state is an outer
        # join that PostgreSQL will not lock (and need not).
        node = (Node.objects.select_for_update(of=("self",)).select_related("site", "desired")
                .get(pk=node.pk))
        if node.revoked_at is not None:
            raise TokenRefused("this node's credential was revoked")
        _heard_quietly(node, begun)
        sync = features.NodeSync(node=node, actual=request.actual, actor=actor)
        changes = _record_report(sync, request, ip, now)
        desired = _settle_desired(sync, changes)
        for feature in features.node_features():
            feature.answer(sync)
        if request.audit is not None:
            _take_audit_log(sync, request)
        if not sync.audited and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
    if "status" in changes:
        broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
    # A generation counts within its epoch: the same number in another epoch is another state.
    settled = (request.actual.applied_generation == desired.generation
               and request.actual.applied_epoch == desired.epoch)
    digest = None
    if begun is not None and settled and not sync.answer.get("queries"):
        # The next sync that reports the same is answered from this (orchestrator.quiet); the answer names the
        # digest only then, so that a node brings a brief sync only where one can be answered.
        digest = protocol.report_digest(request)
        snapshot = quiet.Snapshot(credential_hash=node.credential_hash, digest=digest,
                                  generation=desired.generation, epoch=desired.epoch)
        transaction.on_commit(functools.partial(quiet.remember, node_uuid=node.uuid, begun=begun,
                                                heard_at=now.timestamp(), snapshot=snapshot))
    return protocol.SyncResponse(
        generation=desired.generation,
        desired=None if settled else signed_desired_state(desired),
        sync_interval_s=settings.SYNC_INTERVAL_S,
        report_digest=digest,
        **sync.answer,
    )


def _heard_quietly(node: Node, begun: quiet.Begun | None) -> None:
    """Take the node's last quiet heartbeat as its last sync when PostgreSQL has not been told of it yet."""
    if begun is None or begun.heard_at is None:
        return
    heard = dt.datetime.fromtimestamp(begun.heard_at, tz=dt.UTC)
    if node.last_seen_at is None or node.last_seen_at < heard:
        node.last_seen_at = heard


def _take_audit_log(sync: features.NodeSync, request: protocol.SyncRequest) -> None:
    """The node's audit log upload, witnessed (``audit.witness``); what it stored commits durably."""
    assert request.audit is not None
    node = sync.node
    ack = node_log_ingest(node_uuid=node.uuid, site_uuid=node.site.uuid, public_key=node_public_key(node),
                          key_mismatch=request.identity_key is not None and request.identity_key != node.identity_key,
                          upload=request.audit)
    sync.answer["audit"] = ack
    sync.audited |= bool(request.audit.entries) or ack.state != "ok"


def node_report_carried(*, node: Node, request: protocol.SyncRequest, as_of: dt.datetime, actor: Actor) -> bool:
    """Record the report a node's bundle out carried, as of the time it was written (``sites.bundles_out``).

    Inside the caller's transaction, the node row locked. A report older than what the node last told the
    control plane (a sync since, or a later bundle) is not taken: False. The node's status stays what its
    age says; it is never marked online by a report carried by hand.
    """
    if node.last_seen_at is not None and node.last_seen_at >= as_of:
        return False
    sync = features.NodeSync(node=node, actual=request.actual, actor=actor)
    status = node_status(last_seen_at=as_of, revoked=False, now=timezone.now())
    changes = _record_report(sync, request, None, as_of, status=status)
    _settle_desired(sync, changes)
    return True


def _node_changes(node: Node, request: protocol.SyncRequest, now: dt.datetime,
                  status: str = NodeStatus.ONLINE) -> dict[str, tuple[Any, Any]]:
    """The audited fields of ``node`` this report changes, as (before, after); ``node`` takes the new values."""
    changes: dict[str, tuple[Any, Any]] = {}
    if request.hardware is not None:
        hardware = request.hardware.model_dump(mode="json")
        if hardware != node.hardware:
            changes["hardware"] = (node.hardware, hardware)
            node.hardware = hardware
    if request.runtime_version and request.runtime_version != node.runtime_version:
        changes["runtime_version"] = (node.runtime_version, request.runtime_version)
        node.runtime_version = request.runtime_version
    applied = request.actual.applied_generation
    if applied != node.applied_generation:
        changes["applied_generation"] = (node.applied_generation, applied)
        node.applied_generation = applied
    previous_status = node_status(last_seen_at=node.last_seen_at, revoked=False, now=now)
    if previous_status == NodeStatus.ONLINE and node.status in (NodeStatus.STALE, NodeStatus.OFFLINE):
        # The liveness sweep recorded the node as silent (its heartbeats never reached PostgreSQL): its return
        # is a change of what the audit trail last said.
        previous_status = node.status
    if previous_status != status:
        changes["status"] = (previous_status, status)
    return changes


def _record_report(sync: features.NodeSync, request: protocol.SyncRequest, ip: str | None,
                   now: dt.datetime, *, status: str = NodeStatus.ONLINE) -> dict[str, tuple[Any, Any]]:
    """Store the node's report (its features' parts first, while the previous report is still stored)."""
    node = sync.node
    changes = _node_changes(node, request, now, status)
    sync.audited |= node_identity_report(node=node, key=request.identity_key, actor=sync.actor)
    for feature in features.node_features():
        feature.report(sync)
    node.actual_state = request.actual.model_dump(mode="json")
    node.health = request.health.model_dump(mode="json")
    node.last_seen_at = now
    node.last_seen_ip = ip
    node.status = status
    node.save(update_fields=["actual_state", "health", "last_seen_at", "last_seen_ip", "status",
                             *(f for f in changes if f != "status")])
    if changes:
        audit_record(
            actor=sync.actor, action="node.report", obj=node, site_uuid=node.site.uuid,
            before={k: v[0] for k, v in changes.items()}, after={k: v[1] for k, v in changes.items()},
        )
    for refusal in request.refusals:
        audit_record(
            actor=sync.actor, action="node.desired_state_refused", obj=node, site_uuid=node.site.uuid,
            after={"generation": refusal.generation, "reason": refusal.reason, "at": refusal.at.isoformat()},
        )
    sync.audited |= bool(changes or request.refusals)
    return changes


def _settle_desired(sync: features.NodeSync, changes: dict[str, tuple[Any, Any]]) -> DesiredState:
    """The node's desired state, published again when its hardware, its epoch or a restore calls for it."""
    node, actual = sync.node, sync.actual
    desired: DesiredState | None = getattr(node, "desired", None)
    applied = actual.applied_generation
    # The node applied more in this epoch than the database remembers (it
    # was restored from a backup): publish above what the node holds, or
    # the node would refuse every later state as older.
    ahead = (desired is not None and actual.applied_epoch == desired.epoch
             and desired.generation < applied <= desired.generation + MAX_AHEAD)
    if ahead:
        logger.warning("node %s applied generation %d, above the %d this database holds: publishing above it",
                       node.uuid, applied, desired.generation if desired else 0)
    if actual.refusing is not None and actual.applied_epoch:
        _note_unknown_epoch(node, actual.applied_epoch)
    if desired is None or "hardware" in changes or ahead or desired.epoch != keys.current().epoch:
        # Placement depends on the hardware a node reports, and a new epoch
        # changes every state: republish (a no-op when the content is the same).
        desired = desired_state_publish(node=node, actor=Actor.system("sync"), above=applied if ahead else 0)
        sync.audited = True
    return desired


def _note_unknown_epoch(node: Node, epoch: str) -> None:
    """Say what to do when a refusing node is in an epoch this database never started (a restored backup)."""
    try:
        known = Epoch.objects.filter(uuid=epoch).exists()
    except ValidationError:
        known = False
    if not known:
        logger.error("node %s refuses its desired state and is in epoch %s, which this database does not know: "
                     "it was restored from a backup taken before that epoch; run manage.py epoch_start", node.uuid,
                     epoch)

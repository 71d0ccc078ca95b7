"""Writes for regions, sites, tokens and nodes. Each runs in one transaction
and writes its audit event in it."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import protocol, signing
from orchestrator import keys
from orchestrator.realtime import FLEET_GROUP, broadcast, broadcast_many, node_group
from sites.liveness import node_status
from sites.models import DesiredState, EnrollmentToken, Node, NodeStatus, Region, Site

TOKEN_PREFIX = "ewt_"
CREDENTIAL_PREFIX = "ewn_"
MAX_TOKEN_LIFETIME = dt.timedelta(days=30)
# The largest generation the desired-state column holds (PositiveIntegerField).
GENERATION_MAX = 2**31 - 1
# How far a node may claim to be ahead of the database (after a restore) and be
# believed: a node's claim is not signed, and one that claimed the column's
# limit would leave no generation for its next state.
MAX_AHEAD = 1_000_000

logger = logging.getLogger("edgewise.sites")


class SitesError(Exception):
    """A refused request; ``status`` is the HTTP status an API answers with."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class TokenUnknown(SitesError):
    status = 401


class TokenRefused(SitesError):
    status = 403


class NodeNameTaken(SitesError):
    status = 409


def secret_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def region_create(*, actor: Actor, slug: str, name: str, description: str = "") -> Region:
    with transaction.atomic():
        region = Region.objects.create(slug=slug, name=name, description=description)
        audit_record(actor=actor, action="region.create", obj=region, after={"slug": slug, "name": name})
    return region


def _site_fields(site: Site) -> dict[str, Any]:
    return {
        "slug": site.slug,
        "name": site.name,
        "region": site.region.slug,
        "jurisdiction": site.jurisdiction,
        "clearance": site.clearance,
        "connectivity": site.connectivity,
        "latitude": site.latitude,
        "longitude": site.longitude,
        "labels": site.labels,
    }


def site_create(*, actor: Actor, region: Region, slug: str, name: str, **fields: Any) -> Site:
    with transaction.atomic():
        site = Site(region=region, slug=slug, name=name, **fields)
        site.full_clean()
        site.save()
        audit_record(actor=actor, action="site.create", obj=site, site_uuid=site.uuid, after=_site_fields(site))
    return site


def site_update(*, actor: Actor, site: Site, **fields: Any) -> Site:
    """Change a site's attributes; its nodes get a new desired state if it changed."""
    with transaction.atomic():
        site = Site.objects.select_for_update().select_related("region").get(pk=site.pk)
        before = _site_fields(site)
        for name, value in fields.items():
            setattr(site, name, value)
        site.full_clean()
        site.save()
        after = _site_fields(site)
        if after != before:
            audit_record(actor=actor, action="site.update", obj=site, site_uuid=site.uuid, before=before, after=after)
            desired_state_publish_many(nodes=list(site.nodes.filter(revoked_at__isnull=True).select_related("site")),
                                       actor=actor)
    return site


def token_create(
    *, actor: Actor, site: Site, max_uses: int = 1, lifetime: dt.timedelta = dt.timedelta(hours=24), note: str = ""
) -> tuple[EnrollmentToken, str]:
    """Create an enrollment token. Returns the row and the token, shown only now."""
    if not 1 <= max_uses <= 10_000:
        raise SitesError("max_uses must be between 1 and 10000", field="max_uses")
    if not dt.timedelta(minutes=1) <= lifetime <= MAX_TOKEN_LIFETIME:
        raise SitesError("a token lives between 1 minute and 30 days", field="lifetime")
    value = TOKEN_PREFIX + secrets.token_urlsafe(24)
    with transaction.atomic():
        token = EnrollmentToken.objects.create(
            site=site,
            token_hash=secret_hash(value),
            prefix=value[: len(TOKEN_PREFIX) + 6],
            note=note[:200],
            expires_at=timezone.now() + lifetime,
            max_uses=max_uses,
            created_by_id=_user_id(actor),
        )
        audit_record(
            actor=actor,
            action="token.create",
            obj=token,
            site_uuid=site.uuid,
            after={"prefix": token.prefix, "max_uses": max_uses, "expires_at": token.expires_at.isoformat()},
        )
    return token, value


def _user_id(actor: Actor) -> int | None:
    from django.contrib.auth import get_user_model

    if actor.type != "user":
        return None
    return get_user_model().objects.filter(username=actor.label).values_list("pk", flat=True).first()


def token_revoke(*, actor: Actor, token: EnrollmentToken) -> EnrollmentToken:
    with transaction.atomic():
        token = EnrollmentToken.objects.select_for_update().get(pk=token.pk)
        if token.revoked_at is not None:
            raise SitesError("this token is already revoked")
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="token.revoke", obj=token, site_uuid=token.site.uuid, after={"revoked": True})
    return token


def token_check(*, site: Site, value: str) -> EnrollmentToken:
    """The live token of ``site`` whose value is ``value``, or a SitesError saying why not."""
    token = EnrollmentToken.objects.select_related("site").filter(token_hash=secret_hash(value)).first()
    if token is None or token.site_id != site.pk:
        raise TokenUnknown("unknown enrollment token", field="token")
    _token_usable(token, timezone.now())
    return token


def _token_usable(token: EnrollmentToken, now: dt.datetime) -> None:
    if token.revoked_at is not None:
        raise TokenRefused("enrollment token was revoked", field="token")
    if token.expires_at <= now:
        raise TokenRefused(f"enrollment token expired at {token.expires_at.isoformat()}", field="token")
    if token.uses >= token.max_uses:
        raise TokenRefused(
            f"enrollment token is used up ({token.uses} of {token.max_uses} uses)", field="token"
        )


def node_enroll(*, request: protocol.EnrollRequest, ip: str | None) -> tuple[Node, str]:
    """Trade a token for a node and its credential (returned once, stored hashed).

    Safe under concurrency: the token's use counter is taken with a conditional
    UPDATE, so a token allowing N uses enrolls exactly N nodes however many
    arrive at once. Any failure rolls back the use as well as the node.
    """
    now = timezone.now()
    token = EnrollmentToken.objects.select_related("site").filter(token_hash=secret_hash(request.token)).first()
    if token is None:
        raise TokenUnknown("unknown enrollment token", field="token")
    _token_usable(token, now)
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            taken = EnrollmentToken.objects.filter(
                pk=token.pk, revoked_at__isnull=True, expires_at__gt=now, uses__lt=F("max_uses")
            ).update(uses=F("uses") + 1)
            if not taken:
                token.refresh_from_db()
                _token_usable(token, now)
                raise TokenRefused("enrollment token is used up", field="token")
            node = Node.objects.create(
                site=token.site,
                name=request.name,
                role=request.role,
                credential_hash=secret_hash(credential),
                hardware=request.hardware.model_dump(mode="json"),
                runtime_version=request.runtime_version,
                enrolled_with=token,
                last_seen_ip=ip,
            )
            audit_record(
                actor=Actor("node", str(node.uuid), ip),
                action="node.enroll",
                obj=node,
                site_uuid=token.site.uuid,
                after={"name": node.name, "role": node.role, "token": token.prefix, "hardware": node.hardware},
            )
            desired_state_publish(node=node, actor=Actor.system("enrollment"))
    except IntegrityError as exc:
        raise NodeNameTaken(
            f"a node named {request.name!r} is already enrolled at site {token.site.slug!r}; "
            "revoke it first or choose another name",
            field="name",
        ) from exc
    broadcast(FLEET_GROUP, "fleet.changed", {"site": str(token.site.uuid)})
    return node, credential


def node_authenticate(credential: str) -> Node | None:
    """The active node holding ``credential``, or None (unknown or revoked)."""
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    return Node.objects.select_related("site").filter(credential_hash=secret_hash(credential)).first()


def node_revoke(*, actor: Actor, node: Node) -> Node:
    with transaction.atomic():
        node = Node.objects.select_for_update().select_related("site").get(pk=node.pk)
        if node.revoked_at is not None:
            raise SitesError("this node is already revoked")
        before = {"status": node.status}
        node.revoked_at = timezone.now()
        node.status = NodeStatus.REVOKED
        node.save(update_fields=["revoked_at", "status"])
        audit_record(actor=actor, action="node.revoke", obj=node, site_uuid=node.site.uuid, before=before,
                     after={"status": node.status})
    broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
    return node


def desired_state_content(node: Node, *, site_bundles: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything in a node's desired state except its generation and time.

    ``policy`` is the site's signed policy bundle (its facts, the placement
    policy in force and the data policy), which the node enforces on its own.
    ``site_bundles`` caches that bundle per site while publishing many nodes.
    """
    from models_registry.selectors import desired_models_for_node

    site = node.site
    cache = {} if site_bundles is None else site_bundles
    if site.pk not in cache:
        cache[site.pk] = _site_policy_bundle(site)
    return {
        "node_id": str(node.uuid),
        "site": site.slug,
        "labels": {str(k): str(v) for k, v in (site.labels or {}).items()},
        "sync_interval_s": settings.SYNC_INTERVAL_S,
        "models": [m.model_dump(mode="json") for m in desired_models_for_node(node)],
        "policy": cache[site.pk],
    }


def _site_policy_bundle(site: Site) -> dict[str, Any]:
    from policies.queries.selectors import data_bundle_for_site
    from policies.selectors import policy_bundle_for_site

    # "data": the data policy in force at the site and the facts it is evaluated with.
    return {**policy_bundle_for_site(site), "data": data_bundle_for_site(site)}


def desired_state_publish(*, node: Node, actor: Actor, above: int = 0) -> DesiredState:
    """Sign and store the node's desired state if its content changed.

    Publishing identical content is a no-op (the generation stays), so this is
    safe to call after any change that might affect a node. ``above``: the
    generation must end up higher than this (a node that applied more in this
    epoch than the database remembers, after a restore).
    """
    return desired_state_publish_many(nodes=[node], actor=actor, above={node.pk: above} if above else None)[node.pk]


def desired_state_publish_many(*, nodes: Sequence[Node], actor: Actor,
                               above: dict[int, int] | None = None) -> dict[int, DesiredState]:
    """:func:`desired_state_publish` for many nodes in one transaction, by node pk.

    What the nodes share is worked out once: each site's policy bundle, the
    lock on their desired-state rows, the nudges (sent together after commit).
    Each node whose state moved still gets its own signature and audit event.
    The state is signed in the epoch in force (:mod:`orchestrator.keys`): a new
    epoch changes the content, so every node's generation moves.
    """
    published: dict[int, DesiredState] = {}
    nudges: list[tuple[str, str, dict[str, Any]]] = []
    trust = keys.current()
    floors = above or {}
    with transaction.atomic():
        ids = [n.pk for n in nodes]
        current_by_node = {d.node_id: d for d in DesiredState.objects.select_for_update().filter(node_id__in=ids)}
        bundles: dict[int, dict[str, Any]] = {}
        now = timezone.now()
        for node in nodes:
            content = {**desired_state_content(node, site_bundles=bundles),
                       "epoch": trust.epoch, "epoch_started_at": trust.epoch_started_at}
            content_hash = hashlib.sha256(signing.canonical_json(content).encode()).hexdigest()
            current = current_by_node.get(node.pk)
            floor = floors.get(node.pk, 0)
            if current is not None and current.content_hash == content_hash and current.generation > floor:
                published[node.pk] = current
                continue
            generation = max(current.generation if current else 0, floor) + 1
            if generation > GENERATION_MAX:
                # One node out of generations must not fail the publish of every other node in the batch.
                logger.error("node %s has no generation left (%d > %d); its desired state was not published",
                             node.uuid, generation, GENERATION_MAX)
                if current is not None:
                    published[node.pk] = current
                continue
            state = protocol.DesiredState(generation=generation, issued_at=now, **content)
            signed = signing.sign_desired_state(state, trust.key)
            if current is None:
                current = DesiredState(node=node)
            current.generation = generation
            current.epoch = trust.epoch
            current.content_hash = content_hash
            current.payload = signed.payload
            current.signature = signed.signature
            current.key_fingerprint = signed.key_fingerprint
            current.published_at = now
            current.save()
            audit_record(
                actor=actor, action="desired_state.publish", obj=node, site_uuid=node.site.uuid,
                after={"generation": generation, "epoch": trust.epoch, "content_hash": content_hash},
            )
            nudges.append((node_group(node.uuid), "node.nudge", {"generation": generation}))
            published[node.pk] = current
        broadcast_many(nudges)
    return published


def signed_desired_state(state: DesiredState) -> protocol.SignedDesiredState:
    """The stored state as sent, with every key endorsement: a node that pinned an older key follows them."""
    return protocol.SignedDesiredState(
        payload=state.payload, signature=state.signature, key_fingerprint=state.key_fingerprint,
        key_chain=list(keys.current().chain),
    )


def node_sync(*, node: Node, request: protocol.SyncRequest, ip: str | None) -> protocol.SyncResponse:
    """Record a node's report and answer with its desired state if it moved.

    This is the hottest write of the control plane (every node, every few
    seconds), so a sync that changes nothing but the heartbeat costs one
    locked read and one narrow update, and does not wait for a durable commit:
    a crash can only lose a heartbeat that the next sync rewrites. Anything
    audited commits durably.
    """
    now = timezone.now()
    actor = Actor("node", str(node.uuid), ip)
    with transaction.atomic():
        # of=("self",): lock the node row only; the desired state is an outer
        # join that PostgreSQL will not lock (and need not).
        node = (Node.objects.select_for_update(of=("self",)).select_related("site", "desired")
                .get(pk=node.pk))
        if node.revoked_at is not None:
            raise TokenRefused("this node's credential was revoked")
        previous_status = node_status(last_seen_at=node.last_seen_at, revoked=False, now=now)
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
        if previous_status != NodeStatus.ONLINE:
            changes["status"] = (previous_status, NodeStatus.ONLINE)
        from policies.queries.services import dataset_catalog_report, query_deliveries

        # Before the new actual state is stored: the catalog is written only when the report changed.
        catalog_changed = dataset_catalog_report(node=node, report=request.actual.detail.get("datasets"), actor=actor)
        node.actual_state = request.actual.model_dump(mode="json")
        node.health = request.health.model_dump(mode="json")
        node.last_seen_at = now
        node.last_seen_ip = ip
        node.status = NodeStatus.ONLINE
        node.save(update_fields=["actual_state", "health", "last_seen_at", "last_seen_ip", "status",
                                 *(f for f in changes if f != "status")])
        audited = bool(changes or request.refusals or catalog_changed)
        if changes:
            audit_record(
                actor=actor, action="node.report", obj=node, site_uuid=node.site.uuid,
                before={k: v[0] for k, v in changes.items()}, after={k: v[1] for k, v in changes.items()},
            )
        from models_registry.services import model_status_report

        audited |= model_status_report(node=node, statuses=request.actual.models, actor=actor) > 0
        for refusal in request.refusals:
            audit_record(
                actor=actor, action="node.desired_state_refused", obj=node, site_uuid=node.site.uuid,
                after={"generation": refusal.generation, "reason": refusal.reason, "at": refusal.at.isoformat()},
            )
        desired: DesiredState | None = getattr(node, "desired", None)
        # The node applied more in this epoch than the database remembers (it
        # was restored from a backup): publish above what the node holds, or
        # the node would refuse every later state as older.
        ahead = (desired is not None and request.actual.applied_epoch == desired.epoch
                 and desired.generation < applied <= desired.generation + MAX_AHEAD)
        if ahead:
            logger.warning("node %s applied generation %d, above the %d this database holds: publishing above it",
                           node.uuid, applied, desired.generation if desired else 0)
        if request.actual.refusing is not None and request.actual.applied_epoch:
            _note_unknown_epoch(node, request.actual.applied_epoch)
        if desired is None or "hardware" in changes or ahead or desired.epoch != keys.current().epoch:
            # Placement depends on the hardware a node reports, and a new epoch
            # changes every state: republish (a no-op when the content is the same).
            desired = desired_state_publish(node=node, actor=Actor.system("sync"), above=applied if ahead else 0)
            audited = True
        # Marks new ones sent (an event row each): a query delivered is not lost to a commit that was not durable.
        queries = query_deliveries(node=node)
        audited |= bool(queries)
        if not audited and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
    if "status" in changes:
        broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
    return protocol.SyncResponse(
        generation=desired.generation,
        # A generation counts within its epoch: the same number in another epoch is another state.
        desired=(signed_desired_state(desired)
                 if applied != desired.generation or request.actual.applied_epoch != desired.epoch else None),
        sync_interval_s=settings.SYNC_INTERVAL_S,
        queries=queries,
    )


def _note_unknown_epoch(node: Node, epoch: str) -> None:
    """Say what to do when a refusing node is in an epoch this database never started (a restored backup)."""
    from orchestrator.models import Epoch

    try:
        known = Epoch.objects.filter(uuid=epoch).exists()
    except ValidationError:
        known = False
    if not known:
        logger.error("node %s refuses its desired state and is in epoch %s, which this database does not know: "
                     "it was restored from a backup taken before that epoch; run manage.py epoch_start", node.uuid,
                     epoch)


def node_liveness_sweep(*, now: dt.datetime | None = None) -> int:
    """Store status transitions of nodes that stopped syncing; audit each one.

    Safe to run twice: it only writes when a node's stored status differs from
    the one derived now. Returns how many nodes changed.
    """
    now = now or timezone.now()
    changed = 0
    stale_cut = now - dt.timedelta(seconds=settings.NODE_STALE_AFTER_S)
    offline_cut = now - dt.timedelta(seconds=settings.NODE_OFFLINE_AFTER_S)
    # Only nodes whose stored status is behind; each is re-checked under its lock.
    candidates = Node.objects.filter(revoked_at__isnull=True).filter(
        Q(status=NodeStatus.ONLINE, last_seen_at__lt=stale_cut)
        | Q(status=NodeStatus.STALE, last_seen_at__lt=offline_cut)
    )
    for node_id in candidates.values_list("pk", flat=True):
        with transaction.atomic():
            node = Node.objects.select_for_update().select_related("site").get(pk=node_id)
            status = node_status(last_seen_at=node.last_seen_at, revoked=node.revoked_at is not None, now=now)
            if status == node.status:
                continue
            before = node.status
            node.status = status
            node.save(update_fields=["status"])
            audit_record(
                actor=Actor.system("liveness"), action="node.status", obj=node, site_uuid=node.site.uuid,
                before={"status": before}, after={"status": status},
            )
            broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
            changed += 1
    return changed


def _region_fields(region: Region) -> dict[str, Any]:
    return {"slug": region.slug, "name": region.name, "description": region.description}


def region_update(*, actor: Actor, region: Region, **fields: Any) -> Region:
    """Change a region's attributes; the nodes of its sites get a new desired state if it changed.

    The region's slug is one of the site facts in every node's signed policy.
    """
    with transaction.atomic():
        region = Region.objects.select_for_update().get(pk=region.pk)
        before = _region_fields(region)
        for name, value in fields.items():
            setattr(region, name, value)
        region.full_clean()
        region.save()
        after = _region_fields(region)
        if after != before:
            audit_record(actor=actor, action="region.update", obj=region, before=before, after=after)
            nodes = Node.objects.filter(site__region=region, revoked_at__isnull=True).select_related("site")
            desired_state_publish_many(nodes=list(nodes), actor=actor)
    return region

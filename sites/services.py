"""Writes for regions, sites, tokens and nodes. Each runs in one transaction
and writes its audit event in it."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from audit.services import Actor, AuditEntry, audit_record, audit_record_many
from edge_runtime import protocol
from orchestrator import quiet
from orchestrator.desired_state import desired_state_publish, desired_state_publish_many
from orchestrator.realtime import FLEET_GROUP, broadcast
from sites.heartbeats import heartbeats_flush
from sites.liveness import node_status
from sites.models import (
    IDENTITY_KEY_UNIQUE,
    Connectivity,
    EnrollmentToken,
    Node,
    NodeStatus,
    Region,
    Site,
    key_fingerprint,
)

TOKEN_PREFIX = "ewt_"
CREDENTIAL_PREFIX = "ewn_"
MAX_TOKEN_LIFETIME = dt.timedelta(days=30)

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
        "expired_bundles": site.expired_bundles,
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


def _changed(obj: Any, fields: dict[str, Any], read: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set ``fields`` on ``obj``, validate and save it; its audited fields (``read``) before and after."""
    before = read(obj)
    for name, value in fields.items():
        setattr(obj, name, value)
    obj.full_clean()
    obj.save()
    return before, read(obj)


def site_update(*, actor: Actor, site: Site, **fields: Any) -> Site:
    """Change a site's attributes; its nodes get a new desired state if it changed."""
    with transaction.atomic():
        site = Site.objects.select_for_update().select_related("region").get(pk=site.pk)
        before, after = _changed(site, fields, _site_fields)
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


def identity_key_taken(key: str, *, other_than: Node | None = None) -> str | None:
    """Why ``key`` cannot be registered (it is another node's, revoked or not); None when it is free (or "")."""
    if not key:
        return None
    holders = Node.objects.select_related("site").filter(identity_key=key)
    holder = (holders.exclude(pk=other_than.pk) if other_than is not None else holders).first()
    if holder is None:
        return None
    revoked = " (revoked)" if holder.revoked_at is not None else ""
    return (f"identity key {key_fingerprint(key)[:16]} is already registered to node {holder.name}{revoked} at site "
            f"{holder.site.slug}: one key, one node; a node needs a key of its own")


def node_enroll(*, request: protocol.EnrollRequest, ip: str | None) -> tuple[Node, str]:
    """Trade a token for a node and its credential (returned once, stored hashed).

    Safe under concurrency: the token's use counter is taken with a conditional
    UPDATE, so a token allowing N uses enrolls exactly N nodes however many
    arrive at once. Any failure rolls back the use as well as the node. The
    node's identity key, when it sends one, must be no other node's.
    """
    now = timezone.now()
    token = EnrollmentToken.objects.select_related("site").filter(token_hash=secret_hash(request.token)).first()
    if token is None:
        raise TokenUnknown("unknown enrollment token", field="token")
    _token_usable(token, now)
    key = request.identity_key or ""
    if refused := identity_key_taken(key):
        raise SitesError(refused, field="identity_key")
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
                identity_key=key, identity_key_at=now if key else None,
            )
            audit_record(
                actor=Actor("node", str(node.uuid), ip),
                action="node.enroll",
                obj=node,
                site_uuid=token.site.uuid,
                after={"name": node.name, "role": node.role, "token": token.prefix, "hardware": node.hardware,
                       "identity_key": node.identity_fingerprint},
            )
            desired_state_publish(node=node, actor=Actor.system("enrollment"))
    except IntegrityError as exc:
        raise _enroll_conflict(exc, request=request, site=token.site) from exc
    broadcast(FLEET_GROUP, "fleet.changed", {"site": str(token.site.uuid)})
    return node, credential


def _enroll_conflict(exc: IntegrityError, *, request: protocol.EnrollRequest, site: Site) -> SitesError:
    """What a unique constraint refused: the node's identity key, or its name at the site."""
    # PostgreSQL names the constraint, SQLite the column.
    if IDENTITY_KEY_UNIQUE in str(exc) or "identity_key" in str(exc):
        # Registered to another node since the check before the transaction.
        return SitesError(identity_key_taken(request.identity_key or "")
                          or "this identity key was just registered to another node", field="identity_key")
    return NodeNameTaken(f"a node named {request.name!r} is already enrolled at site {site.slug!r}; "
                         "revoke it first or choose another name", field="name")


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
        # The identity key stays registered to the node, and so is never accepted for another one.
        revoked_key = {"identity_key_revoked": node.identity_fingerprint} if node.identity_key else {}
        audit_record(actor=actor, action="node.revoke", obj=node, site_uuid=node.site.uuid, before=before,
                     after={"status": node.status, **revoked_key})
        # Its next sync is refused by the database, not answered from a snapshot (orchestrator.quiet).
        quiet.attention([node.uuid])
    broadcast(FLEET_GROUP, "fleet.changed", {"site": str(node.site.uuid)})
    return node


SWEEP_BATCH = 1000


def node_liveness_sweep(*, now: dt.datetime | None = None) -> int:
    """Store status transitions of nodes that stopped syncing; audit each one.

    Safe to run twice: it only writes when a node's stored status differs from
    the one derived now. Returns how many nodes changed. Nodes are taken in
    batches of SWEEP_BATCH, each batch locked, updated, audited and announced
    in a few statements (a region whose link drops turns thousands stale at once).
    """
    # What quiet syncs heard first, so that a node heard from in time is not counted silent.
    heartbeats_flush()
    now = now or timezone.now()
    stale_cut = now - dt.timedelta(seconds=settings.NODE_STALE_AFTER_S)
    offline_cut = now - dt.timedelta(seconds=settings.NODE_OFFLINE_AFTER_S)
    # Only nodes whose stored status is behind; each batch is re-checked under its lock.
    # An air-gapped site's nodes are heard from by bundle: their silence is no transition to record.
    heard = Node.objects.filter(revoked_at__isnull=True).exclude(site__connectivity=Connectivity.AIR_GAPPED)
    candidates = list(heard.filter(
        Q(status=NodeStatus.ONLINE, last_seen_at__lt=stale_cut)
        | Q(status=NodeStatus.STALE, last_seen_at__lt=offline_cut)
    ).order_by("pk").values_list("pk", flat=True))
    return sum(_sweep_batch(candidates[i:i + SWEEP_BATCH], now) for i in range(0, len(candidates), SWEEP_BATCH))


def _sweep_batch(node_ids: list[int], now: dt.datetime) -> int:
    with transaction.atomic():
        nodes = list(Node.objects.select_for_update(of=("self",)).select_related("site")
                     .filter(pk__in=node_ids).order_by("pk"))
        moved: list[tuple[Node, str, str]] = []
        for node in nodes:
            status = node_status(last_seen_at=node.last_seen_at, revoked=node.revoked_at is not None, now=now)
            if status != node.status:
                moved.append((node, node.status, status))
        for status in {after for _, _, after in moved}:
            Node.objects.filter(pk__in=[n.pk for n, _, after in moved if after == status]).update(status=status)
        audit_record_many(actor=Actor.system("liveness"), action="node.status", entries=[
            AuditEntry(obj=node, site_uuid=node.site.uuid, before={"status": before}, after={"status": after})
            for node, before, after in moved])
        for site_uuid in sorted({str(node.site.uuid) for node, _, _ in moved}):
            broadcast(FLEET_GROUP, "fleet.changed", {"site": site_uuid})
        # Heard from again, the node takes the whole path, which records its return.
        quiet.attention(node.uuid for node, _, _ in moved)
    return len(moved)


def _region_fields(region: Region) -> dict[str, Any]:
    return {"slug": region.slug, "name": region.name, "description": region.description}


def region_update(*, actor: Actor, region: Region, **fields: Any) -> Region:
    """Change a region's attributes; the nodes of its sites get a new desired state if it changed.

    The region's slug is one of the site facts in every node's signed policy.
    """
    with transaction.atomic():
        region = Region.objects.select_for_update().get(pk=region.pk)
        before, after = _changed(region, fields, _region_fields)
        if after != before:
            audit_record(actor=actor, action="region.update", obj=region, before=before, after=after)
            nodes = Node.objects.filter(site__region=region, revoked_at__isnull=True).select_related("site")
            desired_state_publish_many(nodes=list(nodes), actor=actor)
    return region

"""Regions, sites, nodes, enrollment tokens and desired states."""

from __future__ import annotations

import base64
import uuid
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from core.permissions import RestrictedQuerySet, Scope
from edge_runtime import signing

if TYPE_CHECKING:
    from django_stubs_ext import StrPromise

# Typed as Meta.permissions is, so that each model's Meta takes them as they are.
SITE_PERMISSIONS: list[tuple[str, str | StrPromise]] = [
    ("operate_site", "Operate the site (tokens, installers, deployments)"),
    ("approve_site", "Approve changes at the site"),
    ("administer_site", "Administer the site"),
]
REGION_PERMISSIONS: list[tuple[str, str | StrPromise]] = [
    ("operate_region", "Operate every site in the region"),
    ("approve_region", "Approve changes at every site in the region"),
    ("administer_region", "Administer every site in the region"),
]


class Region(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    slug = models.SlugField(max_length=60, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("sites")

    class Meta:
        ordering = ["name"]
        permissions = REGION_PERMISSIONS

    def __str__(self) -> str:
        return self.name


class Connectivity(models.TextChoices):
    CONNECTED = "connected", "Connected"  # a link that is normally up
    INTERMITTENT = "intermittent", "Intermittent"  # a link that comes and goes
    AIR_GAPPED = "air_gapped", "Air-gapped"  # no link; bundles are carried in and out


class ExpiredBundles(models.TextChoices):
    REFUSE = "refuse", "Refuse"
    WARN = "warn", "Accept, with a recorded warning"


class Clearance(models.IntegerChoices):
    PUBLIC = 0, "Public"
    INTERNAL = 1, "Internal"
    CONFIDENTIAL = 2, "Confidential"
    SECRET = 3, "Secret"


class Site(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    slug = models.SlugField(max_length=60, unique=True)
    name = models.CharField(max_length=100)
    region = models.ForeignKey(Region, on_delete=models.PROTECT, related_name="sites")
    # ISO 3166 country code or a wider jurisdiction ("EU"): where the data is governed.
    jurisdiction = models.CharField(max_length=20, blank=True)
    clearance = models.PositiveSmallIntegerField(choices=Clearance.choices, default=Clearance.INTERNAL)
    connectivity = models.CharField(max_length=20, choices=Connectivity.choices, default=Connectivity.CONNECTED)
    latitude = models.FloatField(null=True, blank=True, validators=[MinValueValidator(-90), MaxValueValidator(90)])
    longitude = models.FloatField(null=True, blank=True, validators=[MinValueValidator(-180), MaxValueValidator(180)])
    labels = models.JSONField(default=dict, blank=True)
    # What a node of this site does with a bundle in that has expired: a site may stay cut off for months.
    expired_bundles = models.CharField(max_length=10, choices=ExpiredBundles.choices, default=ExpiredBundles.REFUSE)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site()

    class Meta:
        ordering = ["name"]
        permissions = SITE_PERMISSIONS

    def __str__(self) -> str:
        return self.name


class NodeRole(models.TextChoices):
    DEVICE = "device", "Device"  # a small box next to a machine or a till
    GATEWAY = "gateway", "Gateway"  # the site's uplink and aggregation point
    SERVER = "server", "Server"  # on-premise compute


# The database's guarantee that one identity key belongs to one node, revoked or not.
IDENTITY_KEY_UNIQUE = "node_identity_key_unique"


class NodeStatus(models.TextChoices):
    PENDING = "pending", "Pending"  # enrolled, has not synced yet
    ONLINE = "online", "Online"  # synced within the stale interval
    STALE = "stale", "Stale"  # missed syncs, not yet offline
    OFFLINE = "offline", "Offline"  # no sync within the offline interval
    REVOKED = "revoked", "Revoked"  # credential revoked; refused from now on


class Node(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="nodes")
    name = models.CharField(max_length=100)
    role = models.CharField(max_length=10, choices=NodeRole.choices, default=NodeRole.DEVICE)
    # sha256 of the node's credential; the credential itself is never stored.
    credential_hash = models.CharField(max_length=64, unique=True, editable=False)
    hardware = models.JSONField(default=dict, blank=True)
    runtime_version = models.CharField(max_length=50, blank=True)
    enrolled_at = models.DateTimeField(auto_now_add=True)
    enrolled_with = models.ForeignKey(
        "EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="nodes"
    )
    last_seen_at = models.DateTimeField(null=True, blank=True, db_index=True)
    last_seen_ip = models.GenericIPAddressField(null=True, blank=True)
    # The status as of the last liveness sweep; pages derive the live status
    # from last_seen_at (see sites.liveness) so they are never behind the sweep.
    status = models.CharField(max_length=10, choices=NodeStatus.choices, default=NodeStatus.PENDING)
    applied_generation = models.PositiveIntegerField(default=0)
    actual_state = models.JSONField(default=dict, blank=True)
    health = models.JSONField(default=dict, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # The node's own Ed25519 public key (raw, base64), registered at enrollment
    # or on its first sync that carried one; it signs the node's audit log.
    # One key, one node: kept when the node is revoked, never registered again.
    identity_key = models.CharField(max_length=44, blank=True, editable=False)
    identity_key_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A different key the node presented since: not trusted until an operator accepts it.
    identity_key_pending = models.CharField(max_length=44, blank=True, editable=False)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site")

    class Meta:
        ordering = ["site__name", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["site", "name"],
                condition=models.Q(revoked_at__isnull=True),
                name="node_name_unique_per_site_while_active",
            ),
            models.UniqueConstraint(
                fields=["identity_key"], condition=~models.Q(identity_key=""), name=IDENTITY_KEY_UNIQUE,
            ),
        ]

    def __str__(self) -> str:
        return f"{self.site.slug}/{self.name}" if self.site_id else self.name

    @property
    def identity_fingerprint(self) -> str:
        return key_fingerprint(self.identity_key)

    @property
    def pending_fingerprint(self) -> str:
        return key_fingerprint(self.identity_key_pending)


def key_fingerprint(key: str) -> str:
    """The hex sha256 of a raw public key given in base64; "" for no key."""
    return signing.fingerprint(base64.b64decode(key)) if key else ""


class EnrollmentToken(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    site = models.ForeignKey(Site, on_delete=models.CASCADE, related_name="tokens")
    # sha256 of the token; the token itself is shown once, at creation.
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The first characters, to recognise a token in lists without revealing it.
    prefix = models.CharField(max_length=12, editable=False)
    note = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField()
    max_uses = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(10_000)])
    uses = models.PositiveIntegerField(default=0)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.site.slug})" if self.site_id else self.prefix


class BundleDirection(models.TextChoices):
    IN = "in", "In (to the site)"
    OUT = "out", "Out (from a node)"


class SiteBundle(models.Model):
    """One bundle made for a site (in) or taken from one of its nodes (out): ``sites.bundles``."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="bundles")
    # The node that wrote a bundle out; null for a bundle in.
    node = models.ForeignKey(Node, null=True, blank=True, on_delete=models.PROTECT, related_name="bundles")
    direction = models.CharField(max_length=3, choices=BundleDirection.choices)
    sequence = models.BigIntegerField()
    # When the bundle was made (by the control plane, or by the node), and until when a bundle in is fresh.
    made_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    # sha256 of the signed metadata: one bundle, whatever the file it came in is called.
    digest = models.CharField(max_length=64)
    size = models.BigIntegerField(default=0)
    # What it holds (counts per kind, artifacts); for a bundle out, what was ingested and the receipt given.
    summary = models.JSONField(default=dict)
    receipt = models.JSONField(default=dict, blank=True)
    by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    recorded_at = models.DateTimeField(auto_now_add=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("site")

    class Meta:
        ordering = ["-recorded_at"]
        constraints = [
            models.UniqueConstraint(fields=["site", "sequence"], condition=models.Q(direction="in"),
                                    name="bundle_in_sequence_unique_per_site"),
            models.UniqueConstraint(fields=["node", "sequence"], condition=models.Q(direction="out"),
                                    name="bundle_out_sequence_unique_per_node"),
        ]

    def __str__(self) -> str:
        return f"{self.direction} {self.sequence} ({self.site.slug})" if self.site_id else str(self.sequence)


# Registered with this app; defined in sites.telemetry.
from sites.telemetry.models import TelemetryGap, TelemetrySample, TelemetryStream  # noqa: E402, F401

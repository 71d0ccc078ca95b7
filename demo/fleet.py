"""The demo's fleet: three regions, three sites, the nodes that run at them, and the admin user.

Everything is written through the same services an operator's actions use,
so the demo's regions, sites, tokens and nodes appear in the audit trail like
any others. Every function here is safe to run again: it reuses what exists.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from audit.services import Actor, audit_record
from sites import services
from sites.models import Node, Region, Site

ACTOR = Actor.system("demo")
ADMIN_USERNAME = "admin"


@dataclass(frozen=True)
class DemoRegion:
    slug: str
    name: str
    description: str


@dataclass(frozen=True)
class DemoNode:
    name: str
    role: str  # a sites.models.NodeRole value


@dataclass(frozen=True)
class DemoSite:
    slug: str
    name: str
    region: str  # DemoRegion.slug
    jurisdiction: str
    connectivity: str  # a sites.models.Connectivity value
    latitude: float
    longitude: float
    labels: dict[str, str] = field(default_factory=dict)
    nodes: tuple[DemoNode, ...] = ()


REGIONS: tuple[DemoRegion, ...] = (
    DemoRegion("europe", "Europe", "Plants and offices in the EU; data governed under GDPR."),
    DemoRegion("americas", "Americas", "Retail stores in North and South America."),
    DemoRegion("asia-pacific", "Asia-Pacific", "Hospitals and clinics in Japan and Australia."),
)

SITES: tuple[DemoSite, ...] = (
    DemoSite(
        slug="plant-berlin", name="Plant Berlin", region="europe", jurisdiction="DE",
        connectivity="connected", latitude=52.5200, longitude=13.4050,
        labels={"kind": "plant", "line": "assembly", "tier": "production"},
        nodes=(DemoNode("gw-1", "gateway"), DemoNode("line-3", "device")),
    ),
    DemoSite(
        slug="store-042", name="Store 042", region="americas", jurisdiction="US",
        connectivity="intermittent", latitude=41.8781, longitude=-87.6298,
        labels={"kind": "store", "format": "urban", "tier": "production"},
        nodes=(DemoNode("pos-1", "device"),),
    ),
    DemoSite(
        slug="hospital-osaka", name="Hospital Osaka", region="asia-pacific", jurisdiction="JP",
        connectivity="connected", latitude=34.6937, longitude=135.5023,
        labels={"kind": "hospital", "department": "radiology", "tier": "production"},
        nodes=(DemoNode("srv-1", "server"),),
    ),
)


def admin_reset() -> str:
    """Create the superuser ``admin`` or reset its password; returns the new password."""
    password = secrets.token_urlsafe(12)
    User = get_user_model()
    with transaction.atomic():
        user, created = User.objects.get_or_create(
            username=ADMIN_USERNAME, defaults={"email": "admin@example.org"}
        )
        user.is_staff = True
        user.is_superuser = True
        user.is_active = True
        user.set_password(password)
        user.save()
        audit_record(
            actor=ACTOR, action="user.create" if created else "user.password_reset", obj=user,
            after={"username": ADMIN_USERNAME, "superuser": True},
        )
    return password


def regions_ensure() -> dict[str, Region]:
    regions: dict[str, Region] = {}
    for spec in REGIONS:
        region = Region.objects.filter(slug=spec.slug).first()
        if region is None:
            region = services.region_create(
                actor=ACTOR, slug=spec.slug, name=spec.name, description=spec.description
            )
        regions[spec.slug] = region
    return regions


def sites_ensure() -> list[Site]:
    """The demo sites, created where missing. An existing site keeps its attributes
    (an operator may have edited them while exploring)."""
    regions = regions_ensure()
    sites: list[Site] = []
    for spec in SITES:
        site = Site.objects.select_related("region").filter(slug=spec.slug).first()
        if site is None:
            fields: dict[str, Any] = {
                "jurisdiction": spec.jurisdiction,
                "connectivity": spec.connectivity,
                "latitude": spec.latitude,
                "longitude": spec.longitude,
                "labels": dict(spec.labels),
            }
            site = services.site_create(
                actor=ACTOR, region=regions[spec.region], slug=spec.slug, name=spec.name, **fields
            )
        sites.append(site)
    return sites


def site_spec(slug: str) -> DemoSite:
    return next(spec for spec in SITES if spec.slug == slug)


def node_active(site: Site, name: str) -> Node | None:
    return Node.objects.filter(site=site, name=name, revoked_at__isnull=True).first()


def node_retire(node: Node) -> None:
    """Revoke a demo node whose state directory is gone, so its name can enroll again."""
    services.node_revoke(actor=ACTOR, node=node)


def enrollment_token(site: Site) -> str:
    """A one-use token, valid for ten minutes: long enough to enroll one demo node."""
    _, value = services.token_create(
        actor=ACTOR, site=site, max_uses=1, lifetime=dt.timedelta(minutes=10), note="demo"
    )
    return value

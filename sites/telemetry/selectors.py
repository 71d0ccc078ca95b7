"""Reads of telemetry: the stream position, chart history, model health, the fleet map.

Reads for a page take the site the view already resolved for its user (so
its nodes are the user's to see) or the user itself (:func:`site_map_list`,
narrowed through ``restrict``). :func:`model_health` is for the control
plane's own decisions (rollout health gates) and takes node ids, not a user.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db.models import F, Max, Q, Sum
from django.urls import reverse
from django.utils import timezone

from sites.liveness import AIR_GAPPED, node_status, shown_confirmed_at, shown_status, site_status
from sites.models import Node, NodeStatus, Site
from sites.telemetry.models import COARSE, FINE, TelemetryGap, TelemetrySample, TelemetryStream

CHART_WINDOW = dt.timedelta(minutes=15)


def telemetry_position(*, node_id: int) -> int:
    """The highest sequence number committed for the node (0 before its first point)."""
    return TelemetryStream.objects.filter(node_id=node_id).values_list("last_seq", flat=True).first() or 0


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def confirmed_at(last_seen_at: dt.datetime | None, telemetry_at: dt.datetime | None) -> dt.datetime | None:
    """When the node's link was last confirmed: its newest sync or telemetry, whichever is later."""
    times = [t for t in (last_seen_at, telemetry_at) if t is not None]
    return max(times) if times else None


def telemetry_history(*, node_ids: Iterable[int], since: dt.datetime, resolution: int = FINE) -> list[dict[str, Any]]:
    """History rows of these nodes since ``since``, oldest first, as the charts read them."""
    rows = (TelemetrySample.objects.filter(node_id__in=list(node_ids), resolution=resolution, bucket__gte=since)
            .annotate(node_uuid=F("node__uuid")).order_by("bucket", "node_id", "model", "version"))
    out: list[dict[str, Any]] = []
    for r in rows:
        out.append({
            "node": str(r.node_uuid), "bucket": r.bucket.isoformat(), "model": r.model, "version": r.version,
            "points": r.points, "interval_sum": r.interval_sum, "requests": r.requests, "errors": r.errors,
            "latency_weight": r.latency_weight, "latency_p50_wsum": r.latency_p50_wsum,
            "latency_p95_wsum": r.latency_p95_wsum, "queue_depth_max": r.queue_depth_max,
            "cpu_sum": r.cpu_sum, "memory_used_sum": r.memory_used_sum, "memory_total_max": r.memory_total_max,
            "disk_used_sum": r.disk_used_sum, "disk_total_max": r.disk_total_max,
        })
    return out


@dataclasses.dataclass(frozen=True)
class NodeTelemetry:
    node: Node
    status: str
    confirmed_at: dt.datetime | None
    received_at: dt.datetime | None
    last_seq: int
    points: int
    lost: int
    latest: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SiteTelemetry:
    nodes: list[NodeTelemetry]
    status: str
    confirmed_at: dt.datetime | None
    history: list[dict[str, Any]]
    gaps: list[TelemetryGap]
    window_s: int


def site_telemetry(*, site: Site, now: dt.datetime | None = None) -> SiteTelemetry:
    """What the site page shows of telemetry: each live node's newest point, 15 minutes of history, recent gaps."""
    now = now or timezone.now()
    nodes = list(Node.objects.filter(site=site, revoked_at__isnull=True).select_related("telemetry_stream")
                 .order_by("name"))
    rows: list[NodeTelemetry] = []
    for node in nodes:
        stream: TelemetryStream | None = getattr(node, "telemetry_stream", None)
        received = stream.received_at if stream else None
        rows.append(NodeTelemetry(
            node=node, status=node_status(last_seen_at=node.last_seen_at, revoked=False, now=now),
            confirmed_at=confirmed_at(node.last_seen_at, received), received_at=received,
            last_seq=stream.last_seq if stream else 0, points=stream.points if stream else 0,
            lost=stream.lost if stream else 0, latest=stream.latest if stream else {},
        ))
    times = [r.confirmed_at for r in rows if r.confirmed_at]
    return SiteTelemetry(
        nodes=rows,
        status=site_status([r.status for r in rows]),
        confirmed_at=max(times) if times else None,
        history=telemetry_history(node_ids=[n.pk for n in nodes], since=now - CHART_WINDOW),
        gaps=list(TelemetryGap.objects.filter(node__site=site).select_related("node").order_by("-received_at")[:10]),
        window_s=int(CHART_WINDOW.total_seconds()),
    )


@dataclasses.dataclass(frozen=True)
class ModelHealth:
    """A model version's health over a window, from the telemetry history.

    ``latency_p95_ms`` is the request-weighted mean of the nodes' interval
    p95s (exact percentiles do not survive downsampling);
    ``latency_p95_max_ms`` is the worst interval's. ``lost_points`` counts
    telemetry the nodes lost in the window: health judged on partial data
    should say so.
    """

    model: str
    version: str
    since: dt.datetime
    until: dt.datetime
    resolution: int
    nodes_reporting: int
    points: int
    requests: int
    errors: int
    error_rate: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p95_max_ms: float | None
    lost_points: int


def model_health(*, model: str, version: str, since: dt.datetime, until: dt.datetime | None = None,
                 node_ids: Iterable[int] | None = None) -> ModelHealth:
    """Requests, errors and latency of ``model@version`` between ``since`` and ``until`` (default now).

    ``node_ids`` narrows to some nodes (a rollout wave); None means every
    node. Reads the 10 s history while the window is within its retention,
    else the 5 min one; buckets are counted whole when they start inside
    the window.
    """
    until = until or timezone.now()
    if until <= since:
        raise ValueError(f"the window must end after it starts ({since.isoformat()} .. {until.isoformat()})")
    fine_kept_since = timezone.now() - dt.timedelta(seconds=settings.TELEMETRY_FINE_RETENTION_S)
    resolution = FINE if since >= fine_kept_since else COARSE
    rows = TelemetrySample.objects.filter(model=model, version=version, resolution=resolution,
                                          bucket__gte=since, bucket__lt=until)
    gaps = TelemetryGap.objects.filter(Q(end__gte=since) | Q(end__isnull=True, received_at__gte=since),
                                       Q(start__lt=until) | Q(start__isnull=True))
    if node_ids is not None:
        ids = list(node_ids)
        rows = rows.filter(node_id__in=ids)
        gaps = gaps.filter(node_id__in=ids)
    agg = rows.aggregate(points=Sum("points"), requests=Sum("requests"), errors=Sum("errors"),
                         weight=Sum("latency_weight"), p50=Sum("latency_p50_wsum"), p95=Sum("latency_p95_wsum"),
                         p95_max=Max("latency_p95_max"))
    nodes_reporting = rows.values("node_id").distinct().count()
    requests, errors, weight = int(agg["requests"] or 0), int(agg["errors"] or 0), int(agg["weight"] or 0)
    return ModelHealth(
        model=model, version=version, since=since, until=until, resolution=resolution,
        nodes_reporting=nodes_reporting, points=int(agg["points"] or 0), requests=requests, errors=errors,
        error_rate=errors / requests if requests else None,
        latency_p50_ms=round(agg["p50"] / weight, 3) if weight else None,
        latency_p95_ms=round(agg["p95"] / weight, 3) if weight else None,
        latency_p95_max_ms=agg["p95_max"] if weight else None,
        lost_points=int(gaps.aggregate(n=Sum("count"))["n"] or 0),
    )


def site_map_list(*, user: Any, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Every site ``user`` may see, as the fleet map draws it (sites without coordinates too, flagged)."""
    now = now or timezone.now()
    sites = list(Site.objects.select_related("region").restrict(user).order_by("name"))
    nodes = (Node.objects.filter(site__in=[s.pk for s in sites], revoked_at__isnull=True)
             .annotate(telemetry_at=F("telemetry_stream__received_at"))
             .only("id", "site_id", "last_seen_at", "revoked_at"))
    by_site: dict[int, list[Node]] = {}
    for node in nodes:
        by_site.setdefault(node.site_id, []).append(node)
    out: list[dict[str, Any]] = []
    for site in sites:
        members = by_site.get(site.pk, [])
        statuses = [node_status(last_seen_at=n.last_seen_at, revoked=False, now=now) for n in members]
        status = shown_status(site_status(statuses), connectivity=site.connectivity)
        confirmed = shown_confirmed_at(connectivity=site.connectivity, last_seen=[n.last_seen_at for n in members],
                                       telemetry=[n.telemetry_at for n in members])  # type: ignore[attr-defined]
        out.append({
            "uuid": str(site.uuid), "slug": site.slug, "name": site.name,
            "region": site.region.slug, "region_name": site.region.name,
            "lat": site.latitude, "lon": site.longitude, "connectivity": site.get_connectivity_display(),
            "status": status, "label": status_label(status, confirmed),
            "nodes_online": sum(1 for s in statuses if s == NodeStatus.ONLINE), "nodes_total": len(members),
            "confirmed_at": _iso(confirmed),
            "url": reverse("sites:site-detail", args=[site.slug]),
        })
    return out


def status_label(status: str, confirmed: dt.datetime | None) -> str:
    """The words of a site's status on the map (the time itself follows, ageing on screen)."""
    if status == AIR_GAPPED:
        return "air-gapped, last confirmed" if confirmed else "air-gapped, nothing confirmed yet"
    return "no nodes" if status == "empty" else status


@dataclasses.dataclass(frozen=True)
class SiteConfirmation:
    status: str
    confirmed_at: dt.datetime | None


def site_confirmation(*, site: Site, now: dt.datetime | None = None) -> SiteConfirmation:
    """The site's status and when its link was last confirmed (newest sync or telemetry of a live node)."""
    now = now or timezone.now()
    nodes = list(Node.objects.filter(site=site, revoked_at__isnull=True)
                 .annotate(telemetry_at=F("telemetry_stream__received_at")).only("id", "last_seen_at"))
    statuses = [node_status(last_seen_at=n.last_seen_at, revoked=False, now=now) for n in nodes]
    return SiteConfirmation(
        status=shown_status(site_status(statuses), connectivity=site.connectivity),
        confirmed_at=shown_confirmed_at(connectivity=site.connectivity, last_seen=[n.last_seen_at for n in nodes],
                                        telemetry=[n.telemetry_at for n in nodes]),
    )

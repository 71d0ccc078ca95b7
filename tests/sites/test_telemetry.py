"""Telemetry at the control plane: idempotent commits, gaps, downsampled history, model health, retention."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from sites import services
from sites.models import Node, Site, TelemetryGap, TelemetrySample, TelemetryStream
from sites.telemetry.selectors import model_health, site_map_list, site_telemetry
from sites.telemetry.services import Submission, bucket_start, telemetry_commit, telemetry_prune

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)


def _node(site: Site, name: str = "gw-1") -> Node:
    request = protocol.EnrollRequest(token=services.token_create(actor=Actor.system("test"), site=site)[1], name=name)
    return services.node_enroll(request=request, ip=None)[0]


def point(seq: int, at: dt.datetime, *, requests: int = 10, errors: int = 0, p50: float = 2.0, p95: float = 8.0,
          cpu: float = 20.0, model: str = "resnet", version: str = "1") -> protocol.TelemetryPoint:
    return protocol.TelemetryPoint(
        seq=seq, at=at, interval_s=1.0,
        resources=protocol.NodeResources(cpu_percent=cpu, memory_used_mb=512, memory_total_mb=2048,
                                         disk_used_mb=100, disk_total_mb=1000),
        models=[protocol.ModelTelemetry(model=model, version=version, requests=requests, errors=errors,
                                        latency_p50_ms=p50 if requests else None,
                                        latency_p95_ms=p95 if requests else None)],
    )


def gap(first: int, last: int, start: dt.datetime, end: dt.datetime) -> protocol.TelemetryGap:
    return protocol.TelemetryGap(seq=first, last_seq=last, count=last - first + 1, start=start, end=end)


def commit(node: Node, *items: Any, now: dt.datetime | None = None) -> int:
    sub = Submission(node_id=node.pk, node_uuid=str(node.uuid), site_uuid=str(node.site.uuid),
                     frame=protocol.TelemetryFrame(items=list(items)))
    return telemetry_commit(submissions=[sub], now=now or T0 + dt.timedelta(minutes=1)).marks[node.pk]


def test_it_counts_a_resent_point_once(site_berlin: Site) -> None:
    node = _node(site_berlin)
    assert commit(node, *(point(s, T0 + dt.timedelta(seconds=s)) for s in (1, 2, 3))) == 3
    # The ack was lost: the node sends 1-3 again, with 4.
    assert commit(node, *(point(s, T0 + dt.timedelta(seconds=s)) for s in (1, 2, 3, 4))) == 4

    stream = TelemetryStream.objects.get(node=node)
    assert (stream.last_seq, stream.points, stream.lost) == (4, 4, 0)
    fine = TelemetrySample.objects.filter(node=node, resolution=10, model="")
    assert sum(r.points for r in fine) == 4
    assert sum(r.requests for r in TelemetrySample.objects.filter(node=node, resolution=10, model="resnet")) == 40
    assert not TelemetryGap.objects.exists()


def test_it_records_a_gap_only_for_the_points_it_does_not_hold(site_berlin: Site) -> None:
    node = _node(site_berlin)
    commit(node, *(point(s, T0 + dt.timedelta(seconds=s)) for s in (1, 2, 3)))
    # The node lost 2-6 to its disk budget after 2 and 3 had already arrived.
    assert commit(node, gap(2, 6, T0, T0 + dt.timedelta(seconds=6)), point(7, T0 + dt.timedelta(seconds=7))) == 7

    recorded = TelemetryGap.objects.get(node=node)
    assert (recorded.first_seq, recorded.last_seq, recorded.count, recorded.reason) == (4, 6, 3, "disk_budget")
    stream = TelemetryStream.objects.get(node=node)
    assert (stream.points, stream.lost, stream.last_seq) == (4, 3, 7)
    event = AuditEvent.objects.get(action="node.telemetry_gap")
    assert event.after["count"] == 3 and event.site_uuid == site_berlin.uuid


def test_it_records_points_that_never_arrived(site_berlin: Site) -> None:
    node = _node(site_berlin)
    commit(node, point(1, T0), point(4, T0 + dt.timedelta(seconds=4)))

    missing = TelemetryGap.objects.get(node=node)
    assert (missing.first_seq, missing.last_seq, missing.count, missing.reason) == (2, 3, 2, "missing")
    assert TelemetryStream.objects.get(node=node).lost == 2


def test_it_refuses_a_frame_out_of_order() -> None:
    with pytest.raises(ValueError, match="increasing seq order: 2 follows 3"):
        protocol.TelemetryFrame(items=[point(3, T0), point(2, T0)])
    with pytest.raises(ValueError, match="holds 5 points, not 4"):
        protocol.TelemetryGap(seq=2, last_seq=6, count=4, start=T0, end=T0)


def test_it_folds_points_into_10s_and_5min_buckets(site_berlin: Site) -> None:
    node = _node(site_berlin)
    at = [T0 + dt.timedelta(seconds=s) for s in (0, 4, 12, 299, 301)]
    commit(node, *(point(i + 1, t, cpu=10.0 * (i + 1)) for i, t in enumerate(at)))

    fine = {r.bucket: r for r in TelemetrySample.objects.filter(node=node, resolution=10, model="")}
    assert [(b - T0).total_seconds() for b in sorted(fine)] == [0, 10, 290, 300]
    assert fine[T0].points == 2 and fine[T0].cpu_sum == 30.0 and fine[T0].cpu_max == 20.0
    coarse = {r.bucket: r.points for r in TelemetrySample.objects.filter(node=node, resolution=300, model="")}
    assert coarse == {T0: 4, T0 + dt.timedelta(seconds=300): 1}
    assert bucket_start(T0 + dt.timedelta(seconds=9.9), 10) == T0


@override_settings(TELEMETRY_FINE_RETENTION_S=10 * 365 * 86400.0, TELEMETRY_COARSE_RETENTION_S=10 * 365 * 86400.0)
def test_it_tells_a_model_versions_health(site_berlin: Site) -> None:
    a, b = _node(site_berlin, "a"), _node(site_berlin, "b")
    commit(a, point(1, T0, requests=100, errors=5, p50=2.0, p95=10.0),
           point(2, T0 + dt.timedelta(seconds=1), requests=0))
    commit(b, point(1, T0, requests=300, errors=0, p50=4.0, p95=20.0),
           point(2, T0, requests=50, version="2", errors=50))

    health = model_health(model="resnet", version="1", since=T0 - dt.timedelta(minutes=1),
                          until=T0 + dt.timedelta(minutes=1))
    assert (health.requests, health.errors, health.nodes_reporting, health.points) == (400, 5, 2, 3)
    assert health.error_rate == pytest.approx(5 / 400)
    # Weighted by requests: (2*100 + 4*300) / 400 and (10*100 + 20*300) / 400.
    assert health.latency_p50_ms == pytest.approx(3.5) and health.latency_p95_ms == pytest.approx(17.5)
    assert health.latency_p95_max_ms == 20.0 and health.resolution == 10
    only_a = model_health(model="resnet", version="1", since=T0 - dt.timedelta(minutes=1),
                          until=T0 + dt.timedelta(minutes=1), node_ids=[a.pk])
    assert (only_a.requests, only_a.errors) == (100, 5)
    with pytest.raises(ValueError, match="must end after it starts"):
        model_health(model="resnet", version="1", since=T0, until=T0)


def test_it_prunes_history_past_its_retention(site_berlin: Site) -> None:
    node = _node(site_berlin)
    now = timezone.now()
    commit(node, point(1, now - dt.timedelta(days=2)), point(2, now - dt.timedelta(minutes=5)), now=now)
    before = TelemetrySample.objects.count()

    with override_settings(TELEMETRY_FINE_RETENTION_S=3600.0, TELEMETRY_COARSE_RETENTION_S=86400.0):
        deleted = telemetry_prune(now=now)
    assert deleted == 4  # the old point's fine and coarse rows, resources and model each
    assert TelemetrySample.objects.count() == before - 4
    assert not TelemetrySample.objects.filter(bucket__lt=now - dt.timedelta(days=1)).exists()


def test_it_confirms_a_site_by_its_newest_sync_or_telemetry(site_berlin: Site, operator: Any) -> None:
    node = _node(site_berlin)
    synced = timezone.now() - dt.timedelta(minutes=10)
    Node.objects.filter(pk=node.pk).update(last_seen_at=synced)
    [row] = site_map_list(user=operator)
    assert row["confirmed_at"] == synced.isoformat() and row["status"] == "offline"

    received = timezone.now()
    commit(node, point(1, received), now=received)
    [row] = site_map_list(user=operator)
    # The link answered just now, but the node has not synced: still offline, honestly dated.
    assert row["confirmed_at"] == received.isoformat() and row["status"] == "offline"
    page = site_telemetry(site=site_berlin)
    assert page.confirmed_at == received and page.nodes[0].latest["seq"] == 1


def test_it_maps_only_the_sites_a_user_may_see(site_berlin: Site, site_ohio: Site, operator: Any,
                                               stranger: Any, admin_user: Any) -> None:
    assert [s["slug"] for s in site_map_list(user=operator)] == ["plant-berlin"]
    assert site_map_list(user=stranger) == []
    assert {s["slug"] for s in site_map_list(user=admin_user)} == {"plant-berlin", "plant-ohio"}

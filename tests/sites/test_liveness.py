"""Node status from its syncs, and the sweep that records transitions."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from sites import services
from sites.liveness import node_status, site_status
from sites.models import Node, Site
from sites.sync import node_sync

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0, "online"), (30, "online"), (31, "stale"), (120, "stale"), (121, "offline")],
)
def test_it_derives_status_from_the_age_of_the_last_sync(age: int, expected: str) -> None:
    seen = NOW - dt.timedelta(seconds=age)
    assert node_status(last_seen_at=seen, revoked=False, now=NOW, stale_after=30, offline_after=120) == expected


def test_it_calls_a_never_synced_node_pending_and_a_revoked_one_revoked() -> None:
    assert node_status(last_seen_at=None, revoked=False, now=NOW) == "pending"
    assert node_status(last_seen_at=NOW, revoked=True, now=NOW) == "revoked"


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [([], "empty"), (["online", "online"], "online"), (["online", "stale"], "degraded"),
     (["offline", "stale"], "offline"), (["online", "revoked"], "online"), (["revoked"], "empty")],
)
def test_it_summarises_a_site(statuses: list[str], expected: str) -> None:
    assert site_status(statuses) == expected


def _enrolled(site: Site, name: str = "n1") -> Node:
    _, token = services.token_create(actor=Actor.system("test"), site=site)
    node, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name=name), ip="127.0.0.1")
    node_sync(node=node, request=protocol.SyncRequest(), ip="127.0.0.1")
    return Node.objects.get(pk=node.pk)


@pytest.mark.django_db
def test_it_sweeps_a_silent_node_to_stale_then_offline_and_audits_each_step(site_berlin: Site, settings) -> None:
    node = _enrolled(site_berlin)
    assert node.status == "online"
    seen = node.last_seen_at
    assert seen is not None
    stale_at = seen + dt.timedelta(seconds=settings.NODE_STALE_AFTER_S + 1)
    offline_at = seen + dt.timedelta(seconds=settings.NODE_OFFLINE_AFTER_S + 1)

    assert services.node_liveness_sweep(now=seen) == 0
    assert services.node_liveness_sweep(now=stale_at) == 1
    assert Node.objects.get(pk=node.pk).status == "stale"
    assert services.node_liveness_sweep(now=stale_at) == 0  # safe to run twice
    assert services.node_liveness_sweep(now=offline_at) == 1
    assert Node.objects.get(pk=node.pk).status == "offline"
    transitions = [(e.before["status"], e.after["status"])
                   for e in AuditEvent.objects.filter(action="node.status").order_by("seq")]
    assert transitions == [("online", "stale"), ("stale", "offline")]


@pytest.mark.django_db
def test_it_brings_a_returning_node_back_online_and_audits_it(site_berlin: Site) -> None:
    node = _enrolled(site_berlin)
    Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now() - dt.timedelta(hours=1), status="offline")
    node_sync(node=node, request=protocol.SyncRequest(), ip="127.0.0.1")
    assert Node.objects.get(pk=node.pk).status == "online"
    event = AuditEvent.objects.filter(action="node.report", object_id=str(node.uuid)).latest("seq")
    assert event.before["status"] == "offline" and event.after["status"] == "online"


@pytest.mark.django_db
def test_it_leaves_revoked_nodes_alone(site_berlin: Site) -> None:
    node = _enrolled(site_berlin)
    services.node_revoke(actor=Actor.system("test"), node=node)
    later = timezone.now() + dt.timedelta(hours=1)
    assert services.node_liveness_sweep(now=later) == 0
    assert Node.objects.get(pk=node.pk).status == "revoked"


@pytest.mark.django_db
def test_a_sweep_of_many_nodes_takes_the_same_statements_as_a_sweep_of_few(site_berlin: Site) -> None:
    def silent(count: int, prefix: str) -> list[Node]:
        Node.objects.bulk_create(Node(site=site_berlin, name=f"{prefix}-{i}", credential_hash=f"{prefix}{i:060d}",
                                      status="online", last_seen_at=timezone.now() - dt.timedelta(seconds=6))
                                 for i in range(count))
        return list(Node.objects.filter(name__startswith=f"{prefix}-"))

    def sweep() -> tuple[int, int]:
        with CaptureQueriesContext(connection) as captured:
            changed = services.node_liveness_sweep()
        return changed, len(captured.captured_queries)

    few = silent(2, "few")
    assert sweep()[0] == 2
    many = silent(40, "many")
    changed, statements = sweep()
    Node.objects.filter(pk__in=[n.pk for n in few]).update(status="online")
    assert changed == 40
    assert (2, statements) == sweep()  # the two again: as many statements as the forty took
    # Each transition is still audited on its own, in the order of the nodes.
    events = AuditEvent.objects.filter(action="node.status", object_id__in=[str(n.uuid) for n in many])
    assert events.count() == 40 and {e.after["status"] for e in events} == {"stale"}
    assert set(Node.objects.filter(pk__in=[n.pk for n in many]).values_list("status", flat=True)) == {"stale"}

"""A whole node's life against a real control plane: online, stale, offline, back."""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.utils import timezone

from audit.models import AuditEvent
from sites import services
from sites.liveness import node_status
from sites.models import Node, Site
from tests.fixtures.processes import ControlPlane, wait_until

pytestmark = pytest.mark.process


def _live_status(name: str) -> str:
    node = Node.objects.get(name=name)
    return node_status(last_seen_at=node.last_seen_at, revoked=node.revoked_at is not None, now=timezone.now())


def test_it_turns_a_stopped_node_stale_then_offline_and_back_online(
    live_control_plane: ControlPlane, edge_node, site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1", role="gateway")
    wait_until(lambda: _live_status("gw-1") == "online", what="the node to come online")
    node.stop()
    stopped_at = timezone.now()

    wait_until(lambda: _live_status("gw-1") == "stale", timeout=settings.NODE_STALE_AFTER_S + 5,
               what="the stopped node to turn stale")
    stale_after = (timezone.now() - stopped_at).total_seconds()
    wait_until(lambda: _live_status("gw-1") == "offline", timeout=settings.NODE_OFFLINE_AFTER_S + 5,
               what="the stopped node to turn offline")
    offline_after = (timezone.now() - stopped_at).total_seconds()
    # Within the documented intervals (one sync interval of slack for the last sync's timing).
    assert stale_after <= settings.NODE_STALE_AFTER_S + settings.SYNC_INTERVAL_S + 1
    assert offline_after <= settings.NODE_OFFLINE_AFTER_S + settings.SYNC_INTERVAL_S + 1
    assert services.node_liveness_sweep() == 1
    assert Node.objects.get(name="gw-1").status == "offline"

    node.start()
    wait_until(lambda: Node.objects.get(name="gw-1").status == "online", what="the restarted node to come back")
    came_back = AuditEvent.objects.filter(action="node.report", object_id=str(Node.objects.get(name="gw-1").uuid))
    assert any(e.after.get("status") == "online" and e.before.get("status") == "offline" for e in came_back)


def test_it_keeps_a_node_running_on_its_last_state_through_a_control_plane_outage(
    live_control_plane: ControlPlane, edge_node, site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "line-3")
    wait_until(lambda: node.status()["applied_generation"] >= 1, what="the first desired state")
    generation = node.status()["applied_generation"]
    live_control_plane.stop()
    wait_until(lambda: node.status()["consecutive_failures"] >= 2, what="the node to notice the outage")
    # Restarted without its control plane, it carries on with the state from disk.
    node.stop()
    node.start()
    wait_until(lambda: node.status()["consecutive_failures"] >= 1 and node.proc is not None
               and node.proc.poll() is None, what="the restarted node to keep running")
    assert node.status()["applied_generation"] == generation
    assert node.status()["desired_state"]["verified"] is True

    seen_before = Node.objects.get(name="line-3").last_seen_at
    live_control_plane.start()
    wait_until(lambda: Node.objects.get(name="line-3").last_seen_at != seen_before,
               timeout=60, what="the node to sync again once the control plane is back")
    assert timezone.now() - Node.objects.get(name="line-3").last_seen_at < dt.timedelta(seconds=30)

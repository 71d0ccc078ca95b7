"""Store and forward with real processes: an edge runtime keeps taking telemetry while its control plane is
down (and restarted), then delivers it; with a small disk budget it says what it could not keep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db.models import Sum

from sites.models import Node, Site, TelemetryGap, TelemetrySample, TelemetryStream
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until

pytestmark = pytest.mark.process


def _stream(name: str) -> TelemetryStream | None:
    return TelemetryStream.objects.filter(node__name=name).first()


def _start(edge_node: Callable[..., EdgeNode], site: Site, name: str, *args: str) -> EdgeNode:
    node = edge_node(site, name, start=False)
    node.args = list(args)
    node.start()
    return node


def _cut_off(cp: ControlPlane, node: EdgeNode, *, waiting: int) -> tuple[int, dict[str, Any]]:
    """Stop the control plane once it holds some points; return what it held and the node's queue later."""
    wait_until(lambda: (s := _stream(node.name)) is not None and s.last_seq >= 3, timeout=30,
               what=f"first points of {node.name}")
    cp.stop()
    held = _stream(node.name).last_seq  # type: ignore[union-attr]
    queued = wait_until(lambda: (t := node.status()["telemetry"])["next_seq"] - 1 - held >= waiting and t,
                        timeout=30, what=f"{waiting} points taken while cut off")
    return held, queued


def test_it_delivers_every_point_taken_while_cut_off_once_and_in_order(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = _start(edge_node, site_berlin, "gw-1", "--telemetry-interval", "0.2")
    held, queued = _cut_off(live_control_plane, node, waiting=15)
    assert queued["pending_points"] >= 15 and queued["lost_points"] == 0

    live_control_plane.start()  # a control plane restarted while the node was cut off
    produced = node.status()["telemetry"]["next_seq"] - 1
    stream = wait_until(lambda: (s := _stream("gw-1")) is not None and s.last_seq >= produced and s,
                        timeout=30, what=f"points up to {produced} delivered")

    # Every number up to the newest arrived exactly once: a duplicate is skipped and a number out of order
    # or missing would be recorded as a gap, so points == last_seq with no gap means once each, in order.
    assert stream.points == stream.last_seq and stream.lost == 0
    assert not TelemetryGap.objects.filter(node__name="gw-1").exists()
    assert stream.last_seq - held >= 15
    # The history counted each point once, too.
    fine = TelemetrySample.objects.filter(node=stream.node, resolution=10, model="")
    assert fine.aggregate(n=Sum("points"))["n"] == stream.points
    wait_until(lambda: node.status()["telemetry"]["pending_points"] <= 2, timeout=15,
               what="the node's queue emptied by the acks")


def test_it_records_a_gap_of_exactly_the_points_its_disk_budget_could_not_keep(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = _start(edge_node, site_berlin, "gw-1", "--telemetry-interval", "0.1", "--telemetry-budget", "4K")
    held, _ = _cut_off(live_control_plane, node, waiting=40)
    queued = node.status()["telemetry"]
    # The budget holds about a dozen points: the rest of the outage is one gap record, counted.
    assert queued["lost_points"] > 0 and queued["pending_bytes"] <= 4096
    [gap] = queued["gaps"]
    # It starts at the oldest point not acknowledged (one in flight at the cut may already be held).
    assert held - 5 < gap["first_seq"] <= held + 1 and gap["count"] == gap["last_seq"] - gap["first_seq"] + 1

    live_control_plane.start()
    produced = node.status()["telemetry"]["next_seq"] - 1
    stream = wait_until(lambda: (s := _stream("gw-1")) is not None and s.last_seq >= produced and s,
                        timeout=30, what=f"points up to {produced} delivered")
    def consistent() -> tuple[Any, list[TelemetryGap]] | None:
        # The node may still evict while it drains its backlog, and a round may commit between two reads:
        # take the stream and its gaps as of one moment (the stream unchanged across the gaps' read).
        before = _stream("gw-1")
        gaps = list(TelemetryGap.objects.filter(node=before.node).order_by("first_seq"))  # type: ignore[union-attr]
        after = _stream("gw-1")
        same = after is not None and before is not None and (after.last_seq, after.lost) == (before.last_seq,
                                                                                               before.lost)
        return (after, gaps) if same else None

    stream, gaps = wait_until(consistent, timeout=30, what="a consistent read of the stream and its gaps")
    assert sum(g.count for g in gaps) == stream.lost > 0
    # The node counts what it evicted; a frame in flight when the control plane went down may have been
    # committed all the same, and its points evicted later: those the control plane holds, and does not
    # count lost. So the control plane never counts more lost than the node evicted.
    assert stream.lost <= node.status()["telemetry"]["lost_points"]
    assert {g.reason for g in gaps} == {"disk_budget"}
    assert gaps[0].first_seq == held + 1 and gaps[0].start is not None and gaps[0].end >= gaps[0].start
    # Nothing counted twice, nothing unaccounted for: every number is a point received or a point lost.
    assert stream.points + stream.lost == stream.last_seq
    assert Node.objects.get(pk=stream.node_id).site_id == site_berlin.pk

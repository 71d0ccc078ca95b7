"""The rollout state machine, tick by tick, with nodes reporting through the real sync service."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEvent
from policies import services as policy_services
from rollouts import engine, services
from rollouts.models import NodeState, PauseKind, Rollout, RolloutEvent, RolloutState, WavePhase
from rollouts.selectors import rollout_waves
from rollouts.services import RolloutError
from sites.models import Site
from tests.fixtures.personas import make_site
from tests.rollouts.rollout_factories import (
    ACTOR,
    age,
    deploy,
    desired_versions,
    fleet,
    report,
    rewind,
    serving,
    tick,
    two_versions,
)

GATE = {"min_requests": 20, "max_error_rate": 0.05, "max_error_rate_increase": 0.01, "max_p95_ratio": 1.5}


def start(version: Any, site: Site, **strategy: Any) -> Rollout:
    rollout = services.rollout_create(actor=ACTOR, user=None, version=version, target={"sites": [site.slug]},
                                      strategy={"canary_nodes": 1, "percentages": [50, 100], "bake_s": 0,
                                                "gate": None, **strategy})
    assert rollout.state == RolloutState.READY
    return services.rollout_start(actor=ACTOR, rollout=rollout)


def rows(rollout: Rollout) -> dict[str, str]:
    return {r.node.name: r.state for r in rollout.nodes.select_related("node")}


def established(site: Site, count: int = 4) -> tuple[list[Any], Any, Any]:
    """``count`` nodes serving v1 of a model (with traffic); v2 uploaded."""
    v1, v2 = two_versions("defects")
    nodes = fleet(site, count)
    deploy(v1, site)
    for node in nodes:
        report(node, serving("defects", "1.0.0", requests=500, errors=1))
    return nodes, v1, v2


def test_it_plans_every_target_node_and_lists_the_excluded_with_their_reasons(region_eu: Any,
                                                                              region_us: Any) -> None:
    policy_services.policy_update(actor=ACTOR, kind="placement", document={"rules": [
        {"name": "confidential-eu-only", "effect": "only", "classifications": [2],
         "where": {"jurisdictions": ["DE"]}}]})
    berlin = make_site(region_eu, "plant-berlin", jurisdiction="DE", clearance=3)
    ohio = make_site(region_us, "ohio", jurisdiction="US", clearance=3)
    fleet(berlin, 3, role="server")
    fleet(berlin, 1, prefix="small", role="server", memory_mb=1024)
    fleet(ohio, 2, prefix="o")
    _, v2 = two_versions("vision", classification=2)
    v2.min_memory_mb = 4096
    v2.save()
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"regions": ["eu", "us"]},
                                      strategy={"canary_nodes": 1, "percentages": [50, 100]})
    excluded = {e["name"]: (e["rule"], e["reason"]) for e in rollout.plan["excluded"]}
    assert excluded == {
        "ohio/o0": ("confidential-eu-only", "placement rule 'confidential-eu-only' allows Confidential models only "
                                            "at sites with jurisdiction DE"),
        "ohio/o1": ("confidential-eu-only", "placement rule 'confidential-eu-only' allows Confidential models only "
                                            "at sites with jurisdiction DE"),
        "plant-berlin/small0": ("memory", "needs 4096 MB of memory; the node reports 1024 MB"),
    }
    assert [len(w) for w in rollout.plan["waves"]] == [1, 1, 1]
    assert rollout.nodes.count() == 3 and rollout.placement_policy_version == 1
    assert len(rollout.plan_hash) == 64


def test_it_refuses_a_rollout_that_no_node_can_take(site_berlin: Site) -> None:
    fleet(site_berlin, 2, role="device")
    _, v2 = two_versions("big")
    v2.node_roles = ["server"]
    v2.save()
    with pytest.raises(RolloutError, match="no node of the target can run .* 2 excluded .*runs only on server"):
        services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": [site_berlin.slug]})
    with pytest.raises(RolloutError, match="target.sites: no site 'nowhere'"):
        services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": ["nowhere"]})
    with pytest.raises(RolloutError, match="strategy.percentages"):
        services.rollout_create(actor=ACTOR, user=None, version=v2, target={},
                                strategy={"percentages": [50, 20]})
    assert not Rollout.objects.exists()


def test_it_takes_a_version_across_every_wave_to_success(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 4)
    rollout = start(v2, site_berlin)
    rollout = tick(rollout)
    assert rows(rollout) == {"n0": "updating", "n1": "pending", "n2": "pending", "n3": "pending"}
    assert desired_versions(nodes[0], "defects") == ["2.0.0"]
    assert desired_versions(nodes[1], "defects") == ["1.0.0"]
    # A report from before the switch proves nothing.
    report(nodes[0], serving("defects", "2.0.0"), applied=1)
    assert tick(rollout).nodes.get(node=nodes[0]).state == NodeState.UPDATING
    report(nodes[0], serving("defects", "2.0.0"))
    rollout = tick(rollout)
    assert rollout.wave_phase == WavePhase.BAKING and rows(rollout)["n0"] == "updated"
    rollout = tick(rollout)
    assert rollout.current_wave == 1 and rollout.wave_phase == WavePhase.STARTING
    for wave_nodes in (nodes[1:3], nodes[3:]):
        rollout = tick(rollout)
        for node in wave_nodes:
            report(node, serving("defects", "2.0.0"))
        rollout = tick(tick(tick(rollout)))
    assert rollout.state == RolloutState.SUCCEEDED
    assert set(rows(rollout).values()) == {"updated"}
    assert all(desired_versions(n, "defects") == ["2.0.0"] for n in nodes)
    assert AuditEvent.objects.filter(action="rollout.succeeded", object_id=str(rollout.uuid)).exists()
    kinds = list(rollout.events.values_list("kind", "to_state"))
    assert ("wave", "promoted") in kinds and kinds[-1] == ("state", "succeeded")


def test_it_stops_a_failing_version_at_the_canary_and_rolls_it_back(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 4)
    rollout = start(v2, site_berlin, gate=GATE, bake_s=600)
    rollout = tick(rollout)
    report(nodes[0], serving("defects", "2.0.0", requests=40, errors=20))
    rollout = tick(tick(rollout))
    assert rollout.state == RolloutState.ROLLING_BACK
    assert "the canary failed its health gate" in rollout.reason and "error_rate 0.5" in rollout.reason
    gate = rollout.last_gate
    assert gate["outcome"] == "failed"
    checks = {c["name"]: c for c in gate["checks"]}
    assert checks["error_rate"]["value"] == 0.5 and checks["error_rate"]["threshold"] == 0.05
    assert gate["previous"]["requests"] == 500
    assert desired_versions(nodes[0], "defects") == ["1.0.0"]
    report(nodes[0], serving("defects", "1.0.0", requests=510, errors=1))
    rollout = tick(rollout)
    assert rollout.state == RolloutState.FAILED
    assert rows(rollout) == {"n0": "rolled_back", "n1": "pending", "n2": "pending", "n3": "pending"}
    # No node outside the canary was ever given the version.
    touched = set(RolloutEvent.objects.filter(rollout=rollout, kind="node", to_state=NodeState.UPDATING)
                  .values_list("node__name", flat=True))
    assert touched == {"n0"}


def test_it_rolls_back_when_a_node_reports_the_new_version_failed(site_berlin: Site) -> None:
    from edge_runtime.protocol import ModelStatus

    nodes, _, v2 = established(site_berlin, 2)
    rollout = tick(start(v2, site_berlin))
    report(nodes[0], ModelStatus(name="defects", version="2.0.0", state="failed", error="smoke test failed",
                                 serving_version="1.0.0"))
    rollout = tick(rollout)
    assert rollout.state == RolloutState.ROLLING_BACK
    assert "failed on 1 node(s) (plant-berlin/n0: smoke test failed)" in rollout.reason


def test_it_never_promotes_on_an_inconclusive_gate(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 3)
    rollout = tick(start(v2, site_berlin, gate=GATE))
    report(nodes[0], serving("defects", "2.0.0", requests=5))
    rollout = tick(tick(rollout))
    assert (rollout.state, rollout.pause_kind) == (RolloutState.PAUSED, PauseKind.GATE)
    assert "health gate inconclusive (5 requests to the new version, fewer than the minimum of 20)" in rollout.reason
    assert rollout.current_wave == 0
    # Paused: ticks change nothing; resuming bakes again and judges again, still inconclusive.
    assert tick(rollout, after=60).state == RolloutState.PAUSED
    rollout = services.rollout_resume(actor=ACTOR, rollout=rollout)
    rollout = tick(rollout)
    assert rollout.state == RolloutState.PAUSED and rollout.current_wave == 0
    assert desired_versions(nodes[1], "defects") == ["1.0.0"]
    # Enough traffic now: the next judgement passes.
    report(nodes[0], serving("defects", "2.0.0", requests=100))
    rollout = tick(services.rollout_resume(actor=ACTOR, rollout=rollout))
    assert rollout.state == RolloutState.PROGRESSING and rollout.current_wave == 1
    assert rollout.last_gate["outcome"] == "passed"


def test_it_promotes_now_when_an_operator_says_so(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 2)
    rollout = tick(start(v2, site_berlin, gate=GATE, bake_s=600))
    report(nodes[0], serving("defects", "2.0.0", requests=5))
    rollout = tick(tick(rollout))
    assert rollout.wave_phase == WavePhase.BAKING and rollout.state == RolloutState.PROGRESSING
    rollout = services.rollout_promote(actor=ACTOR, rollout=rollout)
    assert rollout.current_wave == 1 and rollout.wave_phase == WavePhase.STARTING
    assert RolloutEvent.objects.filter(rollout=rollout, to_state="promoted", message__contains="promoted now").exists()


@pytest.mark.parametrize("phase", ["pending_approval", "ready", "updating", "baking", "paused", "rolling_back"])
def test_it_aborts_in_every_phase_and_puts_touched_nodes_back(site_berlin: Site, phase: str) -> None:
    nodes, _, v2 = established(site_berlin, 2)
    if phase == "pending_approval":
        policy_services.policy_update(actor=ACTOR, kind="rollout", document={"approval_rules": [{"name": "all"}]})
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": [site_berlin.slug]},
                                      strategy={"bake_s": 600, "gate": None})
    if phase not in ("pending_approval", "ready"):
        rollout = tick(services.rollout_start(actor=ACTOR, rollout=rollout))
        if phase in ("baking", "paused", "rolling_back"):
            report(nodes[0], serving("defects", "2.0.0"))
            rollout = tick(rollout)
        if phase == "paused":
            rollout = services.rollout_pause(actor=ACTOR, rollout=rollout, reason="look closer")
        if phase == "rolling_back":
            rollout = services.rollout_abort(actor=ACTOR, rollout=rollout)
    assert rollout.state == {"updating": "progressing", "baking": "progressing"}.get(phase, phase)
    rollout = services.rollout_abort(actor=ACTOR, rollout=rollout, reason="changed our minds")
    if rollout.state == RolloutState.ROLLING_BACK:
        assert desired_versions(nodes[0], "defects") == ["1.0.0"]
        report(nodes[0], serving("defects", "1.0.0"))
        rollout = tick(rollout)
    assert rollout.state == RolloutState.ABORTED
    assert all(desired_versions(n, "defects") == ["1.0.0"] for n in nodes)
    assert set(rows(rollout).values()) <= {"pending", "rolled_back"}
    with pytest.raises(RolloutError, match="already ended"):
        services.rollout_abort(actor=ACTOR, rollout=rollout)


def test_it_skips_a_node_that_stays_offline_and_reports_it(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 5)
    rollout = tick(start(v2, site_berlin, canary_nodes=2, offline_timeout_s=30, max_offline_fraction=0.5))
    report(nodes[0], serving("defects", "2.0.0"))
    age([nodes[1]], 3600)
    assert tick(rollout).wave_phase == WavePhase.UPDATING  # waits for it, up to the timeout
    rewind(rollout, 31)
    rollout = tick(rollout)
    assert rows(rollout)["n1"] == "skipped" and rollout.wave_phase == WavePhase.BAKING
    assert desired_versions(nodes[1], "defects") == ["1.0.0"]
    assert "offline for more than 30s; skipped" in rollout.nodes.get(node=nodes[1]).detail


def test_it_pauses_for_an_offline_node_when_the_policy_says_so(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 5)
    rollout = tick(start(v2, site_berlin, canary_nodes=2, offline_timeout_s=30, on_offline="pause",
                         max_offline_fraction=0.5))
    report(nodes[0], serving("defects", "2.0.0"))
    age([nodes[1]], 3600)
    rewind(rollout, 31)
    rollout = tick(rollout)
    assert (rollout.state, rollout.pause_kind) == (RolloutState.PAUSED, PauseKind.NODE_OFFLINE)
    assert "plant-berlin/n1 offline for more than 30s (policy: pause)" in rollout.reason
    # The operator resumes: the node still offline is skipped, the wave carries on.
    rollout = tick(services.rollout_resume(actor=ACTOR, rollout=rollout))
    assert rows(rollout)["n1"] == "skipped" and rollout.wave_phase == WavePhase.BAKING


def test_it_pauses_instead_of_judging_while_much_of_the_target_is_offline(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 4)
    rollout = tick(start(v2, site_berlin, gate=GATE, max_offline_fraction=0.5))
    report(nodes[0], serving("defects", "2.0.0", requests=40, errors=20))
    age(nodes[1:3], 3600)
    rollout = tick(rollout)
    assert (rollout.state, rollout.pause_kind) == (RolloutState.PAUSED, PauseKind.FLEET_OFFLINE)
    assert "2 of 4 target nodes are offline at once" in rollout.reason
    assert rollout.last_gate is None
    for node in nodes[1:3]:
        report(node, serving("defects", "1.0.0"))
    rollout = tick(rollout)
    assert rollout.state == RolloutState.PROGRESSING
    # Back to judging: the canary's errors now fail it.
    rollout = tick(tick(rollout))
    assert rollout.state == RolloutState.ROLLING_BACK


def test_it_carries_the_version_to_air_gapped_nodes_without_pausing_or_skipping_them(site_berlin: Site,
                                                                                       region_eu: Any) -> None:
    base7 = make_site(region_eu, "base-7", jurisdiction="DE", connectivity="air_gapped")
    v1, v2 = two_versions("defects")
    connected, gapped = fleet(site_berlin, 2), fleet(base7, 2, prefix="g")
    for site, nodes in ((site_berlin, connected), (base7, gapped)):
        deploy(v1, site)
        for node in nodes:
            report(node, serving("defects", "1.0.0"))
    age(gapped, 7 * 86_400)  # their last bundle out was written a week ago
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": ["plant-berlin", "base-7"]},
                                      strategy={"canary_nodes": 1, "percentages": [100], "bake_s": 0, "gate": None,
                                                "offline_timeout_s": 30, "max_offline_fraction": 0.5})
    rollout = services.rollout_start(actor=ACTOR, rollout=rollout)
    for _ in range(12):
        rollout = tick(rollout)
        if rollout.terminal:
            break
        for node in connected:
            if desired_versions(node, "defects") == ["2.0.0"]:
                report(node, serving("defects", "2.0.0"))
        rewind(rollout, 31)
    # Half the target a week away by bundle is no outage: no pause, nothing skipped, the version stays theirs.
    assert rollout.state == RolloutState.SUCCEEDED, rollout.reason
    assert not rollout.events.filter(to_state=RolloutState.PAUSED).exists()
    assert rows(rollout) == {"n0": "updated", "n1": "updated", "g0": "updating", "g1": "updating"}
    assert all(desired_versions(n, "defects") == ["2.0.0"] for n in gapped)
    assert "the version goes in the site's next bundle in" in rollout.nodes.get(node=gapped[0]).detail
    # A bundle out reports them serving it: the finished rollout confirms them.
    for node in gapped:
        report(node, serving("defects", "2.0.0"))
    assert set(rows(tick(rollout)).values()) == {"updated"}


def test_the_rollout_page_shows_an_air_gapped_node_as_such(site_berlin: Site, region_eu: Any) -> None:
    base7 = make_site(region_eu, "base-7", jurisdiction="DE", connectivity="air_gapped")
    v1, v2 = two_versions("defects")
    nodes = (*fleet(site_berlin, 1), *fleet(base7, 1, prefix="g"))
    deploy(v1, site_berlin)
    deploy(v1, base7)
    for node in nodes:
        report(node, serving("defects", "1.0.0"))
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": ["plant-berlin", "base-7"]},
                                      strategy={"canary_nodes": 1, "percentages": [100]})
    shown = {item["row"].node.name: item["status"] for wave in rollout_waves(rollout) for item in wave["nodes"]}
    assert shown == {"n0": "online", "g0": "air-gapped"}


def test_it_ignores_a_stale_or_duplicated_tick(site_berlin: Site) -> None:
    nodes, _, v2 = established(site_berlin, 2)
    rollout = start(v2, site_berlin)
    assert engine.rollout_advance(rollout_id=rollout.pk, tick="00000000-0000-0000-0000-000000000000") is None
    assert Rollout.objects.get(pk=rollout.pk).wave_phase == WavePhase.STARTING
    current = str(rollout.tick)
    engine.rollout_advance(rollout_id=rollout.pk, tick=current)
    # The same tick delivered again: its chain was replaced, nothing happens twice.
    assert engine.rollout_advance(rollout_id=rollout.pk, tick=current) is None
    assert RolloutEvent.objects.filter(rollout=rollout, kind="node", to_state=NodeState.UPDATING).count() == 1
    assert AuditEvent.objects.filter(action="desired_state.publish", object_id=str(nodes[0].uuid),
                                     after__generation__gt=1).count() == 1


def test_it_restarts_the_tick_chain_of_a_rollout_whose_worker_was_lost(site_berlin: Site, settings: Any) -> None:
    import datetime as dt

    from django.utils import timezone

    _, _, v2 = established(site_berlin, 2)
    rollout = start(v2, site_berlin)
    tick_before = rollout.tick
    assert engine.rollout_reconcile() == 0  # on time: left alone
    Rollout.objects.filter(pk=rollout.pk).update(next_tick_at=timezone.now() - dt.timedelta(hours=1))
    assert engine.rollout_reconcile() == 1
    rollout.refresh_from_db()
    assert rollout.tick != tick_before
    assert rollout.events.filter(kind="reconcile").exists()


@pytest.mark.parametrize(("gate", "placement", "fails"), [
    ({"fail_on_cpu_fallback": True}, "cpu_fallback", True),
    ({"fail_on_cpu_fallback": True}, "partial", False),
    ({"fail_on_partial": True}, "partial", True),
    ({}, "cpu_fallback", False),
])
def test_a_gate_can_fail_the_canary_that_fell_back_to_cpu(site_berlin: Site, gate: dict[str, bool], placement: str,
                                                          fails: bool) -> None:
    nodes, _, v2 = established(site_berlin, 3)
    rollout = tick(start(v2, site_berlin, gate={**GATE, **gate}, bake_s=600))
    why = "OpenVINOExecutionProvider: changes the results on the range probe inputs: output 'y' differs"
    status = serving("defects", "2.0.0", requests=5).model_copy(update={
        "provider": "CPUExecutionProvider", "placement": placement, "cpu_nodes": 2, "graph_nodes": 5,
        "fallback": why if placement == "cpu_fallback" else ""})
    report(nodes[0], status)
    rollout = tick(tick(rollout))
    if fails:
        assert rollout.state == RolloutState.ROLLING_BACK
        assert "1 node(s) fell back to CPU: plant-berlin/n0: " + placement.replace("_", " ") in rollout.reason
        if placement == "cpu_fallback":
            assert why in rollout.reason
        assert rollout.last_gate["checks"][0]["name"] == "provider_fallback"
        assert desired_versions(nodes[0], "defects") == ["1.0.0"]
    else:
        # Five requests are too few to judge: the wave waits, it is not failed for the placement.
        assert rollout.state == RolloutState.PROGRESSING and rollout.wave_phase == WavePhase.BAKING
        assert rollout.last_gate is None or rollout.last_gate["outcome"] != "failed"

"""The model page's Deploy goes through the rollout policy: approvals, one gated wave, rollback, deployments."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from django.db.models import F
from django.test import Client

from audit.models import AuditEvent
from models_registry.models import Deployment, ModelVersion
from orchestrator.desired_state import desired_state_publish
from policies import services as policy_services
from rollouts.models import Rollout, RolloutKind, RolloutState
from sites.models import Node, Site
from sites.services import node_revoke
from tests.fixtures.personas import PASSWORD
from tests.models_registry.helpers import make_node
from tests.rollouts.rollout_factories import (
    ACTOR,
    deploy,
    desired_versions,
    fleet,
    report,
    serving,
    tick,
    two_versions,
)

pytestmark = pytest.mark.django_db

GATE = {"min_requests": 20, "max_error_rate": 0.05, "max_error_rate_increase": 0.01, "max_p95_ratio": 1.5}


def client_for(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def policy(**document: Any) -> None:
    policy_services.policy_update(actor=ACTOR, kind="rollout", document=document)


def established(site: Site, count: int = 3) -> tuple[list[Node], ModelVersion, ModelVersion]:
    """``count`` nodes serving v1 with traffic; v2 uploaded and valid."""
    v1, v2 = two_versions("defects")
    nodes = fleet(site, count)
    deploy(v1, site)
    for node in nodes:
        report(node, serving("defects", "1.0.0", requests=500, errors=1))
    return nodes, v1, v2


def post_deploy(user: Any, version: ModelVersion, **targets: list[str]) -> Any:
    return client_for(user).post(f"/rollouts/deploy/{version.model.slug}", {"version": str(version.uuid), **targets})


def the_deploy() -> Rollout:
    return Rollout.objects.get(kind=RolloutKind.DEPLOY)


def test_a_deploy_waits_for_the_approvals_a_rollout_would_need(site_berlin: Site, operator: Any,
                                                              approver: Any) -> None:
    policy(approval_rules=[{"name": "every-rollout", "approvals": 1, "role": "Approver"}])
    nodes, _, v2 = established(site_berlin)
    response = post_deploy(operator, v2, sites=[site_berlin.slug])
    rollout = the_deploy()
    assert response.status_code == 302 and response.url == f"/rollouts/{rollout.uuid}/"
    assert rollout.state == RolloutState.PENDING_APPROVAL and rollout.approval_rules == ["every-rollout"]
    assert [set(w) for w in rollout.waves] == [{str(n.uuid) for n in nodes}]
    # Nothing reached a node, and nothing was deployed around the approval.
    assert all(desired_versions(n, "defects") == ["1.0.0"] for n in nodes)
    assert not Deployment.objects.filter(version=v2).exists()
    # The requester's own approval does not count, and the refusal says why.
    refused = client_for(operator).post(f"/rollouts/{rollout.uuid}/approve/decide", {"plan_hash": rollout.plan_hash})
    assert refused.status_code == 403
    assert "you requested this rollout; someone else must approve it" in refused.content.decode()
    assert client_for(approver).post(f"/rollouts/{rollout.uuid}/approve/decide",
                                     {"plan_hash": rollout.plan_hash}).status_code == 302
    # Approved, a deploy starts by itself: it was asked to happen now.
    rollout = tick(the_deploy())
    assert rollout.state == RolloutState.PROGRESSING and rollout.started_at is not None
    assert all(desired_versions(n, "defects") == ["2.0.0"] for n in nodes)


def test_a_deploy_is_one_wave_judged_by_the_policy_gate_then_kept_as_a_deployment(site_berlin: Site,
                                                                                 operator: Any) -> None:
    policy(defaults={"canary_nodes": 2, "percentages": [25, 100], "bake_s": 60, "gate": GATE})
    nodes, _, v2 = established(site_berlin)
    assert post_deploy(operator, v2, sites=[site_berlin.slug]).status_code == 302
    rollout = tick(the_deploy())
    assert rollout.state == RolloutState.PROGRESSING and len(rollout.waves) == 1
    assert rollout.strategy["gate"]["min_requests"] == 20 and rollout.strategy["bake_s"] == 60
    assert all(desired_versions(n, "defects") == ["2.0.0"] for n in nodes)
    for node in nodes:
        report(node, serving("defects", "2.0.0", requests=100))
    rollout = tick(tick(rollout))
    assert rollout.wave_phase == "baking" and rollout.state == RolloutState.PROGRESSING
    assert tick(rollout).wave_phase == "baking"  # the bake has not run its 60 s
    Rollout.objects.filter(pk=rollout.pk).update(bake_started_at=F("bake_started_at") - dt.timedelta(seconds=61))
    rollout = tick(rollout)
    assert rollout.state == RolloutState.SUCCEEDED, rollout.reason
    assert rollout.last_gate["outcome"] == "passed"
    deployment = Deployment.objects.get(version=v2, removed_at__isnull=True)
    assert deployment.site_id == site_berlin.pk
    assert AuditEvent.objects.filter(action="deployment.create", object_id=str(deployment.uuid)).exists()
    # A node enrolled at the site afterwards gets the deployed version.
    late, _ = make_node(site_berlin, "late")
    desired_state_publish(node=late, actor=ACTOR)
    assert desired_versions(late, "defects") == ["2.0.0"]


def test_a_deploy_that_fails_its_gate_rolls_back_and_marks_its_version(site_berlin: Site, operator: Any) -> None:
    policy(defaults={"bake_s": 600, "gate": GATE})
    nodes, v1, v2 = established(site_berlin)
    post_deploy(operator, v2, sites=[site_berlin.slug])
    rollout = tick(the_deploy())
    for node in nodes:
        report(node, serving("defects", "2.0.0", requests=40, errors=20))
    rollout = tick(tick(rollout))
    assert rollout.state == RolloutState.ROLLING_BACK and "failed its health gate" in rollout.reason
    assert all(desired_versions(n, "defects") == ["1.0.0"] for n in nodes)
    v2.refresh_from_db()
    assert v2.rolled_back_at is not None and "failed its health gate" in v2.rolled_back_note
    assert not Deployment.objects.filter(version=v2).exists()

    # The model page's picker offers v1 first and marks v2; the rollout form marks it too.
    page = client_for(operator).get("/models/defects/").content.decode()
    picker = page[page.index('<select name="version"'):]
    picker = picker[:picker.index("</select>")]
    options = re.findall(r"<option value=\"([^\"]*)\"[^>]*>([^<]*)</option>", picker)
    assert options[0] == (str(v1.uuid), "1.0.0")
    assert options[1][0] == str(v2.uuid) and "2.0.0 — rolled back" in options[1][1]
    assert "data-rolled-back" in page[:page.index('<select name="version"')]  # the version's own badge
    form = client_for(operator).get("/rollouts/new").content.decode()
    assert re.search(r"defects@2\.0\.0 — rolled back [^<]*failed its health gate", form)
    assert '<option value="" selected>' in form  # the form chooses no version by itself

    # A later rollout of it that succeeds clears the mark.
    for node in nodes:
        report(node, serving("defects", "1.0.0", requests=600, errors=1))
    assert tick(rollout).state == RolloutState.FAILED
    policy(defaults={"bake_s": 0, "gate": None})
    post_deploy(operator, v2, sites=[site_berlin.slug])
    again = tick(Rollout.objects.get(kind=RolloutKind.DEPLOY, state=RolloutState.PROGRESSING))
    for node in nodes:
        report(node, serving("defects", "2.0.0"))
    assert tick(tick(tick(again))).state == RolloutState.SUCCEEDED
    v2.refresh_from_db()
    assert v2.rolled_back_at is None and v2.rolled_back_note == ""


def test_a_deploy_to_single_nodes_reaches_only_them(site_berlin: Site, operator: Any) -> None:
    policy(defaults={"bake_s": 0, "gate": None})
    nodes, _, v2 = established(site_berlin)
    post_deploy(operator, v2, nodes=[str(nodes[1].uuid)])
    rollout = tick(the_deploy())
    assert rollout.target["nodes"] == [str(nodes[1].uuid)] and rollout.waves == [[str(nodes[1].uuid)]]
    report(nodes[1], serving("defects", "2.0.0"))
    assert tick(tick(tick(rollout))).state == RolloutState.SUCCEEDED
    assert [desired_versions(n, "defects") for n in nodes] == [["1.0.0"], ["2.0.0"], ["1.0.0"]]
    assert Deployment.objects.get(version=v2).node_id == nodes[1].pk


def test_a_deploy_refuses_bad_input_with_a_reason_and_changes_nothing(site_berlin: Site, operator: Any) -> None:
    nodes, _, v2 = established(site_berlin)
    client = client_for(operator)
    url = "/rollouts/deploy/defects"
    nothing = client.post(url, {"version": str(v2.uuid)}, headers={"HX-Request": "true"})
    assert nothing.status_code == 422 and "choose at least one site or node to deploy to" in nothing.content.decode()
    assert client.post(url, {"version": "not-a-uuid", "sites": [site_berlin.slug]}).status_code == 404
    assert client.post(url, {"version": str(v2.uuid), "sites": ["nowhere"]}).status_code == 404
    assert client.post("/rollouts/deploy/no-such-model", {"version": str(v2.uuid)}).status_code == 404
    node_revoke(actor=ACTOR, node=nodes[0])
    revoked = client.post(url, {"version": str(v2.uuid), "nodes": [str(nodes[0].uuid)]},
                          headers={"HX-Request": "true"})
    assert revoked.status_code == 422 and f"no active node {nodes[0].uuid}" in revoked.content.decode()
    # One deploy at a time per model, as for any rollout.
    assert client.post(url, {"version": str(v2.uuid), "sites": [site_berlin.slug]}).status_code == 302
    busy = client.post(url, {"version": str(v2.uuid), "sites": [site_berlin.slug]}, headers={"HX-Request": "true"})
    assert busy.status_code == 422 and "already has an open rollout" in busy.content.decode()
    assert Rollout.objects.count() == 1

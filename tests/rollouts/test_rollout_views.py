"""The rollouts console and approvals inbox: who sees and does what, and the live panel."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from audit.services import Actor
from policies import services as policy_services
from rollouts import services
from rollouts.models import Rollout, RolloutState
from sites.models import Site
from tests.fixtures.personas import PASSWORD
from tests.rollouts.rollout_factories import ACTOR, deploy, fleet, report, serving, tick, two_versions


def client_for(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def rollout(site_berlin: Site, operator: Any) -> Rollout:
    v1, v2 = two_versions("defects")
    nodes = fleet(site_berlin, 3)
    deploy(v1, site_berlin)
    for node in nodes:
        report(node, serving("defects", "1.0.0"))
    return services.rollout_create(actor=Actor.user(operator), user=operator, version=v2,
                                   target={"sites": [site_berlin.slug]}, strategy={"gate": None, "bake_s": 0})


@pytest.mark.parametrize(
    ("persona", "list_sees", "detail", "start"),
    [("admin_user", True, 200, 302), ("operator", True, 200, 302), ("viewer", True, 200, 403),
     ("approver", True, 200, 403), ("stranger", False, 404, 404)],
)
def test_it_scopes_rollouts_to_the_sites_a_user_may_see_and_operate(
        request: pytest.FixtureRequest, rollout: Rollout, persona: str, list_sees: bool, detail: int,
        start: int) -> None:
    client = client_for(request.getfixturevalue(persona))
    page = client.get(reverse("rollouts:rollout-list"))
    assert page.status_code == 200
    assert (str(rollout.uuid) in page.content.decode()) is list_sees
    assert client.get(reverse("rollouts:rollout-detail", args=[rollout.uuid])).status_code == detail
    response = client.post(reverse("rollouts:rollout-action", args=[rollout.uuid, "start"]))
    assert response.status_code == start
    expected = RolloutState.PROGRESSING if start == 302 else RolloutState.READY
    assert Rollout.objects.get(pk=rollout.pk).state == expected


def test_it_shows_waves_nodes_gate_and_timeline_and_polls_while_open(rollout: Rollout, operator: Any) -> None:
    client = client_for(operator)
    client.post(reverse("rollouts:rollout-action", args=[rollout.uuid, "start"]))
    rollout = tick(rollout)
    url = reverse("rollouts:rollout-detail", args=[rollout.uuid])
    page = client.get(url).content.decode()
    assert 'id="rollout-live"' in page and 'hx-trigger="every 2s"' in page
    assert 'data-node="n0" data-state="updating"' in page and 'data-node="n1" data-state="pending"' in page
    assert "canary" in page and "started" in page
    # The live panel alone, for HTMX.
    partial = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert partial.lstrip().startswith('<div id="rollout-live"') and "<html" not in partial
    report(rollout.nodes.get(position=0, wave=0).node, serving("defects", "2.0.0"))
    partial = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert 'data-node="n0" data-state="updating"' in partial
    tick(rollout)
    partial = client.get(url, headers={"HX-Request": "true"}).content.decode()
    assert 'data-node="n0" data-state="updated"' in partial


def test_it_pauses_resumes_and_aborts_from_the_page(rollout: Rollout, operator: Any) -> None:
    client = client_for(operator)
    for action, state in (("start", "progressing"), ("pause", "paused"), ("resume", "progressing"),
                          ("abort", "aborted")):
        response = client.post(reverse("rollouts:rollout-action", args=[rollout.uuid, action]))
        assert response.status_code == 302, response.content
        assert Rollout.objects.get(pk=rollout.pk).state == state
    refused = client.post(reverse("rollouts:rollout-action", args=[rollout.uuid, "resume"]))
    assert refused.status_code == 422 and "only a paused rollout can be resumed" in refused.content.decode()


def test_it_creates_a_rollout_from_the_form_and_names_a_bad_field(site_berlin: Site, operator: Any) -> None:
    v1, v2 = two_versions("vision")
    fleet(site_berlin, 2)
    client = client_for(operator)
    assert client.get(reverse("rollouts:rollout-create")).status_code == 200
    form = {"version": str(v2.uuid), "sites": [site_berlin.slug], "labels": "", "canary_nodes": 1,
            "percentages": "50, 40", "bake_s": 60, "gate": "on", "min_requests": 20, "max_error_rate": 0.05,
            "max_error_rate_increase": 0.01, "max_p95_ratio": 1.5, "offline_timeout_s": 300, "on_offline": "skip",
            "max_offline_fraction": 0.3}
    bad = client.post(reverse("rollouts:rollout-create"), form)
    assert bad.status_code == 422 and "percentages[1] is 40.0, not above the one before it" in bad.content.decode()
    assert not Rollout.objects.exists()
    created = client.post(reverse("rollouts:rollout-create"), {**form, "percentages": "50, 100"})
    assert created.status_code == 302
    rollout = Rollout.objects.get()
    assert rollout.strategy["gate"]["min_requests"] == 20 and rollout.requested_by == operator


def test_it_refuses_a_rollout_to_sites_the_user_may_not_operate(site_berlin: Site, site_ohio: Site,
                                                               operator: Any, viewer: Any) -> None:
    _, v2 = two_versions("vision")
    fleet(site_ohio, 1)
    form = {"version": str(v2.uuid), "regions": ["eu"], "canary_nodes": 1, "percentages": "100", "bake_s": 0,
            "min_requests": 20, "max_error_rate": 0.05, "max_error_rate_increase": 0.01, "max_p95_ratio": 1.5,
            "offline_timeout_s": 300, "on_offline": "skip", "max_offline_fraction": 0.3}
    # Region "us" is not among the choices of an operator scoped to "eu".
    assert client_for(operator).post(reverse("rollouts:rollout-create"),
                                     {**form, "regions": ["us"]}).status_code == 422
    assert client_for(operator).post(reverse("rollouts:rollout-create"),
                                     {**form, "regions": []}).status_code == 403
    assert client_for(viewer).get(reverse("rollouts:rollout-create")).status_code == 403
    assert not Rollout.objects.exists()


def test_it_lists_waiting_approvals_and_takes_a_decision_from_the_page(rollout: Rollout, operator: Any,
                                                                      approver: Any) -> None:
    policy_services.policy_update(actor=ACTOR, kind="rollout", document={"approval_rules": [{"name": "all"}]})
    services.rollout_abort(actor=ACTOR, rollout=rollout)
    rollout = services.rollout_create(actor=Actor.user(operator), user=operator, version=rollout.version,
                                      target={"sites": [s.slug for s in rollout.sites.all()]})
    assert rollout.state == RolloutState.PENDING_APPROVAL
    inbox = client_for(approver).get(reverse("rollouts:approval-list")).content.decode()
    assert str(rollout.uuid) in inbox
    assert str(rollout.uuid) not in client_for(operator).get(reverse("rollouts:approval-list")).content.decode()
    page = client_for(approver).get(reverse("rollouts:rollout-detail", args=[rollout.uuid])).content.decode()
    assert 'id="decide"' in page and rollout.plan_hash in page
    decide = reverse("rollouts:rollout-decide", args=[rollout.uuid, "approve"])
    assert client_for(operator).post(decide, {"plan_hash": rollout.plan_hash}).status_code == 403
    stale = client_for(approver).post(decide, {"plan_hash": "0" * 64})
    assert stale.status_code == 422 and "the plan changed since you reviewed it" in stale.content.decode()
    assert client_for(approver).post(decide, {"plan_hash": rollout.plan_hash, "comment": "ok"}).status_code == 302
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.READY


def test_it_needs_a_login(rollout: Rollout) -> None:
    for url in (reverse("rollouts:rollout-list"), reverse("rollouts:approval-list"),
                reverse("rollouts:rollout-detail", args=[rollout.uuid])):
        assert Client().get(url).status_code == 302

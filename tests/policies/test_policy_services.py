"""Versioned policies: validated with the rule named, audited, and pushed to nodes in their signed bundle."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from audit.models import AuditEvent
from audit.services import Actor
from orchestrator.models import DesiredState
from policies import services
from policies.models import PolicyVersion
from policies.selectors import placement_policy_current
from sites.models import Site
from tests.fixtures.personas import PASSWORD
from tests.models_registry.helpers import make_node

ACTOR = Actor.system("test")
RULES = {"rules": [{"name": "secret-in-de", "effect": "only", "classifications": [3],
                    "where": {"jurisdictions": ["DE"]}}]}


def bundle(node: Any) -> dict[str, Any]:
    return json.loads(DesiredState.objects.get(node=node).payload)["policy"]


def test_it_versions_and_audits_every_change(db: None) -> None:
    first = services.policy_update(actor=ACTOR, kind="placement", document=RULES, comment="first")
    second = services.policy_update(actor=ACTOR, kind="placement", document={"rules": []})
    assert (first.number, second.number) == (1, 2)
    assert placement_policy_current()[0] == 2 and placement_policy_current()[1].rules == []
    events = AuditEvent.objects.filter(action="policy.placement.update").order_by("seq")
    assert [e.after["version"] for e in events] == [1, 2]
    assert events[1].before["document"]["rules"][0]["name"] == "secret-in-de"
    with pytest.raises(services.PoliciesError, match="identical to version 2"):
        services.policy_update(actor=ACTOR, kind="placement", document={"rules": []})


@pytest.mark.parametrize(
    ("kind", "document", "error"),
    [
        ("placement", {"rules": [{"name": "ok", "effect": "deny"}, {"name": "typo", "effect": "deny",
                                                                     "classifications": [5]}]},
         'rules[1] "typo".classifications: 5 is not a classification'),
        ("placement", '{"rules": [', "document: not valid JSON"),
        ("placement", {"kind": "rollout"}, "kind is 'rollout', but this is the placement policy"),
        ("rollout", {"approval_rules": [{"name": "two-eyes", "approvals": 11}]},
         'approval_rules[0] "two-eyes".approvals: Input should be less than or equal to 10'),
        ("rollout", {"defaults": {"canary_nodes": 0}}, "defaults.canary_nodes"),
        ("nonsense", {}, "unknown policy kind 'nonsense'"),
    ],
)
def test_it_refuses_a_bad_rule_naming_it_and_writes_nothing(db: None, kind: str, document: Any, error: str) -> None:
    with pytest.raises(services.PoliciesError) as caught:
        services.policy_update(actor=ACTOR, kind=kind, document=document)
    assert error in caught.value.message
    assert not PolicyVersion.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="policy.").exists()


def test_it_signs_the_sites_facts_and_the_placement_policy_into_every_nodes_desired_state(
        site_berlin: Site) -> None:
    from orchestrator.desired_state import desired_state_publish

    node, _ = make_node(site_berlin, "gw-1")
    desired_state_publish(node=node, actor=ACTOR)
    # "data" (the data policy at the site) is tested with federated queries (tests/queries/test_data_policy.py).
    assert bundle(node)["bundles"] == {"expired": "refuse"}
    assert {k: v for k, v in bundle(node).items() if k not in ("data", "bundles")} == {
                            "site": {"slug": "plant-berlin", "region": "eu", "clearance": 1, "jurisdiction": "DE",
                                     "labels": {}},
                            "placement": {"kind": "placement", "rules": []}, "placement_version": 0}
    generation = DesiredState.objects.get(node=node).generation
    services.policy_update(actor=ACTOR, kind="placement", document=RULES)
    state = DesiredState.objects.get(node=node)
    assert state.generation == generation + 1
    assert bundle(node)["placement_version"] == 1
    assert bundle(node)["placement"]["rules"][0]["name"] == "secret-in-de"


@pytest.mark.parametrize(("persona", "view", "edit"), [
    ("admin_user", 200, 302), ("operator", 200, 403), ("approver", 200, 403), ("viewer", 200, 403),
    ("stranger", 403, 403)])
def test_it_lets_only_admins_write_policies_from_the_console(request: pytest.FixtureRequest, site_berlin: Site,
                                                             persona: str,
                                                             view: int, edit: int) -> None:
    client = Client()
    assert client.login(username=request.getfixturevalue(persona).username, password=PASSWORD)
    assert client.get(reverse("policies:policy-list")).status_code == view
    assert client.get(reverse("policies:policy-detail", args=["placement"])).status_code == view
    response = client.post(reverse("policies:policy-detail", args=["placement"]),
                           {"document": json.dumps(RULES), "comment": "from the console"})
    assert response.status_code == edit
    assert PolicyVersion.objects.exists() is (edit == 302)


def test_it_shows_a_bad_rule_in_the_console_and_keeps_what_was_typed(admin_user: Any) -> None:
    client = Client()
    client.login(username=admin_user.username, password=PASSWORD)
    bad = json.dumps({"rules": [{"name": "no-us", "effect": "forbid"}]})
    response = client.post(reverse("policies:policy-detail", args=["placement"]), {"document": bad})
    assert response.status_code == 422
    page = response.content.decode()
    assert "rules[0] &quot;no-us&quot;.effect: Input should be &#x27;deny&#x27; or &#x27;only&#x27;" in page
    assert "forbid" in page
    assert not PolicyVersion.objects.exists()


def test_it_writes_a_policy_through_the_admin_with_the_same_validation(admin_user: Any) -> None:
    client = Client()
    client.login(username=admin_user.username, password=PASSWORD)
    url = reverse("admin:policies_policyversion_add")
    bad = client.post(url, {"kind": "placement", "text": '{"rules": [{"name": "x"}]}', "comment": ""})
    assert bad.status_code == 200 and "effect: Field required" in bad.content.decode()
    good = client.post(url, {"kind": "placement", "text": json.dumps(RULES), "comment": "admin"})
    assert good.status_code == 302
    version = PolicyVersion.objects.get()
    assert version.number == 1 and version.comment == "admin"
    assert AuditEvent.objects.filter(action="policy.placement.update", actor="admin").exists()

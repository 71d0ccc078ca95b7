"""The estate's data policy: validated with the rule named, resolved per site, signed into each node's bundle."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.models import DesiredState
from policies.models import PolicyVersion
from policies.selectors import data_policy_for_site
from policies.services import PoliciesError, policy_update
from sites.models import Site
from tests.fixtures.personas import make_site
from tests.models_registry.helpers import make_node
from tests.queries.helpers import ACTOR

DOCUMENT: dict[str, Any] = {
    "default": {"datasets": {"readings": {}}, "min_group_size": 5},
    "rules": [
        {"name": "us-keeps-temperatures", "where": {"regions": ["us"]},
         "policy": {"datasets": {"readings": {"columns": ["line", "parts"]}}, "min_group_size": 10}},
        {"name": "labs-closed", "where": {"labels": {"kind": "lab"}}, "policy": {"datasets": {}}},
    ],
}


def test_it_resolves_the_policy_of_each_site_from_the_first_rule_that_selects_it(
    site_berlin: Site, site_ohio: Site
) -> None:
    assert data_policy_for_site(site_berlin)[:2] == (0, "default")
    assert data_policy_for_site(site_berlin)[2].datasets == {}  # nothing may be queried before a policy exists
    policy_update(actor=ACTOR, kind="data", document=DOCUMENT)
    lab = make_site(site_berlin.region, "lab-1", labels={"kind": "lab"})
    number, rule, policy = data_policy_for_site(site_ohio)
    assert (number, rule, policy.min_group_size, policy.datasets["readings"].columns) == (
        1, "us-keeps-temperatures", 10, ["line", "parts"])
    assert data_policy_for_site(site_berlin)[1:3] == ("default", data_policy_for_site(site_berlin)[2])
    assert data_policy_for_site(site_berlin)[2].min_group_size == 5
    assert data_policy_for_site(lab)[1] == "labs-closed"


def test_it_signs_the_sites_data_policy_and_facts_into_its_nodes_desired_state(site_ohio: Site) -> None:
    node, _ = make_node(site_ohio, "gw-1")
    from audit.services import Actor
    from orchestrator.desired_state import desired_state_publish
    from sites.services import site_update

    desired_state_publish(node=node, actor=Actor.system("test"))
    before = DesiredState.objects.get(node=node).generation
    policy_update(actor=ACTOR, kind="data", document=DOCUMENT)
    state = DesiredState.objects.get(node=node)
    data = json.loads(state.payload)["policy"]["data"]
    assert state.generation == before + 1
    assert (data["version"], data["rule"], data["policy"]["min_group_size"]) == (1, "us-keeps-temperatures", 10)
    assert data["facts"] == {"connectivity": "connected", "sovereign": False, "jurisdiction": "US"}
    site_update(actor=Actor.system("test"), site=site_ohio, labels={"sovereign": "true"},
                connectivity="intermittent")
    data = json.loads(DesiredState.objects.get(node=node).payload)["policy"]["data"]
    assert data["facts"] == {"connectivity": "intermittent", "sovereign": True, "jurisdiction": "US"}


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"rules": [{"name": "ok", "policy": {}}, {"name": "bad", "policy": {"min_group_size": 0}}]},
         'rules[1] "bad".policy.min_group_size'),
        ({"rules": [{"name": "x", "policy": {"aggregates": ["median"]}}]}, 'rules[0] "x".policy.aggregates[0]'),
        ({"default": {"allow_rows": "sometimes"}}, "default.allow_rows"),
        ({"rules": [{"name": "a", "policy": {}}, {"name": "a", "policy": {}}]}, "used by an earlier rule"),
    ],
)
def test_it_refuses_a_bad_data_policy_naming_the_rule(db: None, document: dict[str, Any], error: str) -> None:
    with pytest.raises(PoliciesError) as caught:
        policy_update(actor=ACTOR, kind="data", document=document)
    assert error in caught.value.message
    assert not PolicyVersion.objects.exists()

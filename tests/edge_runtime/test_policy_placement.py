"""The placement evaluator: decisions with the rule and reason, and documents refused with the rule named."""

from __future__ import annotations

import pytest

from edge_runtime.policy.placement import (
    NodeFacts,
    PlacementPolicy,
    PolicyInvalid,
    SiteFacts,
    model_facts,
    parse_document,
    place,
    site_decision,
)

BERLIN = SiteFacts(slug="plant-berlin", region="eu", clearance=3, jurisdiction="DE", labels={"tier": "gold"})
OHIO = SiteFacts(slug="plant-ohio", region="us", clearance=3, jurisdiction="US")
KIOSK = SiteFacts(slug="kiosk", region="eu", clearance=0, jurisdiction="DE")
SERVER = NodeFacts(role="server", memory_mb=65536, execution_providers=("CUDAExecutionProvider",
                                                                        "CPUExecutionProvider"))

POLICY = parse_document(PlacementPolicy, {"rules": [
    {"name": "secret-stays-in-eu", "effect": "only", "classifications": [3],
     "where": {"jurisdictions": ["de", "FR"]}},
    {"name": "no-confidential-in-us", "effect": "deny", "classifications": [2], "where": {"regions": ["us"]}},
]})


def test_it_enforces_the_built_in_clearance_check_before_any_rule() -> None:
    decision = site_decision(POLICY, KIOSK, 1)
    assert not decision.allowed and decision.rule == "clearance"
    assert decision.reason == "the model is classified Internal, above the site's clearance Public"


def test_it_allows_a_classification_only_where_an_only_rule_selects() -> None:
    assert site_decision(POLICY, BERLIN, 3).allowed
    refused = site_decision(POLICY, OHIO, 3)
    assert not refused.allowed and refused.rule == "secret-stays-in-eu"
    assert refused.reason == ("placement rule 'secret-stays-in-eu' allows Secret models only at sites with "
                              "jurisdiction DE or FR")


def test_it_forbids_a_classification_where_a_deny_rule_selects() -> None:
    refused = site_decision(POLICY, OHIO, 2)
    assert not refused.allowed and refused.rule == "no-confidential-in-us"
    assert "forbids Confidential models at sites with region us" in refused.reason
    assert site_decision(POLICY, BERLIN, 2).allowed
    # Rules only concern the classifications they list.
    assert site_decision(POLICY, OHIO, 1).allowed


@pytest.mark.parametrize(
    ("node", "requirements", "rule", "reason"),
    [
        (NodeFacts(role="device", memory_mb=2048), {"min_memory_mb": 8192}, "memory",
         "needs 8192 MB of memory; the node reports 2048 MB"),
        (NodeFacts(role="device"), {"min_memory_mb": 8192}, "memory",
         "needs 8192 MB of memory; the node has not reported its memory"),
        (NodeFacts(role="device", memory_mb=8192), {"node_roles": ["server"]}, "role",
         "runs only on server nodes; this node is a device"),
        (NodeFacts(role="server", memory_mb=8192), {"required_providers": ["CUDAExecutionProvider"]}, "provider",
         "needs execution provider CUDAExecutionProvider, which the node does not report"),
    ],
    ids=["memory", "memory-unreported", "role", "provider"],
)
def test_it_checks_the_versions_hardware_requirements_against_the_node(
        node: NodeFacts, requirements: dict[str, object], rule: str, reason: str) -> None:
    decision = place(POLICY, BERLIN, node, model_facts(1, **requirements))  # type: ignore[arg-type]
    assert (decision.allowed, decision.rule, decision.reason) == (False, rule, reason)
    assert place(POLICY, BERLIN, SERVER, model_facts(1, **requirements)).allowed  # type: ignore[arg-type]


def test_it_judges_the_site_before_the_hardware() -> None:
    decision = place(POLICY, OHIO, NodeFacts(role="device"), model_facts(3, min_memory_mb=1))
    assert decision.rule == "secret-stays-in-eu"


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"rules": [{"name": "ok", "effect": "deny", "where": {"regions": ["us"]}},
                    {"name": "bad-class", "effect": "deny", "classifications": [7]}]},
         'rules[1] "bad-class".classifications: 7 is not a classification'),
        ({"rules": [{"name": "typo", "effect": "deny", "wher": {}}]}, 'rules[0] "typo".wher: Extra inputs'),
        ({"rules": [{"name": "open", "effect": "only", "classifications": [3]}]},
         'rules[0] "open": an \'only\' rule needs a non-empty \'where\''),
        ({"rules": [{"name": "x", "effect": "allow"}]}, 'rules[0] "x".effect: Input should be \'deny\' or \'only\''),
        ({"rules": [{"name": "Bad Name", "effect": "deny"}]}, 'rules[0] "Bad Name".name: String should match'),
        ({"rules": [{"name": "twice", "effect": "deny"}, {"name": "twice", "effect": "deny"}]},
         'rules[1] "twice": the name is used by an earlier rule'),
        ({"rules": [{"name": "clearance", "effect": "deny"}]}, "'clearance' is the name of a built-in check"),
        ({"rules": [{"name": "neg", "effect": "deny", "where": {"min_clearance": 9}}]},
         'rules[0] "neg".where.min_clearance: Input should be less than or equal to 3'),
        ([], "a policy document is a JSON object, not list"),
    ],
    ids=["classification", "unknown-field", "open-only", "effect", "name", "duplicate", "builtin", "clearance",
         "not-object"],
)
def test_it_refuses_a_bad_rule_naming_it(document: object, error: str) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        parse_document(PlacementPolicy, document)
    assert error in str(caught.value)

"""Rollout policy: approval rules, waves, and gates that never pass on doubtful data."""

from __future__ import annotations

import math

import pytest

from edge_runtime.policy.placement import PolicyInvalid, parse_document
from edge_runtime.policy.rollout import (
    GateSpec,
    HealthWindow,
    RolloutPolicy,
    Strategy,
    approval_requirement,
    evaluate_gate,
    plan_waves,
    window_sum,
)

BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
GATE = GateSpec(min_requests=20, max_error_rate=0.05, max_error_rate_increase=0.01, max_p95_ratio=1.5)


def window(requests: float, errors: float, latency: float, nodes: int = 1) -> HealthWindow:
    """All requests in the bucket of ``latency``."""
    counts = [0.0] * (len(BOUNDS) + 1)
    slot = next((i for i, b in enumerate(BOUNDS) if latency <= b), len(BOUNDS))
    counts[slot] = requests
    return HealthWindow(requests, errors, BOUNDS, tuple(counts), nodes)


def test_it_passes_a_version_that_is_as_good_as_the_previous_one() -> None:
    result = evaluate_gate(GATE, new=window(100, 1, 0.004), previous=window(500, 5, 0.004), has_previous=True)
    assert result.outcome == "passed"
    assert {c.name: c.passed for c in result.checks} == {
        "requests": True, "error_rate": True, "error_rate_increase": True, "p95_ratio": True}


def test_it_fails_a_version_that_errors_more_with_the_values_and_thresholds() -> None:
    result = evaluate_gate(GATE, new=window(40, 20, 0.004), previous=window(500, 0, 0.004), has_previous=True)
    assert result.outcome == "failed"
    checks = {c.name: c for c in result.checks}
    assert checks["error_rate"].value == 0.5 and checks["error_rate"].threshold == 0.05
    assert checks["error_rate"].passed is False
    assert "error_rate 0.5 is over the threshold 0.05" in result.reason


def test_it_fails_a_version_that_is_much_slower() -> None:
    result = evaluate_gate(GATE, new=window(100, 0, 0.4), previous=window(100, 0, 0.004), has_previous=True)
    assert result.outcome == "failed"
    ratio = next(c for c in result.checks if c.name == "p95_ratio")
    assert ratio.passed is False and ratio.value is not None and ratio.value > 10


@pytest.mark.parametrize(
    ("new", "previous", "why"),
    [
        (None, window(100, 0, 0.004), "no health data for the new version"),
        (window(5, 0, 0.004), window(100, 0, 0.004), "5 requests to the new version, fewer than the minimum of 20"),
        (window(100, 0, 0.004), None, "no health data for the previous version"),
        (window(100, 0, 0.004), window(3, 0, 0.004), "3 requests to the previous version"),
        (HealthWindow(math.nan, 0, BOUNDS, (0,) * 8), window(100, 0, 0.004), "is not a number"),
        (window(100, 0, 0.004), HealthWindow(100, 0, BOUNDS, (math.nan,) * 8), "is not a number"),
        (HealthWindow(100, 0, BOUNDS, (100,)), window(100, 0, 0.004), "is not a number"),
    ],
    ids=["missing", "too-few", "no-baseline", "thin-baseline", "nan-new", "nan-previous", "bad-histogram"],
)
def test_it_is_inconclusive_on_doubtful_data_and_never_passes(new: HealthWindow | None,
                                                             previous: HealthWindow | None, why: str) -> None:
    result = evaluate_gate(GATE, new=new, previous=previous, has_previous=True)
    assert result.outcome == "inconclusive"
    assert why in result.reason


def test_it_fails_on_the_new_versions_own_errors_even_without_a_baseline() -> None:
    result = evaluate_gate(GATE, new=window(100, 60, 0.004), previous=None, has_previous=True)
    assert result.outcome == "failed"


def test_it_judges_a_first_install_on_absolute_thresholds_only() -> None:
    fine = evaluate_gate(GATE, new=window(100, 0, 0.004), previous=None, has_previous=False)
    assert fine.outcome == "passed"
    assert next(c for c in fine.checks if c.name == "p95_ratio").passed is None
    assert evaluate_gate(GATE, new=window(100, 50, 0.004), previous=None, has_previous=False).outcome == "failed"


def test_it_pools_nodes_and_treats_mismatched_histograms_as_not_a_number() -> None:
    pooled = window_sum([window(10, 1, 0.004), None, window(30, 2, 0.004)])
    assert pooled is not None and (pooled.requests, pooled.errors, pooled.nodes) == (40, 3, 2)
    odd = HealthWindow(10, 0, (1.0,), (10, 0))
    assert window_sum([window(10, 0, 0.004), odd]).finite() is False  # type: ignore[union-attr]
    assert window_sum([None]) is None


def test_it_estimates_the_p95_inside_its_bucket() -> None:
    w = HealthWindow(100, 0, (0.01, 0.1), (90, 10, 0))
    # The 95th request is half-way through the (0.01, 0.1] bucket.
    assert w.p95 == pytest.approx(0.055)


@pytest.mark.parametrize(
    ("nodes", "canary", "percentages", "sizes"),
    [
        (10, 1, [50, 100], [1, 5, 4]),
        (10, 2, [25, 50, 100], [2, 2, 2, 4]),
        (3, 5, [50, 100], [3]),
        (4, 1, [100], [1, 3]),
        (101, 1, [10, 100], [1, 10, 90]),
    ],
)
def test_it_cuts_a_canary_then_cumulative_percentages(nodes: int, canary: int, percentages: list[float],
                                                      sizes: list[int]) -> None:
    names = [f"n{i}" for i in range(nodes)]
    waves = plan_waves(names, canary=canary, percentages=percentages)
    assert [len(w) for w in waves] == sizes
    assert [n for w in waves for n in w] == names


def test_it_requires_the_strictest_matching_approval_rules() -> None:
    policy = parse_document(RolloutPolicy, {"approval_rules": [
        {"name": "eu", "regions": ["eu"], "approvals": 1},
        {"name": "secret-sites", "min_site_clearance": 3, "approvals": 2, "role": "Admin"},
        {"name": "confidential-models", "min_classification": 2, "approvals": 1},
    ]})
    none = approval_requirement(policy, regions=["us"], site_clearances=[1], classification=0)
    assert not none.needed and none.rules == ()
    eu = approval_requirement(policy, regions=["eu"], site_clearances=[1], classification=0)
    assert (eu.approvals, eu.role, eu.rules) == (1, "Approver", ("eu",))
    both = approval_requirement(policy, regions=["eu", "us"], site_clearances=[1, 3], classification=2)
    assert (both.approvals, both.role, both.rules) == (2, "Admin", ("eu", "secret-sites", "confidential-models"))


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"approval_rules": [{"name": "x", "approvals": 0}]},
         'approval_rules[0] "x".approvals: Input should be greater than or equal to 1'),
        ({"approval_rules": [{"name": "x", "role": "Viewer"}]}, 'approval_rules[0] "x".role'),
        ({"approval_rules": [{"name": "a"}, {"name": "a"}]}, 'approval_rules[1] "a": the name is used'),
        ({"defaults": {"percentages": [50, 40, 100]}}, "percentages[1] is 40.0, not above the one before it"),
        ({"defaults": {"percentages": [50]}}, "the last percentage is 50.0; it must be 100"),
        ({"defaults": {"gate": {"max_error_rate": 2}}}, "defaults.gate.max_error_rate"),
    ],
)
def test_it_refuses_a_bad_rollout_policy_naming_the_rule(document: dict[str, object], error: str) -> None:
    with pytest.raises(PolicyInvalid) as caught:
        parse_document(RolloutPolicy, document)
    assert error in str(caught.value)


def test_it_lets_a_strategy_run_without_a_gate() -> None:
    assert Strategy.model_validate({"gate": None}).gate is None

"""Rollout policy: approvals, wave planning and health gates, as pure functions.

**Approvals.** :class:`RolloutPolicy` holds approval rules. A rule applies to
a rollout when every condition it sets holds: one of its ``regions`` is
among the rollout's regions, some target site's clearance is at least
``min_site_clearance``, the model's classification is at least
``min_classification`` (a rule with no condition applies to every rollout).
A rollout needs the largest ``approvals`` count of the rules that apply, each
from someone holding the strictest role they name (``Admin`` over
``Approver``); no rule applies, no approval is needed. Approvals expire after
``approval_ttl_s``.

**Waves.** :func:`plan_waves` cuts an ordered node list into a canary of
``canary_nodes`` nodes, then cumulative percentages of the rest
(``[25, 50, 100]``: a quarter of the rest, then up to half, then all). Empty
waves are dropped; the last wave always ends at 100 %.

**Gates.** :func:`evaluate_gate` compares the new version's health on a
wave's nodes with the previous version's on the same nodes:

* ``error_rate``: the new version's errors / requests, at most ``max_error_rate``;
* ``error_rate_increase``: the new rate minus the previous, at most
  ``max_error_rate_increase``;
* ``p95_ratio``: the new p95 latency over the previous, at most ``max_p95_ratio``;
* ``requests``: each side needs at least ``min_requests`` requests.

A check that fails on sufficient data fails the gate (even if another check
lacks data: the new version's own numbers are enough to stop it). Otherwise
missing data, too few requests, or a value that is not a finite number make
the gate **inconclusive**, which never passes. Where the nodes had no
previous version the comparisons cannot be made and are reported as such;
the absolute error rate still decides.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge_runtime.names import first_repeat
from edge_runtime.policy.placement import (
    RULE_NAME_PATTERN,
    PolicyDocument,
    clearance_label,
)

Role = Literal["Approver", "Admin"]
ROLE_RANK: dict[str, int] = {"Approver": 1, "Admin": 2}
Outcome = Literal["passed", "failed", "inconclusive"]


class GateSpec(PolicyDocument):
    min_requests: int = Field(default=20, ge=1, le=10_000_000)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    max_p95_ratio: float = Field(default=1.5, gt=0, le=1000)
    # Fail the wave when a node serves the new version wholly on CPU although an accelerator was meant
    # (it fell back: failed there, or gave other answers than CPU), or, stricter, partly on CPU.
    fail_on_cpu_fallback: bool = False
    fail_on_partial: bool = False


class Strategy(PolicyDocument):
    canary_nodes: int = Field(default=1, ge=1, le=10_000)
    # Cumulative percentages of the nodes after the canary; the last is 100.
    percentages: list[float] = Field(default_factory=lambda: [50.0, 100.0], min_length=1, max_length=20)
    bake_s: float = Field(default=300.0, ge=0, le=7 * 86400)
    gate: GateSpec | None = Field(default_factory=GateSpec)
    # How long a wave waits for a node that is offline before doing what on_offline says.
    offline_timeout_s: float = Field(default=300.0, ge=0, le=7 * 86400)
    on_offline: Literal["skip", "pause"] = "skip"
    # While at least this share of the target is offline at once, the rollout pauses instead of judging.
    max_offline_fraction: float = Field(default=0.3, gt=0, le=1)

    @field_validator("percentages")
    @classmethod
    def _increasing(cls, values: list[float]) -> list[float]:
        for index, value in enumerate(values):
            if not (0 < value <= 100) or not math.isfinite(value):
                raise ValueError(f"percentages[{index}] is {value}; each is above 0 and at most 100")
            if index and value <= values[index - 1]:
                raise ValueError(f"percentages[{index}] is {value}, not above the one before it; "
                                 "percentages are cumulative and increasing")
        if values[-1] != 100:
            raise ValueError(f"the last percentage is {values[-1]}; it must be 100 so that every node is reached")
        return values


class ApprovalRule(PolicyDocument):
    name: str = Field(pattern=RULE_NAME_PATTERN)
    description: str = Field(default="", max_length=500)
    regions: list[str] = Field(default_factory=list, max_length=200)
    min_site_clearance: int | None = Field(default=None, ge=0, le=3)
    min_classification: int | None = Field(default=None, ge=0, le=3)
    approvals: int = Field(default=1, ge=1, le=10)
    role: Role = "Approver"

    def applies(self, *, regions: Iterable[str], site_clearances: Iterable[int], classification: int) -> bool:
        if self.regions and not set(self.regions) & set(regions):
            return False
        if self.min_site_clearance is not None and max(site_clearances, default=-1) < self.min_site_clearance:
            return False
        return not (self.min_classification is not None and classification < self.min_classification)

    def describe(self) -> str:
        parts = []
        if self.regions:
            parts.append(f"region {' or '.join(self.regions)}")
        if self.min_site_clearance is not None:
            parts.append(f"a site cleared {clearance_label(self.min_site_clearance)} or above")
        if self.min_classification is not None:
            parts.append(f"a model classified {clearance_label(self.min_classification)} or above")
        return " and ".join(parts) if parts else "every rollout"


class RolloutPolicy(PolicyDocument):
    kind: Literal["rollout"] = "rollout"
    approval_rules: list[ApprovalRule] = Field(default_factory=list, max_length=200)
    approval_ttl_s: float = Field(default=86400.0, gt=0, le=90 * 86400)
    # What a new rollout's strategy starts from.
    defaults: Strategy = Field(default_factory=Strategy)

    @model_validator(mode="after")
    def _unique(self) -> RolloutPolicy:
        repeat = first_repeat(rule.name for rule in self.approval_rules)
        if repeat is not None:
            raise ValueError(f"approval_rules[{repeat[0]}] \"{repeat[1]}\": the name is used by an earlier rule")
        return self


@dataclasses.dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    approvals: int
    role: Role
    rules: tuple[str, ...]

    @property
    def needed(self) -> bool:
        return self.approvals > 0


def approval_requirement(policy: RolloutPolicy, *, regions: Iterable[str], site_clearances: Iterable[int],
                         classification: int) -> ApprovalRequirement:
    regions, clearances = list(regions), list(site_clearances)
    matched = [r for r in policy.approval_rules
               if r.applies(regions=regions, site_clearances=clearances, classification=classification)]
    if not matched:
        return ApprovalRequirement(0, "Approver", ())
    role: Role = max((r.role for r in matched), key=lambda name: ROLE_RANK[name])
    return ApprovalRequirement(max(r.approvals for r in matched), role, tuple(r.name for r in matched))


def plan_waves(nodes: Sequence[str], *, canary: int, percentages: Sequence[float]) -> list[list[str]]:
    """Cut ``nodes`` (already in rollout order) into the canary and the percentage waves."""
    if not nodes:
        return []
    first = list(nodes[:max(1, canary)])
    rest = list(nodes[len(first):])
    waves = [first]
    done = 0
    for percent in percentages:
        upto = len(rest) if percent >= 100 else min(len(rest), math.ceil(len(rest) * percent / 100))
        if upto > done:
            waves.append(rest[done:upto])
            done = upto
    if done < len(rest):
        waves.append(rest[done:])
    return waves


# -- health --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HealthWindow:
    """Requests, errors and a latency histogram of one version over a window (summed over nodes).

    ``latency_counts`` has one count per bound in ``latency_bounds`` (seconds,
    upper bounds) plus one for everything above the last.
    """

    requests: float
    errors: float
    latency_bounds: tuple[float, ...]
    latency_counts: tuple[float, ...]
    nodes: int = 1

    def finite(self) -> bool:
        values = (self.requests, self.errors, *self.latency_counts, *self.latency_bounds)
        return all(math.isfinite(v) and v >= 0 for v in values) and \
            len(self.latency_counts) == len(self.latency_bounds) + 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Prometheus-style quantile estimate: linear within the bucket; the last finite bound above it."""
        total = sum(self.latency_counts)
        if total <= 0 or not self.finite():
            return math.nan
        rank = q * total
        cumulative = 0.0
        for index, count in enumerate(self.latency_counts):
            if cumulative + count >= rank and count > 0:
                if index >= len(self.latency_bounds):
                    return self.latency_bounds[-1] if self.latency_bounds else math.nan
                lower = self.latency_bounds[index - 1] if index else 0.0
                upper = self.latency_bounds[index]
                return lower + (upper - lower) * (rank - cumulative) / count
            cumulative += count
        return self.latency_bounds[-1] if self.latency_bounds else math.nan

    @property
    def p95(self) -> float:
        return self.quantile(0.95)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "nodes": self.nodes,
                "error_rate": _json_number(self.error_rate), "p95_s": _json_number(self.p95)}


def window_sum(windows: Iterable[HealthWindow | None]) -> HealthWindow | None:
    """Pool several nodes' windows (None where a node has no data at all)."""
    present = [w for w in windows if w is not None]
    if not present:
        return None
    bounds = present[0].latency_bounds
    if any(w.latency_bounds != bounds for w in present):
        nan = math.nan
        return HealthWindow(nan, nan, bounds, tuple(nan for _ in range(len(bounds) + 1)), len(present))
    counts = [0.0] * (len(bounds) + 1)
    for window in present:
        for index, count in enumerate(window.latency_counts):
            counts[index] += count
    return HealthWindow(sum(w.requests for w in present), sum(w.errors for w in present), bounds, tuple(counts),
                        len(present))


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: float | None
    threshold: float
    # None: could not be judged (missing data, too few requests, not a number).
    passed: bool | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": _json_number(self.value), "threshold": self.threshold,
                "passed": self.passed, "detail": self.detail}


@dataclasses.dataclass(frozen=True, slots=True)
class GateResult:
    outcome: Outcome
    reason: str
    checks: tuple[Check, ...] = ()
    new: HealthWindow | None = None
    previous: HealthWindow | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "reason": self.reason, "checks": [c.as_dict() for c in self.checks],
                "new": self.new.as_dict() if self.new else None,
                "previous": self.previous.as_dict() if self.previous else None}


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _usable(window: HealthWindow | None, gate: GateSpec, what: str) -> str:
    """Why ``window`` cannot be judged ("" when it can)."""
    if window is None:
        return f"no health data for the {what} version"
    if not window.finite():
        return f"the health data for the {what} version is not a number"
    if window.requests < gate.min_requests:
        return (f"{window.requests:g} requests to the {what} version, fewer than the minimum of "
                f"{gate.min_requests}")
    return ""


def _fallback_check(gate: GateSpec, placements: Sequence[tuple[str, str, str]]) -> Check | None:
    """The nodes that serve the new version on CPU where the gate forbids it (None: the gate does not look)."""
    barred = {"cpu_fallback"} if gate.fail_on_cpu_fallback else set()
    if gate.fail_on_partial:
        barred |= {"cpu_fallback", "partial"}
    if not barred:
        return None
    found = [(node, where, why) for node, where, why in placements if where in barred]
    detail = "; ".join(f"{node}: {where.replace('_', ' ')}" + (f" ({why[:300]})" if why else "")
                       for node, where, why in found)
    return Check("provider_fallback", float(len(found)), 0, not found,
                 detail or f"{len(placements)} node(s) serve it where it was meant to run")


def evaluate_gate(gate: GateSpec, *, new: HealthWindow | None, previous: HealthWindow | None,
                  has_previous: bool, placements: Sequence[tuple[str, str, str]] = ()) -> GateResult:
    """Judge a wave: passed, failed or inconclusive, with every value against its threshold.

    ``placements``: (node, placement, why) of each node serving the new version;
    a fallback the gate forbids fails the wave at once, however few requests came.
    """
    checks: list[Check] = []
    fallback = _fallback_check(gate, placements)
    if fallback is not None:
        if fallback.passed is False:
            return GateResult("failed", f"{fallback.value:g} node(s) fell back to CPU: {fallback.detail}",
                              (fallback,), new, previous)
        checks.append(fallback)
    new_problem = _usable(new, gate, "new")
    if new_problem or new is None:
        checks.append(Check("requests", new.requests if new else None, gate.min_requests, None, new_problem))
        return GateResult("inconclusive", new_problem, tuple(checks), new, previous)
    checks.append(Check("requests", new.requests, gate.min_requests, True,
                        f"{new.requests:g} requests to the new version on {new.nodes} node(s)"))
    rate = new.error_rate
    checks.append(Check("error_rate", rate, gate.max_error_rate, rate <= gate.max_error_rate,
                        f"{new.errors:g} of {new.requests:g} requests failed"))
    if has_previous:
        previous_problem = _usable(previous, gate, "previous")
        if previous_problem or previous is None:
            checks.append(Check("error_rate_increase", None, gate.max_error_rate_increase, None, previous_problem))
            checks.append(Check("p95_ratio", None, gate.max_p95_ratio, None, previous_problem))
        else:
            increase = rate - previous.error_rate
            checks.append(Check("error_rate_increase", increase, gate.max_error_rate_increase,
                                increase <= gate.max_error_rate_increase if math.isfinite(increase) else None,
                                f"previous version's error rate {previous.error_rate:.4f}"))
            ratio = new.p95 / previous.p95 if previous.p95 > 0 else math.nan
            checks.append(Check("p95_ratio", ratio, gate.max_p95_ratio,
                                ratio <= gate.max_p95_ratio if math.isfinite(ratio) else None,
                                f"p95 {new.p95 * 1000:.1f} ms against {previous.p95 * 1000:.1f} ms"
                                if math.isfinite(ratio) else "a p95 latency is not a number"))
    else:
        checks.append(Check("p95_ratio", None, gate.max_p95_ratio, None,
                            "no previous version on these nodes: nothing to compare with"))
    failed = [c for c in checks if c.passed is False]
    if failed:
        reason = "; ".join(f"{c.name} {c.value:.4g} is over the threshold {c.threshold:g} ({c.detail})"
                           for c in failed if c.value is not None)
        return GateResult("failed", reason, tuple(checks), new, previous)
    unjudged = [c for c in checks if c.passed is None and (has_previous or c.name != "p95_ratio")]
    if unjudged:
        return GateResult("inconclusive", "; ".join(c.detail for c in unjudged), tuple(checks), new, previous)
    return GateResult("passed", "every check is within its threshold", tuple(checks), new, previous)


def latency_index(bounds: Sequence[float], value: float) -> int:
    """The histogram slot of ``value`` (for building windows in tests and simulators)."""
    return bisect.bisect_left(bounds, value)

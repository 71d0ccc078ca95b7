"""Reads of policies: the documents in force (placement, rollout, data), a site's policy bundle, approvals of a
plan."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
from collections.abc import Iterator
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from edge_runtime.policy.data import DataPolicy, DataPolicyDocument
from edge_runtime.policy.placement import PlacementPolicy, SiteFacts
from edge_runtime.policy.rollout import RolloutPolicy
from policies.models import Approval, Decision, Policy, PolicyKind, PolicyVersion
from sites.models import Clearance, Site


def policy_version_current(kind: str) -> PolicyVersion | None:
    return PolicyVersion.objects.filter(policy__kind=kind).select_related("policy").order_by("-number").first()


_pinned: contextvars.ContextVar[tuple[int, PlacementPolicy] | None] = contextvars.ContextVar(
    "placement_policy_pinned", default=None)


@contextlib.contextmanager
def placement_policy_pinned() -> Iterator[tuple[int, PlacementPolicy]]:
    """Within the block, read the placement policy in force once: publishing a wave of many nodes
    then costs no policy query per node, and every node of the wave is placed under the same version."""
    current = placement_policy_current()
    token = _pinned.set(current)
    try:
        yield current
    finally:
        _pinned.reset(token)


def placement_policy_current() -> tuple[int, PlacementPolicy]:
    """(version number, document) of the placement policy in force; (0, no rules) before the first edit."""
    pinned = _pinned.get()
    if pinned is not None:
        return pinned
    current = policy_version_current(PolicyKind.PLACEMENT)
    if current is None:
        return 0, PlacementPolicy()
    return current.number, PlacementPolicy.model_validate(current.document)


def rollout_policy_current() -> tuple[int, RolloutPolicy]:
    current = policy_version_current(PolicyKind.ROLLOUT)
    if current is None:
        return 0, RolloutPolicy()
    return current.number, RolloutPolicy.model_validate(current.document)


def data_policy_current() -> tuple[int, DataPolicyDocument]:
    """(version number, document) of the data policy in force; (0, the default that allows nothing) before the
    first version is written."""
    current = policy_version_current(PolicyKind.DATA)
    if current is None:
        return 0, DataPolicyDocument()
    return current.number, DataPolicyDocument.model_validate(current.document)


def data_policy_for_site(site: Any) -> tuple[int, str, DataPolicy]:
    """(version, the rule that decides, the policy) of the data policy in force at ``site``."""
    number, document = data_policy_current()
    rule, policy = document.for_site(site_facts(site))
    return number, rule, policy


def site_facts(site: Any) -> SiteFacts:
    """The facts placement sees of a ``sites.Site`` (its region must be loaded or loadable)."""
    return SiteFacts(slug=site.slug, region=site.region.slug, clearance=int(site.clearance),
                     jurisdiction=site.jurisdiction or "",
                     labels={str(k): str(v) for k, v in (site.labels or {}).items()})


def policy_bundle_for_site(site: Any, placement: tuple[int, PlacementPolicy] | None = None) -> dict[str, Any]:
    """The signed ``policy`` part of a node's desired state: its site's facts and the placement policy."""
    number, document = placement or placement_policy_current()
    facts = site_facts(site)
    return {
        "site": {"slug": facts.slug, "region": facts.region, "clearance": facts.clearance,
                 "jurisdiction": facts.jurisdiction, "labels": dict(facts.labels)},
        "placement": document.model_dump(mode="json"),
        "placement_version": number,
    }


def policy_list() -> list[dict[str, Any]]:
    """Each kind with its current version (None before the first edit)."""
    rows = []
    for kind, label in PolicyKind.choices:
        rows.append({"kind": kind, "label": label, "current": policy_version_current(kind)})
    return rows


def policy_versions(kind: str) -> QuerySet[PolicyVersion]:
    return PolicyVersion.objects.filter(policy__kind=kind).select_related("created_by").order_by("-number")


def policy_get(kind: str) -> Policy | None:
    return Policy.objects.filter(kind=kind).first()


def approvals_for(subject_type: str, subject_uuid: Any) -> QuerySet[Approval]:
    return Approval.objects.filter(subject_type=subject_type, subject_uuid=subject_uuid).select_related("user")


def approvals_valid(subject_type: str, subject_uuid: Any, plan_hash: str, *, exclude_user_id: int | None = None,
                    now: dt.datetime | None = None) -> QuerySet[Approval]:
    """Approvals that still count: of this exact plan, not expired, not by the requester."""
    now = now or timezone.now()
    approvals = approvals_for(subject_type, subject_uuid).filter(
        plan_hash=plan_hash, decision=Decision.APPROVE, expires_at__gt=now)
    if exclude_user_id is not None:
        approvals = approvals.exclude(user_id=exclude_user_id)
    return approvals


# -- the data policy's part of a node's desired state ------------------------------------------


# A site labelled so (or cleared Secret) is sovereign: no row-level output ever leaves it, whatever the policy.
SOVEREIGN_LABEL = "sovereign"


def site_is_sovereign(site: Site) -> bool:
    label = str((site.labels or {}).get(SOVEREIGN_LABEL, "")).strip().lower()
    return label in {"true", "yes", "1"} or site.clearance >= Clearance.SECRET


def data_bundle_for_site(site: Site) -> dict[str, Any]:
    """The ``data`` part of a node's signed policy bundle (read by the node's dataset service)."""
    number, rule, policy = data_policy_for_site(site)
    return {
        "version": number,
        "rule": rule,
        "policy": policy.model_dump(mode="json"),
        "facts": {"connectivity": site.connectivity, "sovereign": site_is_sovereign(site),
                  "jurisdiction": site.jurisdiction or ""},
    }

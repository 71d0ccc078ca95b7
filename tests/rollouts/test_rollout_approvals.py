"""Approvals: who may approve, what an approval binds to, and when it stops counting."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from audit.models import AuditEvent
from audit.services import Actor
from policies import services as policy_services
from policies.models import Approval
from rollouts import services
from rollouts.models import Rollout, RolloutState
from rollouts.selectors import approval_inbox
from rollouts.services import RolloutError
from sites.models import Site
from tests.fixtures.personas import make_user
from tests.rollouts.rollout_factories import ACTOR, deploy, fleet, two_versions


def needing(approvals: int = 1, role: str = "Approver", ttl: float = 3600) -> None:
    policy_services.policy_update(actor=ACTOR, kind="rollout", document={
        "approval_rules": [{"name": "eu-needs-review", "regions": ["eu"], "approvals": approvals, "role": role}],
        "approval_ttl_s": ttl})


def requested(site: Site, user: Any) -> Rollout:
    v1, v2 = two_versions("defects")
    fleet(site, 3)
    deploy(v1, site)
    return services.rollout_create(actor=Actor.user(user), user=user, version=v2, target={"sites": [site.slug]},
                                   strategy={"gate": None})


def approve(user: Any, rollout: Rollout, plan_hash: str | None = None) -> Rollout:
    return services.rollout_approve(actor=Actor.user(user), user=user, rollout=rollout,
                                    plan_hash=plan_hash or rollout.plan_hash)


def test_it_needs_the_approvals_its_policy_requires(site_berlin: Site, operator: Any, approver: Any) -> None:
    needing()
    rollout = requested(site_berlin, operator)
    assert rollout.state == RolloutState.PENDING_APPROVAL
    assert (rollout.approvals_required, rollout.approval_role, rollout.approval_rules) == (
        1, "Approver", ["eu-needs-review"])
    with pytest.raises(RolloutError, match="only a ready rollout can start"):
        services.rollout_start(actor=ACTOR, rollout=rollout)
    assert approval_inbox(user=approver) == [rollout]
    rollout = approve(approver, rollout)
    assert rollout.state == RolloutState.READY
    event = AuditEvent.objects.get(action="rollout.approve")
    assert event.actor == "approver" and event.after["plan_hash"] == rollout.plan_hash
    assert services.rollout_start(actor=Actor.user(operator), rollout=rollout).state == RolloutState.PROGRESSING


def test_it_refuses_self_approval(site_berlin: Site, admin_user: Any) -> None:
    needing()
    rollout = requested(site_berlin, admin_user)
    with pytest.raises(RolloutError, match="you requested this rollout; someone else must approve it") as caught:
        approve(admin_user, rollout)
    assert caught.value.status == 403
    assert not Approval.objects.exists()
    assert approval_inbox(user=admin_user) == []
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.PENDING_APPROVAL


def test_it_voids_approvals_when_the_plan_changes(site_berlin: Site, operator: Any, approver: Any) -> None:
    needing(approvals=2)
    second = make_user("approver-2", groups=("Approver",))
    rollout = requested(site_berlin, operator)
    old_hash = rollout.plan_hash
    rollout = approve(approver, rollout)
    assert rollout.state == RolloutState.PENDING_APPROVAL
    rollout = services.rollout_update(actor=Actor.user(operator), rollout=rollout, strategy={"canary_nodes": 2})
    assert rollout.plan_hash != old_hash and rollout.state == RolloutState.PENDING_APPROVAL
    # An approval given on the page of the old plan is refused...
    with pytest.raises(RolloutError, match="the plan changed since you reviewed it"):
        approve(second, rollout, plan_hash=old_hash)
    # ... and the first approval, of the old plan, no longer counts.
    rollout = approve(second, rollout)
    assert rollout.state == RolloutState.PENDING_APPROVAL
    assert rollout.events.filter(message__contains="approvals of the earlier plan no longer count").exists()
    rollout = approve(approver, rollout)
    assert rollout.state == RolloutState.READY


def test_it_goes_back_for_approval_when_the_fleet_changed_the_plan(site_berlin: Site, operator: Any,
                                                                  approver: Any) -> None:
    needing()
    rollout = approve(approver, requested(site_berlin, operator))
    fleet(site_berlin, 1, prefix="late")
    rollout = services.rollout_start(actor=Actor.user(operator), rollout=rollout)
    assert rollout.state == RolloutState.PENDING_APPROVAL
    assert "the plan changed since it was approved" in rollout.reason


def test_it_lets_approvals_expire(site_berlin: Site, operator: Any, approver: Any) -> None:
    needing(ttl=60)
    rollout = approve(approver, requested(site_berlin, operator))
    Approval.objects.update(expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    rollout = services.rollout_start(actor=Actor.user(operator), rollout=rollout)
    assert rollout.state == RolloutState.PENDING_APPROVAL
    assert "they expired" in rollout.reason


def test_it_requires_the_role_the_rule_names_on_every_site(site_berlin: Site, operator: Any, approver: Any,
                                                           viewer: Any) -> None:
    needing(role="Admin")
    rollout = requested(site_berlin, operator)
    for user in (approver, viewer):
        with pytest.raises(RolloutError, match="needs the Admin role on every site"):
            approve(user, rollout)
    admin = make_user("boss", groups=("Admin",))
    assert approve(admin, rollout).state == RolloutState.READY


def test_it_ends_a_rejected_rollout_without_touching_a_node(site_berlin: Site, operator: Any,
                                                            approver: Any) -> None:
    needing()
    rollout = requested(site_berlin, operator)
    rollout = services.rollout_reject(actor=Actor.user(approver), user=approver, rollout=rollout,
                                      plan_hash=rollout.plan_hash, comment="not before the audit")
    assert rollout.state == RolloutState.REJECTED and "not before the audit" in rollout.reason
    assert set(rollout.nodes.values_list("state", flat=True)) == {"pending"}
    assert AuditEvent.objects.filter(action="rollout.reject").exists()
    with pytest.raises(RolloutError, match="not waiting for approval"):
        approve(approver, rollout)


def test_it_refuses_a_second_decision_by_the_same_person(site_berlin: Site, operator: Any, approver: Any) -> None:
    needing(approvals=2)
    rollout = approve(approver, requested(site_berlin, operator))
    with pytest.raises(RolloutError, match="already decided on this plan"):
        approve(approver, rollout)


def test_it_refuses_a_second_open_rollout_of_the_same_model(site_berlin: Site, operator: Any) -> None:
    rollout = requested(site_berlin, operator)
    with pytest.raises(RolloutError, match="already has an open rollout"):
        services.rollout_create(actor=ACTOR, user=operator, version=rollout.version,
                                target={"sites": [site_berlin.slug]})

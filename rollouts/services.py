"""Writes of rollouts that people make: create, change, approve, reject, start, pause, resume, promote, abort.

Each runs in one transaction, takes the acting user, raises
:class:`RolloutError` (with the HTTP status a view answers) on an illegal
transition, writes its event row and audit event, and schedules the tick
chain after commit when the rollout should move. The steps that ticks take
live in :mod:`rollouts.engine`.

Approvals bind to the plan: ``rollout_approve`` takes the plan hash the
approver reviewed and refuses if the plan has changed since; changing the
plan (``rollout_update``, or a start that finds the fleet or the policies
changed) makes a new hash, so approvals of the old plan stop counting.
Approvals also expire (the rollout policy's ``approval_ttl_s``) and never
count when given by the requester.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime.policy.rollout import RolloutPolicy, Strategy, approval_requirement
from models_registry.models import ModelVersion, VersionStatus
from policies import services as policy_services
from policies.models import Decision
from policies.selectors import approvals_valid, placement_policy_current, rollout_policy_current
from rollouts import engine
from rollouts.models import (
    OPEN_STATES,
    TERMINAL_STATES,
    NodeState,
    PauseKind,
    Rollout,
    RolloutKind,
    RolloutNode,
    RolloutState,
    WavePhase,
)
from rollouts.planning import Plan, PlanningError, plan_build, strategy_clean, target_clean
from rollouts.selectors import approval_role_held

SUBJECT = "rollout"


class RolloutError(Exception):
    status = 409

    def __init__(self, message: str, *, field: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if status is not None:
            self.status = status


def _plan(version: ModelVersion, target: Mapping[str, Any], strategy: Strategy) -> tuple[Plan, RolloutPolicy]:
    rollout_version, rollout_policy = rollout_policy_current()
    plan = plan_build(version=version, target=target, strategy=strategy, placement=placement_policy_current(),
                      rollout_policy_version=rollout_version)
    if not plan.nodes:
        reasons = sorted({e["reason"] for e in plan.excluded})
        detail = f": {len(plan.excluded)} excluded ({'; '.join(reasons[:3])})" if plan.excluded else ""
        raise RolloutError(f"target: no node of the target can run {version}{detail}", field="target", status=422)
    return plan, rollout_policy


def _apply_plan(rollout: Rollout, plan: Plan, policy: RolloutPolicy) -> None:
    """Store ``plan`` on a rollout that has not started, with its node rows and approval requirement."""
    document = plan.document
    requirement = approval_requirement(
        policy, regions={s.region.slug for s in plan.sites}, site_clearances={s.clearance for s in plan.sites},
        classification=rollout.version.model.classification)
    rollout.plan = document
    rollout.plan_hash = plan.hash
    rollout.strategy = document["strategy"]
    rollout.target = document["target"]
    rollout.placement_policy_version = document["placement_policy_version"]
    rollout.rollout_policy_version = document["rollout_policy_version"]
    rollout.approvals_required = requirement.approvals
    rollout.approval_role = requirement.role if requirement.needed else ""
    rollout.approval_rules = list(requirement.rules)
    rollout.save()
    rollout.sites.set(plan.sites)
    rollout.nodes.all().delete()
    RolloutNode.objects.bulk_create([
        RolloutNode(rollout=rollout, node=plan.nodes[node_id], wave=wave, position=position)
        for wave, members in enumerate(document["waves"]) for position, node_id in enumerate(members)],
        batch_size=2000)


def rollout_create(*, actor: Actor, user: Any, version: ModelVersion, target: Mapping[str, Any],
                   strategy: Mapping[str, Any] | None = None, kind: str = RolloutKind.ROLLOUT) -> Rollout:
    """Plan a rollout of ``version`` to ``target``; it waits for approval or is ready to start."""
    if version.status != VersionStatus.VALID:
        raise RolloutError(f"version: {version} is {version.status}; only a valid version can be rolled out",
                           field="version", status=422)
    try:
        cleaned_target = target_clean(target)
        cleaned_strategy = strategy_clean(rollout_policy_current()[1], strategy)
    except PlanningError as exc:
        raise RolloutError(exc.message, field=exc.field, status=422) from exc
    with transaction.atomic():
        busy = Rollout.objects.select_for_update().filter(version__model=version.model, state__in=OPEN_STATES).first()
        if busy is not None:
            raise RolloutError(f"version: model {version.model.slug} already has an open rollout "
                               f"({busy.version.version}, {busy.get_state_display().lower()}); finish or abort it "
                               "first", field="version")
        plan, policy = _plan(version, cleaned_target, cleaned_strategy)
        rollout = Rollout(version=version, requested_by=user if getattr(user, "pk", None) else None,
                          state=RolloutState.PENDING_APPROVAL, kind=kind)
        _apply_plan(rollout, plan, policy)
        state = RolloutState.PENDING_APPROVAL if rollout.approvals_required else RolloutState.READY
        rollout.state = state
        rollout.save(update_fields=["state"])
        message = ("deploy: " if kind == RolloutKind.DEPLOY else "") + (
                   f"planned {sum(len(w) for w in plan.waves)} node(s) in {len(plan.waves)} wave(s), "
                   f"{len(plan.excluded)} excluded; " + (
                       f"needs {rollout.approvals_required} approval(s) from the {rollout.approval_role} role "
                       f"(rules {', '.join(rollout.approval_rules)})" if rollout.approvals_required
                       else "no approval needed"))
        engine.record_event(rollout, kind="state", actor=actor, to_state=state, message=message,
                            data={"plan_hash": rollout.plan_hash})
        audit_record(actor=actor, action="rollout.create", obj=rollout, object_repr=str(rollout),
                     after={"kind": kind, "version": str(version), "target": rollout.target,
                            "strategy": rollout.strategy,
                            "plan_hash": rollout.plan_hash, "state": state, "nodes": len(plan.nodes),
                            "excluded": len(plan.excluded)})
    return rollout


# A deploy's strategy over the policy's defaults: one wave (up to the largest canary a strategy allows; past
# it, the rest is a second wave), baked and gated as the policy says.
DEPLOY_WAVES = {"canary_nodes": 10_000, "percentages": [100.0]}


def deploy_create(*, actor: Actor, user: Any, version: ModelVersion, sites: Sequence[Any] = (),
                  nodes: Sequence[Any] = ()) -> Rollout:
    """The model page's Deploy: a one-wave rollout of ``version`` to ``sites`` and ``nodes``.

    It is planned and approved as any rollout (the rollout policy decides whether it needs approvals) and
    starts at once when it needs none, else as soon as it has them. Its wave is judged by the policy's gate
    and rolled back if it fails; once it succeeds, its sites and nodes keep the version as deployments.
    """
    if not sites and not nodes:
        raise RolloutError("choose at least one site or node to deploy to", field="targets", status=422)
    target = {"sites": [s.slug for s in sites], "nodes": [str(n.uuid) for n in nodes]}
    with transaction.atomic():
        rollout = rollout_create(actor=actor, user=user, version=version, target=target, strategy=DEPLOY_WAVES,
                                 kind=RolloutKind.DEPLOY)
        if rollout.state == RolloutState.READY:
            rollout = rollout_start(actor=actor, rollout=rollout)
    return rollout


def _locked(rollout: Rollout) -> Rollout:
    return (Rollout.objects.select_for_update(of=("self",)).select_related("version__model", "requested_by")
            .get(pk=rollout.pk))


def _replan(rollout: Rollout, *, actor: Actor, target: Mapping[str, Any], strategy: Strategy, why: str) -> bool:
    """Plan again; if the plan changed, store it and go back to waiting for approvals. True if it changed."""
    plan, policy = _plan(rollout.version, target, strategy)
    if plan.hash == rollout.plan_hash:
        return False
    before = rollout.plan_hash
    _apply_plan(rollout, plan, policy)
    state = RolloutState.PENDING_APPROVAL if rollout.approvals_required else RolloutState.READY
    engine.transition(rollout, state, actor=actor, data={"plan_hash": rollout.plan_hash, "previous_plan": before},
                      message=f"{why}; approvals of the earlier plan no longer count" if before else why)
    return True


def rollout_update(*, actor: Actor, rollout: Rollout, target: Mapping[str, Any] | None = None,
                   strategy: Mapping[str, Any] | None = None) -> Rollout:
    """Change the target or strategy of a rollout that has not started: a new plan, to be approved again."""
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state not in (RolloutState.PENDING_APPROVAL, RolloutState.READY):
            raise RolloutError(f"a {rollout.get_state_display().lower()} rollout cannot be changed")
        try:
            cleaned_target = target_clean(rollout.target if target is None else target)
            merged = {**rollout.strategy, **(strategy or {})}
            cleaned_strategy = strategy_clean(rollout_policy_current()[1], merged)
        except PlanningError as exc:
            raise RolloutError(exc.message, field=exc.field, status=422) from exc
        if not _replan(rollout, actor=actor, target=cleaned_target, strategy=cleaned_strategy,
                       why="the plan was changed"):
            raise RolloutError("the change leaves the plan as it was", status=422)
    return rollout


def _decision_checks(rollout: Rollout, user: Any, plan_hash: str) -> None:
    if rollout.state != RolloutState.PENDING_APPROVAL:
        raise RolloutError(f"this rollout is {rollout.get_state_display().lower()}, not waiting for approval")
    if rollout.requested_by_id is not None and rollout.requested_by_id == getattr(user, "pk", None):
        raise RolloutError("you requested this rollout; someone else must approve it", status=403)
    if plan_hash != rollout.plan_hash:
        raise RolloutError("the plan changed since you reviewed it; review the current plan and decide again",
                           field="plan_hash")
    role = rollout.approval_role or "Approver"
    if not approval_role_held(user, role, rollout):
        raise RolloutError(f"deciding on this rollout needs the {role} role on every site it touches", status=403)


def _valid_approvals(rollout: Rollout) -> int:
    return approvals_valid(SUBJECT, rollout.uuid, rollout.plan_hash, exclude_user_id=rollout.requested_by_id).count()


def _decide(*, actor: Actor, user: Any, rollout: Rollout, plan_hash: str, decision: str, comment: str) -> None:
    """Record ``user``'s decision on the plan, once they were found allowed to make it (in the caller's lock)."""
    _decision_checks(rollout, user, plan_hash)
    ttl = dt.timedelta(seconds=rollout_policy_current()[1].approval_ttl_s)
    try:
        policy_services.approval_record(
            actor=actor, user=user, subject_type=SUBJECT, subject_uuid=rollout.uuid, plan_hash=plan_hash,
            decision=decision, role=rollout.approval_role or "Approver", ttl=ttl, comment=comment)
    except policy_services.PoliciesError as exc:
        raise RolloutError(exc.message) from exc


def rollout_approve(*, actor: Actor, user: Any, rollout: Rollout, plan_hash: str, comment: str = "") -> Rollout:
    """Approve the plan ``plan_hash`` of ``rollout``; ready once it has the approvals it needs."""
    with transaction.atomic():
        rollout = _locked(rollout)
        _decide(actor=actor, user=user, rollout=rollout, plan_hash=plan_hash, decision=Decision.APPROVE,
                comment=comment)
        count = _valid_approvals(rollout)
        engine.record_event(rollout, kind="approval", actor=actor, to_state=rollout.state,
                            message=f"approved by {user.get_username()} ({count} of {rollout.approvals_required})"
                                    + (f": {comment}" if comment else ""))
        if count >= rollout.approvals_required:
            engine.transition(rollout, RolloutState.READY, actor=actor,
                              message=f"{count} approval(s) of plan {plan_hash[:12]}; ready to start")
            if rollout.kind == RolloutKind.DEPLOY:
                # A deploy was asked to happen now: it starts once it may.
                rollout = rollout_start(actor=actor, rollout=rollout)
    return rollout


def rollout_reject(*, actor: Actor, user: Any, rollout: Rollout, plan_hash: str, comment: str = "") -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout)
        _decide(actor=actor, user=user, rollout=rollout, plan_hash=plan_hash, decision=Decision.REJECT,
                comment=comment)
        engine.transition(rollout, RolloutState.REJECTED, actor=actor,
                          message=f"rejected by {user.get_username()}" + (f": {comment}" if comment else ""))
    return rollout


def rollout_start(*, actor: Actor, rollout: Rollout) -> Rollout:
    """Start a ready rollout. The plan is made again first: if the fleet or a policy changed it, the
    rollout goes back to waiting for approval instead; expired approvals send it back too."""
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state != RolloutState.READY:
            raise RolloutError(f"only a ready rollout can start; this one is {rollout.get_state_display().lower()}")
        try:
            strategy = strategy_clean(RolloutPolicy(), rollout.strategy)
        except PlanningError as exc:
            raise RolloutError(exc.message, field=exc.field, status=422) from exc
        if _replan(rollout, actor=actor, target=rollout.target, strategy=strategy,
                   why="the plan changed since it was approved (nodes, placement or policies)"):
            if rollout.state == RolloutState.PENDING_APPROVAL:
                return rollout
        elif rollout.approvals_required and _valid_approvals(rollout) < rollout.approvals_required:
            engine.transition(rollout, RolloutState.PENDING_APPROVAL, actor=actor,
                              message=f"only {_valid_approvals(rollout)} of {rollout.approvals_required} approvals "
                                      "are still valid (they expired); approve again")
            return rollout
        rollout.started_at = timezone.now()
        rollout.current_wave = 0
        rollout.wave_phase = WavePhase.STARTING
        engine.transition(rollout, RolloutState.PROGRESSING, actor=actor, message="started",
                          fields=["started_at", "current_wave", "wave_phase"])
        engine.schedule(rollout, delay=0)
    return rollout


def rollout_pause(*, actor: Actor, rollout: Rollout, reason: str = "") -> Rollout:
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state != RolloutState.PROGRESSING:
            raise RolloutError(f"only a progressing rollout can be paused; this one is "
                               f"{rollout.get_state_display().lower()}")
        engine.pause(rollout, PauseKind.OPERATOR, actor=actor,
                     reason=f"paused by {actor.label}" + (f": {reason}" if reason else ""))
        engine.unschedule(rollout)
    return rollout


def rollout_resume(*, actor: Actor, rollout: Rollout) -> Rollout:
    """Continue a paused rollout. After an inconclusive gate the wave bakes again and is judged again
    (on everything since its switch); after a pause for offline nodes, the ones still offline are skipped."""
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state != RolloutState.PAUSED:
            raise RolloutError(f"only a paused rollout can be resumed; this one is "
                               f"{rollout.get_state_display().lower()}")
        now = timezone.now()
        if rollout.pause_kind == PauseKind.NODE_OFFLINE:
            engine.skip_offline(rollout, now=now, actor=actor, why=f"still offline when {actor.label} resumed; skipped")
        if rollout.wave_phase == WavePhase.BAKING:
            rollout.bake_started_at = now
        rollout.pause_kind = PauseKind.NONE
        engine.transition(rollout, RolloutState.PROGRESSING, actor=actor, message=f"resumed by {actor.label}",
                          fields=["bake_started_at", "pause_kind"])
        engine.schedule(rollout, delay=0)
    return rollout


def rollout_promote(*, actor: Actor, rollout: Rollout) -> Rollout:
    """Promote the current wave now, without waiting for the bake or the gate (an operator's call)."""
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state not in (RolloutState.PROGRESSING, RolloutState.PAUSED):
            raise RolloutError(f"a {rollout.get_state_display().lower()} rollout has no wave to promote")
        if rollout.wave_phase == WavePhase.STARTING:
            raise RolloutError(f"wave {rollout.current_wave} has not started yet; there is nothing to promote")
        engine.promote_wave(rollout, actor=actor, data=rollout.last_gate,
                            message=f"wave {rollout.current_wave} promoted now by {actor.label}")
        if rollout.state == RolloutState.PROGRESSING:
            engine.schedule(rollout, delay=0)
    return rollout


def rollout_abort(*, actor: Actor, rollout: Rollout, reason: str = "") -> Rollout:
    """Stop a rollout in any phase; every node it touched goes back to its previous version."""
    why = f"aborted by {actor.label}" + (f": {reason}" if reason else "")
    with transaction.atomic():
        rollout = _locked(rollout)
        if rollout.state in TERMINAL_STATES:
            raise RolloutError(f"this rollout already ended ({rollout.get_state_display().lower()})")
        if rollout.state in (RolloutState.PENDING_APPROVAL, RolloutState.READY):
            engine.transition(rollout, RolloutState.ABORTED, actor=actor, message=why)
        elif rollout.state == RolloutState.ROLLING_BACK:
            rollout.end_state = RolloutState.ABORTED
            rollout.save(update_fields=["end_state"])
            engine.record_event(rollout, kind="state", actor=actor, from_state=rollout.state,
                                to_state=rollout.state, message=f"{why}; the rollback carries on and ends aborted")
            audit_record(actor=actor, action="rollout.abort", obj=rollout, object_repr=str(rollout),
                         after={"state": rollout.state, "end_state": RolloutState.ABORTED})
        else:
            engine.rollback_start(rollout, end=RolloutState.ABORTED, reason=why, actor=actor)
            if rollout.state == RolloutState.ROLLING_BACK:
                engine.schedule(rollout, delay=0)
            else:
                engine.unschedule(rollout)
    return rollout


def node_rows_touched(rollout: Rollout) -> int:
    return rollout.nodes.exclude(state=NodeState.PENDING).count()

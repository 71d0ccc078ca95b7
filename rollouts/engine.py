"""The rollout state machine's steps: one tick at a time, each in one transaction.

:func:`rollout_advance` is what the Celery task runs. It locks the rollout
row (``SELECT ... FOR UPDATE SKIP LOCKED``: a second run at the same moment
finds it locked and exits), checks that it belongs to the rollout's current
tick chain, does the one step the stored state calls for, and schedules the
next tick after commit. Everything a step changes (node rows, desired
states, events, audit) commits together or not at all, so a worker killed at
any point leaves the state of the last finished tick, and running a tick
twice finds nothing left to do.

The tick chain: every scheduled tick carries ``Rollout.tick``; scheduling a
new tick replaces it, so an older or duplicated chain exits at its next
tick. :func:`rollout_reconcile` (periodic) starts a fresh chain for any
active rollout whose next tick is overdue (its worker died with it).

Node confirmation (:mod:`rollouts.reports`): a node counts as having done
what it was told only when it reports a generation at least the one that
carried the change and its model status says so.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from celery import signature
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime.policy.rollout import GateResult, GateSpec, Strategy, evaluate_gate, window_sum
from policies.selectors import placement_policy_pinned
from rollouts.health import health_record, model_health
from rollouts.models import (
    ACTIVE_STATES,
    NodeState,
    PauseKind,
    Rollout,
    RolloutEvent,
    RolloutNode,
    RolloutState,
    WavePhase,
)
from rollouts.outcomes import rollout_outcome
from rollouts.reports import desired_versions, placements_new, publish_row, publish_rows, reports_new, reports_previous
from rollouts.selectors import by_bundle, offline_share, unreachable
from sites.models import Node

SYSTEM = Actor.system("rollouts")
# The tick task (rollouts.tasks.rollout_advance_task); its name predates the rollouts app and stays.
ADVANCE_TASK = "orchestrator.rollout_advance"


# -- bookkeeping ---------------------------------------------------------------


def record_event(rollout: Rollout, *, kind: str, actor: Actor, message: str = "", from_state: str = "",
                 to_state: str = "", node: Node | None = None, wave: int | None = None,
                 data: dict[str, Any] | None = None) -> RolloutEvent:
    return RolloutEvent.objects.create(rollout=rollout, node=node, kind=kind, from_state=from_state,
                                       to_state=to_state, wave=wave, message=message[:4000], data=data,
                                       actor=f"{actor.type}:{actor.label}"[:160])


def transition(rollout: Rollout, to: str, *, actor: Actor, message: str = "", data: dict[str, Any] | None = None,
               fields: Iterable[str] = ()) -> None:
    """Move ``rollout`` to state ``to`` (saving ``fields`` too): event row and audit event."""
    before = rollout.state
    rollout.state = to
    if to in (RolloutState.SUCCEEDED, RolloutState.FAILED, RolloutState.ABORTED, RolloutState.REJECTED):
        rollout.finished_at = timezone.now()
    if message:
        rollout.reason = message[:4000]
    rollout.save(update_fields=sorted({"state", "finished_at", "reason", *fields}))
    record_event(rollout, kind="state", actor=actor, message=message, from_state=before, to_state=to,
                 wave=rollout.current_wave, data=data)
    audit_record(actor=actor, action=f"rollout.{to}", obj=rollout, object_repr=str(rollout),
                 before={"state": before}, after={"state": to, "reason": message[:1000], "wave": rollout.current_wave})
    rollout_outcome(rollout, to, actor=actor, message=message)


def schedule(rollout: Rollout, *, delay: float | None = None) -> None:
    """Start a new tick chain after commit; any older chain exits at its next tick."""
    delay = settings.ROLLOUT_TICK_S if delay is None else delay
    rollout.tick = uuid.uuid4()
    rollout.next_tick_at = timezone.now() + dt.timedelta(seconds=delay)
    rollout.save(update_fields=["tick", "next_tick_at"])
    args = (rollout.pk, str(rollout.tick))
    # By the task's stable name (rollouts.tasks defines it): the tasks module imports this one.
    transaction.on_commit(lambda: signature(ADVANCE_TASK, args=args).apply_async(countdown=delay))


def unschedule(rollout: Rollout) -> None:
    rollout.tick = None
    rollout.next_tick_at = None
    rollout.save(update_fields=["tick", "next_tick_at"])


def _set_node(row: RolloutNode, to: str, *, actor: Actor, rollout: Rollout, message: str = "") -> None:
    before = row.state
    row.state = to
    if message:
        row.detail = message[:2000]
    row.save(update_fields=["state", "detail", "previous_version", "assigned_at", "generation", "updated_at"])
    record_event(rollout, kind="node", actor=actor, node=row.node, from_state=before, to_state=to, wave=row.wave,
                 message=message)


# -- steps -------------------------------------------------------------------


def switch_wave(rollout: Rollout, rows: list[RolloutNode], *, now: dt.datetime, actor: Actor = SYSTEM) -> None:
    """Give the wave's pending nodes the new version (their baseline health recorded first)."""
    model = rollout.version.model.slug
    pending = [r for r in rows if r.state == NodeState.PENDING]
    health_record([r.node for r in pending], model=model)
    previous = desired_versions([r.node for r in pending], model)
    for row in pending:
        row.previous_version = previous.get(row.node_id, "")
        row.assigned_at = now
        row.state = NodeState.UPDATING
        row.updated_at = now
    # The assignments first (publishing reads them), then every node's new desired state.
    RolloutNode.objects.bulk_update(pending, ["state", "previous_version", "assigned_at", "updated_at"],
                                    batch_size=1000)
    with placement_policy_pinned():
        publish_rows(pending, actor)
    RolloutNode.objects.bulk_update(pending, ["generation"], batch_size=1000)
    RolloutEvent.objects.bulk_create([
        RolloutEvent(rollout=rollout, node=row.node, kind="node", from_state=NodeState.PENDING,
                     to_state=NodeState.UPDATING, wave=row.wave, actor=f"{actor.type}:{actor.label}",
                     message=f"desired state generation {row.generation} names {rollout.version.version}"
                             + (f" (was {row.previous_version})" if row.previous_version else ""))
        for row in pending])
    rollout.wave_phase = WavePhase.UPDATING
    rollout.wave_started_at = now
    rollout.bake_started_at = None
    rollout.save(update_fields=["wave_phase", "wave_started_at", "bake_started_at"])
    nodes = [str(r.node.uuid) for r in pending]
    record_event(rollout, kind="wave", actor=actor, wave=rollout.current_wave, to_state=WavePhase.UPDATING,
                 message=f"{_wave_label(rollout.current_wave)} started on {len(nodes)} node(s)")
    audit_record(actor=actor, action="rollout.wave_start", obj=rollout, object_repr=str(rollout),
                 after={"wave": rollout.current_wave, "nodes": nodes, "version": rollout.version.version})


def _wave_label(index: int) -> str:
    return "the canary" if index == 0 else f"wave {index}"


def rollback_start(rollout: Rollout, *, end: str, reason: str, actor: Actor,
                   data: dict[str, Any] | None = None) -> None:
    """Put every node this rollout touched back on its previous version; the rollout ends as ``end``."""
    touched = list(rollout.nodes.select_related("node__site__region")
                   .filter(state__in=[NodeState.UPDATING, NodeState.UPDATED, NodeState.FAILED]))
    rollout.end_state = end
    rollout.pause_kind = PauseKind.NONE
    for row in touched:
        row.state = NodeState.ROLLING_BACK
        row.updated_at = timezone.now()
    RolloutNode.objects.bulk_update(touched, ["state", "updated_at"], batch_size=1000)
    with placement_policy_pinned():
        publish_rows(touched, actor)
    RolloutNode.objects.bulk_update(touched, ["generation"], batch_size=1000)
    RolloutEvent.objects.bulk_create([
        RolloutEvent(rollout=rollout, node=row.node, kind="node", to_state=NodeState.ROLLING_BACK, wave=row.wave,
                     actor=f"{actor.type}:{actor.label}",
                     message=f"back to {row.previous_version or 'no version'} (generation {row.generation})")
        for row in touched])
    if touched:
        transition(rollout, RolloutState.ROLLING_BACK, actor=actor, message=reason, data=data,
                   fields=["end_state", "pause_kind"])
    else:
        transition(rollout, end, actor=actor, message=reason, data=data, fields=["end_state", "pause_kind"])


def pause(rollout: Rollout, kind: str, *, reason: str, actor: Actor, data: dict[str, Any] | None = None) -> None:
    rollout.pause_kind = kind
    transition(rollout, RolloutState.PAUSED, actor=actor, message=reason, data=data, fields=["pause_kind"])


def promote_wave(rollout: Rollout, *, actor: Actor, message: str, data: dict[str, Any] | None = None) -> None:
    record_event(rollout, kind="wave", actor=actor, wave=rollout.current_wave, to_state="promoted",
                 message=message, data=data)
    audit_record(actor=actor, action="rollout.wave_promote", obj=rollout, object_repr=str(rollout),
                 after={"wave": rollout.current_wave, "message": message[:1000]})
    rollout.pause_kind = PauseKind.NONE
    if rollout.current_wave + 1 >= len(rollout.waves):
        transition(rollout, RolloutState.SUCCEEDED, actor=actor,
                   message=f"every wave promoted; {rollout.version} is the target's version",
                   fields=["pause_kind"])
        return
    rollout.current_wave += 1
    rollout.wave_phase = WavePhase.STARTING
    rollout.wave_started_at = None
    rollout.bake_started_at = None
    rollout.save(update_fields=["current_wave", "wave_phase", "wave_started_at", "bake_started_at", "pause_kind"])
    if rollout.state != RolloutState.PROGRESSING:
        transition(rollout, RolloutState.PROGRESSING, actor=actor, message=message)


def judge(rollout: Rollout, rows: list[RolloutNode], gate: GateSpec, *, now: dt.datetime) -> GateResult:
    """The gate on the wave's updated nodes: the new version since the switch against their previous versions."""
    model, version = rollout.version.model.slug, rollout.version.version
    nodes = [r.node for r in rows]
    health_record(nodes, model=model)
    new = model_health(nodes, model, version, since=rollout.wave_started_at, until=now)
    by_previous: dict[str, list[Node]] = {}
    for row in rows:
        if row.previous_version and row.previous_version != version:
            by_previous.setdefault(row.previous_version, []).append(row.node)
    previous = window_sum(model_health(group, model, prev, until=rollout.wave_started_at)
                          for prev, group in by_previous.items())
    return evaluate_gate(gate, new=new, previous=previous, has_previous=bool(by_previous),
                         placements=placements_new(rows, model, version))


def _confirm(rollout: Rollout, rows: list[RolloutNode], actor: Actor) -> list[RolloutNode]:
    """Move nodes whose report confirms their change; returns the nodes that reported the new version failed."""
    model, version = rollout.version.model.slug, rollout.version.version
    failed = []
    for row in rows:
        if row.state == NodeState.UPDATING:
            outcome, error = reports_new(row.node, row, model, version)
            if outcome == "serving":
                _set_node(row, NodeState.UPDATED, actor=actor, rollout=rollout, message=f"serves {version}")
            elif outcome == "failed":
                _set_node(row, NodeState.FAILED, actor=actor, rollout=rollout, message=error)
                failed.append(row)
        elif row.state == NodeState.ROLLING_BACK and reports_previous(row.node, row, model, version):
            _set_node(row, NodeState.ROLLED_BACK, actor=actor, rollout=rollout,
                      message=f"serves {row.previous_version}" if row.previous_version else "model removed")
    return failed


CARRIED = "air-gapped: the version goes in the site's next bundle in"


def progress(rollout: Rollout, *, now: dt.datetime, actor: Actor = SYSTEM) -> None:
    """One tick of a progressing rollout: confirm reports, then start, wait on or judge the current wave."""
    strategy = Strategy.model_validate(rollout.strategy)
    # Only the rows this tick can change are loaded: nodes waiting to confirm, and the current wave.
    waiting_rows = list(rollout.nodes.select_related("node__site__region").filter(state=NodeState.UPDATING))
    failed = _confirm(rollout, waiting_rows, actor)
    if failed:
        names = ", ".join(f"{r.node.site.slug}/{r.node.name}: {r.detail}" for r in failed)
        rollback_start(rollout, end=RolloutState.FAILED, actor=actor,
                       reason=f"the new version failed on {len(failed)} node(s) ({names})")
        return
    away, live = offline_share(rollout, now)
    if live and away / live >= strategy.max_offline_fraction:
        pause(rollout, PauseKind.FLEET_OFFLINE, actor=actor,
              reason=f"{away} of {live} target nodes are offline at once "
                     f"(pausing at {strategy.max_offline_fraction:.0%}); resumes when they are back")
        return
    wave = list(rollout.nodes.select_related("node__site__region").filter(wave=rollout.current_wave))
    if rollout.wave_phase == WavePhase.STARTING:
        switch_wave(rollout, wave, now=now, actor=actor)
        return
    if rollout.wave_phase == WavePhase.UPDATING:
        _updating(rollout, wave, strategy, now=now, actor=actor)
    else:
        _baking(rollout, wave, strategy, now=now, actor=actor)


def _updating(rollout: Rollout, wave: list[RolloutNode], strategy: Strategy, *, now: dt.datetime,
              actor: Actor) -> None:
    """Wait for the wave's nodes to serve the version; the late fail it, the offline are skipped or pause it."""
    started = rollout.wave_started_at or now
    overdue = (now - started).total_seconds() >= strategy.offline_timeout_s
    waiting = [r for r in wave if r.state == NodeState.UPDATING]
    if overdue:
        # Reached by bundle only: they keep the version, which the next bundle in carries, and are confirmed
        # (or roll the rollout back) whenever a bundle out reports them; the wave does not wait for them.
        for row in (r for r in waiting if by_bundle(r.node) and not r.detail.startswith(CARRIED)):
            row.detail = f"{CARRIED}; confirmed when a bundle out of {row.node.site.slug} reports it"
            row.save(update_fields=["detail", "updated_at"])
        waiting = [r for r in waiting if not by_bundle(r.node)]
        late = [r for r in waiting if not unreachable(r.node, now)]
        if late:
            names = ", ".join(f"{r.node.site.slug}/{r.node.name}" for r in late)
            rollback_start(rollout, end=RolloutState.FAILED, actor=actor,
                           reason=f"{names} did not report {rollout.version.version} serving within "
                                  f"{strategy.offline_timeout_s:g}s")
            return
        if waiting and strategy.on_offline == "pause":
            names = ", ".join(f"{r.node.site.slug}/{r.node.name}" for r in waiting)
            pause(rollout, PauseKind.NODE_OFFLINE, actor=actor,
                  reason=f"{names} offline for more than {strategy.offline_timeout_s:g}s (policy: pause)")
            return
        for row in waiting:
            _skip(rollout, row, actor=actor,
                  message=f"offline for more than {strategy.offline_timeout_s:g}s; skipped")
        waiting = []
    if waiting:
        return
    rollout.wave_phase = WavePhase.BAKING
    rollout.bake_started_at = now
    rollout.save(update_fields=["wave_phase", "bake_started_at"])
    record_event(rollout, kind="wave", actor=actor, wave=rollout.current_wave, to_state=WavePhase.BAKING,
                 message=f"{_wave_label(rollout.current_wave)}: every reachable node serves "
                         f"{rollout.version.version}; baking {strategy.bake_s:g}s")
    return


def _baking(rollout: Rollout, wave: list[RolloutNode], strategy: Strategy, *, now: dt.datetime,
            actor: Actor) -> None:
    """Judge the baking wave: a failed gate rolls back at once; at the end a pass promotes, else it pauses."""
    # The gate may fail at any moment on enough data; it passes only when the bake is over.
    updated = [r for r in wave if r.state == NodeState.UPDATED]
    result: GateResult | None = None
    if strategy.gate is not None:
        result = judge(rollout, updated, strategy.gate, now=now)
        rollout.last_gate = {"wave": rollout.current_wave, "at": now.isoformat(), **result.as_dict()}
        rollout.save(update_fields=["last_gate"])
        if result.outcome == "failed":
            rollback_start(rollout, end=RolloutState.FAILED, actor=actor, data=rollout.last_gate,
                           reason=f"{_wave_label(rollout.current_wave)} failed its health gate: {result.reason}")
            return
    baked = rollout.bake_started_at is None or \
        (now - rollout.bake_started_at).total_seconds() >= strategy.bake_s
    if not baked:
        return
    if result is not None and result.outcome != "passed":
        pause(rollout, PauseKind.GATE, actor=actor, data=rollout.last_gate,
              reason=f"{_wave_label(rollout.current_wave)}: health gate inconclusive ({result.reason}); "
                     "not promoted")
        return
    promote_wave(rollout, actor=actor, data=rollout.last_gate,
                 message=f"{_wave_label(rollout.current_wave)} promoted after {strategy.bake_s:g}s"
                         + (" (gate passed)" if result is not None else " (no gate)"))


def roll_back(rollout: Rollout, *, now: dt.datetime, actor: Actor = SYSTEM) -> None:
    rows = list(rollout.nodes.select_related("node__site__region")
                .filter(state=NodeState.ROLLING_BACK))
    _confirm(rollout, rows, actor)
    remaining = [r for r in rows if r.state == NodeState.ROLLING_BACK]
    if any(not unreachable(r.node, now) for r in remaining):
        return
    message = rollout.reason
    if remaining:
        message += (f"; {len(remaining)} offline node(s) have their previous version as desired state and go "
                    "back to it when they reconnect")
    transition(rollout, rollout.end_state or RolloutState.FAILED, actor=actor, message=message)


def resume_if_back(rollout: Rollout, *, now: dt.datetime, actor: Actor = SYSTEM) -> None:
    strategy = Strategy.model_validate(rollout.strategy)
    away, live = offline_share(rollout, now)
    if live and away / live < strategy.max_offline_fraction:
        rollout.pause_kind = PauseKind.NONE
        if rollout.wave_phase == WavePhase.BAKING:
            rollout.bake_started_at = now  # the bake runs its full time again with the nodes back
        transition(rollout, RolloutState.PROGRESSING, actor=actor,
                   message=f"{live - away} of {live} target nodes are back; resumed",
                   fields=["pause_kind", "bake_started_at"])


def skip_offline(rollout: Rollout, *, now: dt.datetime, actor: Actor, why: str) -> int:
    """Skip the current wave's nodes that are still waiting and unreachable; how many."""
    waiting = [r for r in rollout.nodes.select_related("node__site__region")
               .filter(wave=rollout.current_wave, state=NodeState.UPDATING) if unreachable(r.node, now)]
    for row in waiting:
        _skip(rollout, row, actor=actor, message=why)
    return len(waiting)


def _skip(rollout: Rollout, row: RolloutNode, *, actor: Actor, message: str) -> None:
    # Skipped: the rollout's version is taken off it again, so when it comes back it serves what it
    # had; the rollout's report lists it.
    row.assigned_at = None
    _set_node(row, NodeState.SKIPPED, actor=actor, rollout=rollout, message=message)
    publish_row(row, actor)
    row.save(update_fields=["generation"])


def rollout_advance(*, rollout_id: int, tick: str | None = None, now: dt.datetime | None = None) -> Rollout | None:
    """One tick of one rollout. Safe to run twice and concurrently: see the module docstring.

    ``tick`` None (a direct call) runs whatever chain is current and starts a new one.
    """
    now = now or timezone.now()
    with transaction.atomic():
        rollout = (Rollout.objects.select_for_update(skip_locked=True, of=("self",))
                   .select_related("version__model").filter(pk=rollout_id).first())
        if rollout is None:
            return None  # gone, or another run holds it (and will schedule the next tick)
        if tick is not None and str(rollout.tick) != tick:
            return None  # a stale or duplicated chain
        if rollout.state == RolloutState.PROGRESSING:
            progress(rollout, now=now)
        elif rollout.state == RolloutState.ROLLING_BACK:
            roll_back(rollout, now=now)
        elif rollout.state == RolloutState.PAUSED and rollout.pause_kind == PauseKind.FLEET_OFFLINE:
            resume_if_back(rollout, now=now)
        elif rollout.terminal:
            _confirm(rollout, list(rollout.nodes.select_related("node__site__region").filter(
                state__in=[NodeState.UPDATING, NodeState.ROLLING_BACK])), SYSTEM)
        keep_ticking = rollout.state in (RolloutState.PROGRESSING, RolloutState.ROLLING_BACK) or (
            rollout.state == RolloutState.PAUSED and rollout.pause_kind == PauseKind.FLEET_OFFLINE)
        if keep_ticking:
            schedule(rollout)
        elif rollout.tick is not None:
            unschedule(rollout)
    return rollout


def rollout_reconcile(*, now: dt.datetime | None = None) -> int:
    """Restart the tick chain of every active rollout whose next tick is overdue; confirm nodes of
    finished rollouts that were still on their way. Safe to run twice. Returns how many it touched."""
    now = now or timezone.now()
    overdue = now - dt.timedelta(seconds=settings.ROLLOUT_STALL_AFTER_S)
    touched = 0
    candidates = Rollout.objects.filter(state__in=ACTIVE_STATES).exclude(
        state=RolloutState.PAUSED, pause_kind__in=[PauseKind.OPERATOR, PauseKind.GATE, PauseKind.NODE_OFFLINE])
    stalled = candidates.filter(Q(next_tick_at__lt=overdue) | Q(next_tick_at__isnull=True))
    for rollout_id in stalled.values_list("pk", flat=True):
        with transaction.atomic():
            rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
            if rollout is None or (rollout.next_tick_at is not None and rollout.next_tick_at >= overdue):
                continue
            record_event(rollout, kind="reconcile", actor=Actor.system("rollout-reconciler"),
                         message="its next tick was overdue (worker lost?); ticking again")
            schedule(rollout, delay=0)
            touched += 1
    lingering = Rollout.objects.filter(state__in=[RolloutState.SUCCEEDED, RolloutState.FAILED,
                                                  RolloutState.ABORTED],
                                       nodes__state__in=[NodeState.UPDATING, NodeState.ROLLING_BACK]).distinct()
    for rollout_id in lingering.values_list("pk", flat=True):
        rollout_advance(rollout_id=rollout_id, now=now)
        touched += 1
    return touched

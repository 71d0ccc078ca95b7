"""Celery tasks of rollouts: thin, idempotent, carrying ids only; their names are stable identifiers."""

from __future__ import annotations

from celery import shared_task

from rollouts import engine


@shared_task(name=engine.ADVANCE_TASK, ignore_result=True)
def rollout_advance_task(rollout_id: int, tick: str) -> None:
    # Safe to deliver twice: a tick that is not the rollout's current one exits, and the
    # row lock lets only one run at a time do the step.
    engine.rollout_advance(rollout_id=rollout_id, tick=tick)


@shared_task(name="orchestrator.rollout_reconcile", ignore_result=True)
def rollout_reconcile_task() -> int:
    return engine.rollout_reconcile()

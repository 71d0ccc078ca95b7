from __future__ import annotations

from celery import shared_task

from sites import services
from sites.telemetry.services import telemetry_prune


@shared_task(name="sites.node_liveness_sweep", ignore_result=True)
def node_liveness_sweep_task() -> int:
    return services.node_liveness_sweep()


@shared_task(name="sites.telemetry_prune", ignore_result=True)
def telemetry_prune_task() -> int:
    return telemetry_prune()

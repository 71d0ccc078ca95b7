from __future__ import annotations

from celery import shared_task

from models_registry import services


@shared_task(name=services.VALIDATE_TASK, ignore_result=True)
def model_version_validate_task(version_id: int) -> None:
    # Safe to deliver twice: the service claims the version with a conditional update.
    services.model_version_validate(version_id=version_id)


@shared_task(name="models_registry.model_version_reconcile", ignore_result=True)
def model_version_reconcile_task() -> int:
    return services.model_version_reconcile()

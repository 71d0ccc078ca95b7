from __future__ import annotations

from celery import shared_task

from audit.checkpoints import checkpoint_take
from audit.services import CHECKPOINT_TASK


@shared_task(name=CHECKPOINT_TASK, ignore_result=True)
def checkpoint_take_task() -> int | None:
    """Sequence the pending audit events and sign a checkpoint; its size, or None if the log did not grow."""
    checkpoint = checkpoint_take()
    return checkpoint.size if checkpoint is not None else None

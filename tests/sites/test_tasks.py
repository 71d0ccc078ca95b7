"""The liveness sweep as Celery runs it: a real worker on the real Redis broker."""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from sites import services
from sites.models import Node, Site
from sites.sync import node_sync
from sites.tasks import node_liveness_sweep_task
from tests.fixtures.processes import wait_until
from tests.fixtures.workers import Worker


def test_it_is_scheduled_by_beat() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["node-liveness-sweep"]
    assert entry["task"] == node_liveness_sweep_task.name == "sites.node_liveness_sweep"


@pytest.mark.process
def test_it_marks_a_silent_node_offline_in_a_real_worker(celery_worker_process: Worker, site_berlin: Site) -> None:
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    node, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name="quiet"), ip=None)
    node_sync(node=node, request=protocol.SyncRequest(), ip=None)
    # The node last synced long ago, as if it had been switched off.
    Node.objects.filter(pk=node.pk).update(last_seen_at=timezone.now() - dt.timedelta(hours=1))

    node_liveness_sweep_task.apply_async(queue=celery_worker_process.queue)
    wait_until(lambda: Node.objects.get(pk=node.pk).status == "offline", timeout=30,
               what=f"the worker to sweep the node (worker log: {celery_worker_process.log})")
    event = AuditEvent.objects.get(action="node.status", object_id=str(node.uuid))
    assert event.actor == "liveness" and event.after == {"status": "offline"}

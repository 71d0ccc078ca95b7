"""Quiet syncs: an unchanged sync answered from Redis without PostgreSQL, and what takes the whole path again.

Real PostgreSQL and Redis. The snapshot a full sync leaves is written after its commit, so every sync here runs
with the commit callbacks executed (:func:`post_sync`), as they are in a served request.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys, quiet, rotation
from orchestrator.desired_state import desired_state_publish
from sites import services
from sites.heartbeats import heartbeats_flush
from sites.liveness import node_status
from sites.models import Node, NodeStatus, Site

pytestmark = pytest.mark.django_db

Capture = Callable[..., Any]
HARDWARE = {"cpu_cores": 4, "memory_mb": 8192, "execution_providers": ["CPUExecutionProvider"]}


class SimNode:
    """One enrolled node that syncs over HTTP as the edge runtime does."""

    def __init__(self, client: Client, capture: Capture, site: Site, name: str = "gw-1") -> None:
        self.client, self.capture = client, capture
        _, token = services.token_create(actor=Actor.system("test"), site=site)
        body = {"token": token, "name": name, "role": "gateway", "runtime_version": "0.1.0", "hardware": HARDWARE}
        answer = client.post("/agent/v1/enroll", json.dumps(body), content_type="application/json").json()
        self.node_id, self.credential = answer["node_id"], answer["credential"]
        self.generation, self.epoch = 0, ""
        self.hardware = dict(HARDWARE)

    @property
    def node(self) -> Node:
        return Node.objects.get(uuid=self.node_id)

    def full(self, **health: Any) -> dict[str, Any]:
        return {"runtime_version": "0.1.0", "hardware": self.hardware,
                "actual": {"applied_generation": self.generation, "applied_epoch": self.epoch},
                "health": {"status": "ok", "uptime_s": 1.0, **health}}

    def digest(self) -> str:
        return protocol.report_digest(protocol.SyncRequest.model_validate(self.full()))

    def brief(self, digest: str | None = None, **health: Any) -> dict[str, Any]:
        return {"brief": True, "digest": digest or self.digest(),
                "actual": {"applied_generation": self.generation, "applied_epoch": self.epoch},
                "health": {"status": "ok", "uptime_s": 2.0, **health}}

    def post(self, body: dict[str, Any], credential: str | None = None) -> Any:
        with self.capture(execute=True):
            return self.client.post(f"/agent/v1/nodes/{self.node_id}/sync", json.dumps(body),
                                    content_type="application/json",
                                    headers={"Authorization": f"Bearer {credential or self.credential}"})

    def sync(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.post(body or self.full())
        assert response.status_code == 200, response.content
        answer = response.json()
        if answer.get("desired"):
            state = signing.verify_desired_state(protocol.SignedDesiredState.model_validate(answer["desired"]),
                                                 signing.public_key_from_b64(keys.public_key_b64()))
            self.generation, self.epoch = state.generation, state.epoch
        return answer

    def settle(self) -> None:
        """First sync (desired state), the sync reporting it applied: the snapshot is then taken."""
        first = self.sync()
        # An answer that carries a state to apply names no digest: no brief sync could be answered yet.
        assert first["desired"] is not None and first["report_digest"] is None
        answer = self.sync()
        assert answer["desired"] is None and answer["report_digest"] == self.digest()


@pytest.fixture
def node(client: Client, django_capture_on_commit_callbacks: Capture, site_berlin: Site) -> SimNode:
    sim = SimNode(client, django_capture_on_commit_callbacks, site_berlin)
    sim.settle()
    return sim


def queries_during(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        result = fn()
    return result, [q["sql"] for q in captured.captured_queries]


def test_an_unchanged_sync_does_not_touch_postgresql_in_either_form(node: SimNode) -> None:
    seen_before = node.node.last_seen_at
    for body in (node.full(), node.brief()):
        answer, statements = queries_during(lambda b=body: node.sync(b))
        assert statements == [], f"a quiet sync ran SQL: {statements}"
        assert answer["generation"] == node.generation and answer["desired"] is None
        assert answer["report_digest"] == node.digest() and answer["report_wanted"] is False
    # Heard, but only Redis knows until the flush.
    assert node.node.last_seen_at == seen_before


def test_the_flush_writes_when_the_heartbeat_arrived_and_the_health_it_carried(node: SimNode) -> None:
    heartbeats_flush()
    before = time.time()
    node.sync(node.brief(status="degraded", message="disk: 91% full"))
    after = time.time()
    time.sleep(0.05)
    taken, statements = queries_during(heartbeats_flush)
    assert taken == 1
    assert sum(s.lstrip().upper().startswith("UPDATE") for s in statements) == 1  # one statement per batch
    stored = node.node
    assert before <= stored.last_seen_at.timestamp() <= after  # arrival, not flush time
    assert stored.health["status"] == "degraded" and stored.health["message"] == "disk: 91% full"
    assert heartbeats_flush() == 0  # taken once


def test_a_changed_report_takes_the_whole_path_and_is_audited(node: SimNode) -> None:
    node.hardware = {**HARDWARE, "memory_mb": 16384}
    events = AuditEvent.objects.filter(action="node.report", object_id=node.node_id)
    count = events.count()
    answer = node.sync()
    report = events.order_by("-pk").first()
    assert events.count() == count + 1 and report is not None
    assert report.before["hardware"]["memory_mb"] == 8192 and report.after["hardware"]["memory_mb"] == 16384
    assert node.node.hardware["memory_mb"] == 16384
    # The new report's digest is held now: the next one is quiet again.
    assert answer["report_digest"] == node.digest()
    _, statements = queries_during(lambda: node.sync(node.brief()))
    assert statements == []


def test_a_brief_sync_of_a_report_not_held_is_answered_report_wanted_and_records_nothing(node: SimNode) -> None:
    heartbeats_flush()
    stale = "0" * 64
    answer = node.sync(node.brief(digest=stale))
    assert answer["report_wanted"] is True and answer["desired"] is None
    assert heartbeats_flush() == 0  # no heartbeat taken from it
    # A brief sync claiming a generation it was not answered with is not quiet either.
    node.generation += 1
    assert node.sync(node.brief())["report_wanted"] is True


def test_a_published_desired_state_retires_the_snapshot(node: SimNode) -> None:
    with node.capture(execute=True):
        services.site_update(actor=Actor.system("test"), site=node.node.site, labels={"line": "2"})
    answer = node.sync(node.brief())
    assert answer["report_wanted"] is True  # the brief sync is not answered from the old snapshot
    answer = node.sync()
    assert answer["desired"] is not None and node.generation == answer["generation"]
    # Reporting the new state applied takes the snapshot again: the next sync is quiet.
    assert node.sync()["report_digest"] == node.digest()
    assert node.sync(node.brief())["report_wanted"] is False


def test_a_change_committed_while_a_full_sync_runs_is_not_covered_by_its_snapshot(node: SimNode) -> None:
    snapshot = quiet.Snapshot(credential_hash=node.node.credential_hash, digest=node.digest(),
                              generation=node.generation, epoch=node.epoch)
    begun = quiet.begin(node.node_id)
    assert begun is not None
    with node.capture(execute=True):
        desired_state_publish(node=node.node, actor=Actor.system("test"), above=node.generation + 5)
    assert quiet.remember(node_uuid=node.node_id, begun=begun, snapshot=snapshot, heard_at=time.time()) is False
    assert node.sync(node.brief())["report_wanted"] is True


def test_a_revoked_node_is_refused_at_its_next_sync(node: SimNode) -> None:
    with node.capture(execute=True):
        services.node_revoke(actor=Actor.system("test"), node=node.node)
    for body in (node.brief(), node.full()):
        response = node.post(body)
        assert response.status_code == 403 and "revoked" in response.json()["error"]


def test_a_revocation_redis_never_heard_of_stops_quiet_answers_at_the_next_flush(node: SimNode) -> None:
    # The fault of a revocation whose notice to Redis was lost: the row changed behind the service's back.
    Node.objects.filter(uuid=node.node_id).update(revoked_at=timezone.now(), status=NodeStatus.REVOKED)
    assert node.post(node.brief()).status_code == 200  # until the flush sees it
    heartbeats_flush()
    response = node.post(node.brief())
    assert response.status_code == 403


def test_a_wrong_credential_is_refused_not_answered_from_the_snapshot(node: SimNode) -> None:
    for body in (node.brief(), node.full(), {"brief": True}):
        response = node.post(body, credential="ewn_" + "x" * 40)
        assert response.status_code == 401, response.content


def test_a_brief_sync_that_carries_a_report_is_refused_naming_it(node: SimNode) -> None:
    response = node.post({**node.brief(), "hardware": HARDWARE})
    assert response.status_code == 400
    assert "brief sync carries no report" in response.json()["error"] and "hardware" in response.json()["error"]


def test_a_heartbeat_lost_before_the_flush_cannot_turn_an_offline_node_online(node: SimNode) -> None:
    heartbeats_flush()
    long_ago = timezone.now() - dt.timedelta(hours=1)
    Node.objects.filter(uuid=node.node_id).update(last_seen_at=long_ago)
    # The node's quiet heartbeat reaches Redis, and Redis loses it before any flush.
    quiet.client().hset(quiet.node_key(node.node_id), "t", repr(time.time()))
    node.sync(node.brief())
    quiet.client().delete(quiet.heartbeats_key())
    heartbeats_flush()
    assert node.node.last_seen_at == long_ago
    assert node_status(last_seen_at=node.node.last_seen_at, revoked=False, now=timezone.now()) == NodeStatus.OFFLINE
    with node.capture(execute=True):
        services.node_liveness_sweep()
    assert node.node.status == NodeStatus.OFFLINE
    # Stored offline, the node's next sync takes the whole path, which records its return.
    returns = AuditEvent.objects.filter(action="node.report", object_id=node.node_id)
    count = returns.count()
    assert node.sync(node.brief())["report_wanted"] is True
    node.sync()
    assert returns.count() == count + 1 and returns.order_by("-pk")[0].after["status"] == NodeStatus.ONLINE
    assert node.node.status == NodeStatus.ONLINE


def test_a_node_not_heard_for_longer_than_online_allows_takes_the_whole_path(node: SimNode,
                                                                             settings: Any) -> None:
    quiet.client().hset(quiet.node_key(node.node_id), "t", repr(time.time() - settings.NODE_STALE_AFTER_S - 1))
    assert node.sync(node.brief())["report_wanted"] is True


def test_a_new_epoch_retires_every_snapshot(node: SimNode, client: Client, site_berlin: Site) -> None:
    other = SimNode(client, node.capture, site_berlin, name="gw-2")
    other.settle()
    with node.capture(execute=True):
        rotation.epoch_start(actor=Actor.system("test"), reason="restored from a backup")
    for sim in (node, other):
        assert sim.sync(sim.brief())["report_wanted"] is True
        assert sim.sync()["desired"] is not None

"""The agent protocol over HTTP: enrollment, sync, and what is refused."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys
from sites import services
from sites.models import EnrollmentToken, Node, Site

pytestmark = pytest.mark.django_db


def enroll(client: Client, token: str, name: str = "gw-1", **extra: Any) -> Any:
    body = {"token": token, "name": name, "role": "gateway", "runtime_version": "0.1.0",
            "hardware": {"cpu_cores": 4, "memory_mb": 8192, "execution_providers": ["CPUExecutionProvider"]}}
    body.update(extra)
    return client.post("/agent/v1/enroll", json.dumps(body), content_type="application/json")


def new_token(site: Site, **kwargs: Any) -> str:
    return services.token_create(actor=Actor.system("test"), site=site, **kwargs)[1]


def sync(client: Client, node_id: str, credential: str, body: dict[str, Any] | None = None) -> Any:
    return client.post(f"/agent/v1/nodes/{node_id}/sync", json.dumps(body or {}), content_type="application/json",
                       headers={"Authorization": f"Bearer {credential}"})


def test_it_enrolls_a_node_and_pins_the_signing_key(client: Client, site_berlin: Site) -> None:
    response = enroll(client, new_token(site_berlin))
    assert response.status_code == 201, response.content
    body = protocol.EnrollResponse.model_validate(response.json())
    node = Node.objects.get(uuid=body.node_id)
    assert node.site == site_berlin and node.role == "gateway" and node.hardware["cpu_cores"] == 4
    assert body.signing_key_fingerprint == keys.public_key_fingerprint()
    # The credential is stored hashed only.
    assert node.credential_hash == services.secret_hash(body.credential)
    assert body.credential not in json.dumps(list(Node.objects.values()), default=str)
    assert AuditEvent.objects.filter(action="node.enroll", object_id=body.node_id).exists()


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda t: EnrollmentToken.objects.filter(pk=t.pk).update(revoked_at=timezone.now()), 403, "revoked"),
        (lambda t: EnrollmentToken.objects.filter(pk=t.pk).update(
            expires_at=timezone.now() - dt.timedelta(seconds=1)), 403, "expired"),
        (lambda t: EnrollmentToken.objects.filter(pk=t.pk).update(uses=1), 403, "used up"),
    ],
    ids=["revoked", "expired", "reused"],
)
def test_it_refuses_an_unusable_token_naming_why(client: Client, site_berlin: Site, mutate: Any, status: int,
                                                  reason: str) -> None:
    token, value = services.token_create(actor=Actor.system("test"), site=site_berlin)
    mutate(token)
    response = enroll(client, value)
    assert response.status_code == status
    assert reason in response.json()["error"]
    assert not Node.objects.exists()


def test_it_refuses_an_unknown_token(client: Client, site_berlin: Site) -> None:
    response = enroll(client, "ewt_not-a-real-token-at-all")
    assert response.status_code == 401
    assert response.json() == {"error": "unknown enrollment token", "field": "token"}
    assert not Node.objects.exists()


def test_it_refuses_a_reused_token(client: Client, site_berlin: Site) -> None:
    value = new_token(site_berlin)
    assert enroll(client, value, name="a").status_code == 201
    second = enroll(client, value, name="b")
    assert second.status_code == 403
    assert "used up (1 of 1 uses)" in second.json()["error"]
    assert Node.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_enrolls_exactly_as_many_nodes_as_the_token_allows_under_concurrency(site_berlin: Site) -> None:
    value = new_token(site_berlin, max_uses=3)
    results: list[int] = []
    barrier = threading.Barrier(10)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            response = enroll(Client(), value, name=f"n{i}")
            results.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201] * 3 + [403] * 7
    assert Node.objects.filter(site=site_berlin).count() == 3
    assert EnrollmentToken.objects.get().uses == 3


def test_it_refuses_a_second_active_node_with_the_same_name(client: Client, site_berlin: Site) -> None:
    assert enroll(client, new_token(site_berlin)).status_code == 201
    response = enroll(client, new_token(site_berlin))
    assert response.status_code == 409
    assert "already enrolled" in response.json()["error"]
    assert Node.objects.count() == 1
    # The refused attempt did not consume the second token.
    assert EnrollmentToken.objects.filter(uses=0).count() == 1


def test_it_sends_the_signed_desired_state_only_when_the_generation_moved(client: Client, site_berlin: Site) -> None:
    body = enroll(client, new_token(site_berlin)).json()
    first = sync(client, body["node_id"], body["credential"])
    assert first.status_code == 200
    answer = protocol.SyncResponse.model_validate(first.json())
    assert answer.desired is not None
    public = signing.public_key_from_b64(body["signing_public_key"])
    state = signing.verify_desired_state(answer.desired, public)
    assert state.node_id == body["node_id"] and state.generation == answer.generation == 1

    again = sync(client, body["node_id"], body["credential"],
                 {"actual": {"applied_generation": 1, "applied_epoch": state.epoch}})
    assert again.json()["desired"] is None
    # Generation 1 of another epoch is another state: it is sent.
    other = sync(client, body["node_id"], body["credential"],
                 {"actual": {"applied_generation": 1, "applied_epoch": "an-older-epoch"}})
    assert other.json()["desired"] is not None

    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "3"})
    moved = protocol.SyncResponse.model_validate(
        sync(client, body["node_id"], body["credential"], {"actual": {"applied_generation": 1}}).json())
    assert moved.generation == 2
    assert moved.desired is not None
    assert signing.verify_desired_state(moved.desired, public).labels == {"line": "3"}


def test_it_hides_one_nodes_resources_from_another(client: Client, site_berlin: Site, site_ohio: Site) -> None:
    a = enroll(client, new_token(site_berlin), name="a").json()
    b = enroll(client, new_token(site_ohio), name="b").json()
    auth = {"Authorization": f"Bearer {a['credential']}"}
    assert client.get(f"/agent/v1/nodes/{b['node_id']}/desired-state", headers=auth).status_code == 404
    assert sync(client, b["node_id"], a["credential"]).status_code == 404
    assert Node.objects.get(uuid=b["node_id"]).last_seen_at is None
    assert client.get(f"/agent/v1/nodes/{a['node_id']}/desired-state", headers=auth).status_code == 200


def test_it_refuses_a_revoked_or_forged_credential(client: Client, site_berlin: Site) -> None:
    body = enroll(client, new_token(site_berlin)).json()
    forged = sync(client, body["node_id"], body["credential"][:-2] + "xx")
    assert forged.status_code == 401
    services.node_revoke(actor=Actor.system("test"), node=Node.objects.get(uuid=body["node_id"]))
    revoked = sync(client, body["node_id"], body["credential"])
    assert revoked.status_code == 403
    assert "revoked" in revoked.json()["error"]


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "needle"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b'{"health": {"status": "on fire"}}', "application/json", 400, "health.status"),
        (b'{"surprise": 1}', "application/json", 400, "surprise"),
        (b'{"actual": {"applied_generation": -1}}', "application/json", 400, "actual.applied_generation"),
        (b"{}", "text/plain", 415, "application/json"),
        (b'{"health": {"message": "' + b"x" * (300 * 1024) + b'"}}', "application/json", 413, "exceeds"),
    ],
    ids=["malformed", "not-object", "bad-enum", "unknown-field", "negative", "content-type", "oversized"],
)
def test_it_refuses_a_bad_sync_naming_the_problem_and_writes_nothing(
    client: Client, site_berlin: Site, payload: bytes, content_type: str, status: int, needle: str
) -> None:
    body = enroll(client, new_token(site_berlin)).json()
    events_before = AuditEvent.objects.count()
    response = client.post(f"/agent/v1/nodes/{body['node_id']}/sync", payload, content_type=content_type,
                           headers={"Authorization": f"Bearer {body['credential']}"})
    assert response.status_code == status
    assert needle in response.json()["error"]
    node = Node.objects.get(uuid=body["node_id"])
    assert node.last_seen_at is None and node.health == {}
    assert AuditEvent.objects.count() == events_before


def test_it_refuses_a_malformed_enrollment_naming_the_field(client: Client, site_berlin: Site) -> None:
    response = enroll(client, new_token(site_berlin), name="../../etc")
    assert response.status_code == 400
    assert response.json()["field"] == "name"
    response = enroll(client, new_token(site_berlin), hardware={"cpu_cores": "many"})
    assert response.status_code == 400
    assert response.json()["field"] == "hardware.cpu_cores"
    assert not Node.objects.exists()


def test_it_records_a_refusal_reported_by_the_node(client: Client, site_berlin: Site) -> None:
    body = enroll(client, new_token(site_berlin)).json()
    refusal = {"generation": 3, "reason": "signature does not match the pinned key", "at": timezone.now().isoformat()}
    assert sync(client, body["node_id"], body["credential"], {"refusals": [refusal]}).status_code == 200
    event = AuditEvent.objects.get(action="node.desired_state_refused")
    assert event.after["reason"] == refusal["reason"] and event.actor == body["node_id"]

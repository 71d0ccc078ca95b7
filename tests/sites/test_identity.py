"""Nodes' identity keys at the control plane: registered at enrollment or on a sync, one key to one node,
a different key held back until an operator accepts it."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from sites import identity, services
from sites.models import Node, Site
from sites.sync import node_sync

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true"}


def new_key() -> str:
    return base64.b64encode(signing.public_key_raw(signing.generate_private_key().public_key())).decode()


def fingerprint(key: str) -> str:
    return signing.fingerprint(base64.b64decode(key))


def enroll(site: Site, name: str, key: str | None = None) -> Node:
    token = services.token_create(actor=Actor.system("test"), site=site)[1]
    node, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name=name, identity_key=key),
                                   ip="10.0.0.5")
    return node


def sync(node: Node, key: str | None) -> protocol.SyncResponse:
    return node_sync(node=node, request=protocol.SyncRequest(identity_key=key), ip="10.0.0.6")


def events(node: Node, action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action, object_id=str(node.uuid)).order_by("seq"))


def post_json(client: Client, url: str, body: dict[str, Any], credential: str = "") -> Any:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return client.post(url, json.dumps(body), content_type="application/json", headers=headers)


# -- enrollment ------------------------------------------------------------------


def test_it_registers_the_key_a_node_enrolls_with(client: Client, site_berlin: Site) -> None:
    key = new_key()
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    response = post_json(client, "/agent/v1/enroll", {"token": token, "name": "gw-1", "identity_key": key})
    assert response.status_code == 201, response.content
    node = Node.objects.get(uuid=response.json()["node_id"])
    assert node.identity_key == key and node.identity_key_at is not None and node.identity_key_pending == ""
    [enrolled] = events(node, "node.enroll")
    assert enrolled.after["identity_key"] == fingerprint(key)
    assert identity.node_public_key(node) == signing.public_key_from_b64(key)


def test_a_node_enrolled_without_a_key_has_none(site_berlin: Site) -> None:
    node = enroll(site_berlin, "old-1")
    assert node.identity_key == "" and node.identity_key_at is None
    assert identity.node_public_key(node) is None
    assert events(node, "node.enroll")[0].after["identity_key"] == ""


def test_one_key_cannot_enroll_two_nodes_revoked_or_not(client: Client, site_berlin: Site, site_ohio: Site) -> None:
    key = new_key()
    first = enroll(site_berlin, "gw-1", key)
    with pytest.raises(services.SitesError) as refused:
        enroll(site_ohio, "gw-2", key)
    assert refused.value.status == 400 and refused.value.field == "identity_key"
    assert refused.value.message == (f"identity key {fingerprint(key)[:16]} is already registered to node gw-1 at "
                                     "site plant-berlin: one key, one node; a node needs a key of its own")
    services.node_revoke(actor=Actor.system("test"), node=first)
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    response = post_json(client, "/agent/v1/enroll", {"token": token, "name": "gw-1", "identity_key": key})
    assert response.status_code == 400
    assert response.json() == {"field": "identity_key", "error": (
        f"identity key {fingerprint(key)[:16]} is already registered to node gw-1 (revoked) at site plant-berlin: "
        "one key, one node; a node needs a key of its own")}
    # Nothing was enrolled, and the tokens were not spent.
    assert list(Node.objects.values_list("name", flat=True)) == ["gw-1"]
    assert not site_ohio.tokens.filter(uses__gt=0).exists()
    assert not site_berlin.tokens.filter(uses__gt=0).exclude(nodes=first).exists()


def test_revoking_a_node_says_its_key_is_revoked_with_it(site_berlin: Site) -> None:
    key = new_key()
    node = enroll(site_berlin, "gw-1", key)
    services.node_revoke(actor=Actor.system("test"), node=node)
    [revoked] = events(node, "node.revoke")
    assert revoked.after == {"status": "revoked", "identity_key_revoked": fingerprint(key)}
    # The key stays registered to the revoked node, so no other node can take it.
    assert Node.objects.get(pk=node.pk).identity_key == key


@pytest.mark.parametrize(
    ("value", "says"),
    [("not base64!", "not valid base64"),
     (base64.b64encode(b"k" * 31).decode(), "an Ed25519 public key is 32 bytes, this one is 31")],
    ids=["not-base64", "31-bytes"],
)
def test_the_agent_api_names_the_field_of_a_malformed_key(client: Client, site_berlin: Site, value: str,
                                                          says: str) -> None:
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    enrolled = post_json(client, "/agent/v1/enroll", {"token": token, "name": "gw-1", "identity_key": value})
    assert enrolled.status_code == 400
    assert enrolled.json()["field"] == "identity_key" and says in enrolled.json()["error"]
    assert not Node.objects.exists()
    good = post_json(client, "/agent/v1/enroll", {"token": token, "name": "gw-1"}).json()
    synced = post_json(client, f"/agent/v1/nodes/{good['node_id']}/sync", {"identity_key": value}, good["credential"])
    assert synced.status_code == 400
    assert synced.json()["field"] == "identity_key" and says in synced.json()["error"]
    assert Node.objects.get().identity_key == ""


# -- sync ------------------------------------------------------------------------


def test_a_node_enrolled_before_identity_keys_registers_its_key_on_its_next_sync(site_berlin: Site) -> None:
    node = enroll(site_berlin, "old-1")
    sync(node, None)
    assert Node.objects.get(pk=node.pk).identity_key == ""
    key = new_key()
    sync(node, key)
    sync(node, key)
    node.refresh_from_db()
    assert node.identity_key == key and node.identity_key_at is not None and node.identity_key_pending == ""
    [registered] = events(node, "node.identity_register")
    assert registered.after == {"identity_key": fingerprint(key)} and registered.actor == str(node.uuid)
    assert not events(node, "node.identity_mismatch")


def test_a_different_key_waits_as_pending_and_does_not_replace_the_key(site_berlin: Site,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    key, other = new_key(), new_key()
    node = enroll(site_berlin, "gw-1", key)
    with caplog.at_level("WARNING", logger="edgewise.sites"):
        answer = sync(node, other)
        sync(node, other)
    # The sync goes on: the credential is valid.
    assert answer.generation >= 1
    node.refresh_from_db()
    assert node.identity_key == key and node.identity_key_pending == other
    assert node.last_seen_at is not None and node.status == "online"
    [mismatch] = events(node, "node.identity_mismatch")
    assert mismatch.before == {"identity_key_pending": ""}
    assert mismatch.after == {"identity_key": fingerprint(key), "identity_key_pending": fingerprint(other)}
    assert [r.getMessage() for r in caplog.records if "presents identity key" in r.getMessage()] == [
        f"node {node.uuid} presents identity key {fingerprint(other)[:16]}, not its registered key "
        f"{fingerprint(key)[:16]}; kept the registered key"]
    # The registered key again: nothing changes; a third key: pending changes, audited again.
    sync(node, key)
    third = new_key()
    sync(node, third)
    node.refresh_from_db()
    assert node.identity_key == key and node.identity_key_pending == third
    assert [e.after["identity_key_pending"] for e in events(node, "node.identity_mismatch")] == [
        fingerprint(other), fingerprint(third)]
    assert not events(node, "node.identity_register")


def test_a_node_without_a_key_cannot_take_another_nodes_key(site_berlin: Site) -> None:
    key = new_key()
    holder = enroll(site_berlin, "gw-1", key)
    services.node_revoke(actor=Actor.system("test"), node=holder)
    old = enroll(site_berlin, "old-1")
    sync(old, key)
    old.refresh_from_db()
    assert old.identity_key == "" and old.identity_key_pending == key
    [mismatch] = events(old, "node.identity_mismatch")
    assert "already registered to node gw-1 (revoked)" in mismatch.after["refused"]
    with pytest.raises(services.SitesError) as refused:
        identity.node_identity_accept(actor=Actor.system("test"), node=old)
    assert "one key, one node" in refused.value.message
    assert Node.objects.get(pk=old.pk).identity_key == ""


# -- the console -----------------------------------------------------------------


def pending_node(site: Site) -> tuple[Node, str, str]:
    key, other = new_key(), new_key()
    node = enroll(site, "gw-1", key)
    sync(node, other)
    return node, key, other


def test_an_operator_accepts_the_pending_key_from_the_node_page(client: Client, operator: Any,
                                                                 site_berlin: Site) -> None:
    node, key, other = pending_node(site_berlin)
    client.force_login(operator)
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert 'id="identity-key-pending"' in page and "presented a different identity key" in page
    assert f'title="{fingerprint(other)}">{fingerprint(other)[:16]}…' in page
    assert f'title="{fingerprint(key)}" data-identity-fingerprint>{fingerprint(key)[:16]}…' in page
    assert f'action="/nodes/{node.uuid}/identity/accept"' in page
    response = client.post(f"/nodes/{node.uuid}/identity/accept", headers=HTMX)
    assert response.status_code == 200 and response.headers["HX-Refresh"] == "true"
    node.refresh_from_db()
    assert node.identity_key == other and node.identity_key_pending == ""
    [accepted] = events(node, "node.identity_accept")
    assert accepted.actor == "operator"
    assert accepted.before == {"identity_key": fingerprint(key)}
    assert accepted.after == {"identity_key": fingerprint(other)}
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert 'id="identity-key-pending"' not in page and f'title="{fingerprint(other)}"' in page
    # The node presenting the accepted key is in step; nothing more is audited.
    sync(node, other)
    assert not events(node, "node.identity_register") and len(events(node, "node.identity_mismatch")) == 1
    again = client.post(f"/nodes/{node.uuid}/identity/accept")
    assert again.status_code == 400 and "presented no other identity key" in again.content.decode()


@pytest.mark.parametrize(("persona", "status"), [("viewer", 403), ("stranger", 404), ("anonymous", 302)])
def test_accepting_a_key_needs_the_permission_to_revoke_the_node(client: Client, request: pytest.FixtureRequest,
                                                                  site_berlin: Site, persona: str,
                                                                  status: int) -> None:
    node, key, other = pending_node(site_berlin)
    if persona != "anonymous":
        client.force_login(request.getfixturevalue(persona))
    if persona == "viewer":
        page = client.get(f"/nodes/{node.uuid}/").content.decode()
        assert 'id="identity-key-pending"' in page and "/identity/accept" not in page
    response = client.post(f"/nodes/{node.uuid}/identity/accept")
    assert response.status_code == status
    node.refresh_from_db()
    assert node.identity_key == key and node.identity_key_pending == other
    assert not events(node, "node.identity_accept")


def test_accepting_needs_a_post_with_its_csrf_token(operator: Any, site_berlin: Site) -> None:
    node, key, _ = pending_node(site_berlin)
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.get(f"/nodes/{node.uuid}/identity/accept").status_code == 405
    assert client.post(f"/nodes/{node.uuid}/identity/accept").status_code == 403
    assert Node.objects.get(pk=node.pk).identity_key == key


def test_a_revoked_nodes_pending_key_is_never_accepted(client: Client, admin_user: Any, site_berlin: Site) -> None:
    node, key, _ = pending_node(site_berlin)
    services.node_revoke(actor=Actor.system("test"), node=node)
    client.force_login(admin_user)
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert "/identity/accept" not in page
    response = client.post(f"/nodes/{node.uuid}/identity/accept")
    assert response.status_code == 400 and "this node is revoked" in response.content.decode()
    assert Node.objects.get(pk=node.pk).identity_key == key


def test_the_node_page_says_when_no_key_is_registered(client: Client, operator: Any, site_berlin: Site) -> None:
    node = enroll(site_berlin, "old-1")
    client.force_login(operator)
    page = client.get(f"/nodes/{node.uuid}/").content.decode()
    assert "none registered yet" in page and 'id="identity-key-pending"' not in page

"""The estate's audit trail in one list: control-plane events and nodes' log entries, filtered and scoped together."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from audit.log_models import NodeLog, NodeLogState
from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from edge_runtime.audit import node_log_origin
from sites import services
from sites.models import Site
from tests.audit.test_witness import Node

pytestmark = pytest.mark.django_db(transaction=True)


def node_at(site: Site, entries: int, action: str = "query.answered") -> Node:
    node = Node()
    node.site = site.uuid
    node.log(entries, action)
    assert node.sync().state == "ok"
    return node


def shown(response: Any) -> list[str]:
    """The rows in order: control-plane seqs as "12", node entries as "n3"."""
    assert response.status_code == 200, response.content[:400]
    return re.findall(r'hx-swap="innerHTML"(?: title="[^"]*")?>(n?\d+)</a>', response.content.decode())


def test_it_lists_node_entries_with_the_control_planes_events_newest_first(client: Client, admin_user: Any,
                                                                          site_berlin: Site) -> None:
    node_at(site_berlin, 3)
    services.token_create(actor=Actor.system("test"), site=site_berlin)
    client.force_login(admin_user)
    rows = shown(client.get("/audit/"))
    token_seq = str(AuditEvent.objects.get(action="token.create").seq)
    # The token came after the node's entries were stored (their node-side times are older still).
    assert rows.index(token_seq) < rows.index("n3") < rows.index("n2") < rows.index("n1")
    assert len(rows) == AuditEvent.objects.count() + 3


@pytest.mark.parametrize(("params", "want_nodes", "want_events"), [
    ({"source": "node"}, True, False),
    ({"source": "control-plane"}, False, True),
    ({"actor_type": "user"}, False, True),
    ({"actor_type": "node"}, True, False),
    ({"action": "query."}, True, False),
])
def test_it_filters_both_logs_alike(client: Client, admin_user: Any, site_berlin: Site, params: dict[str, str],
                                    want_nodes: bool, want_events: bool) -> None:
    node_at(site_berlin, 2)
    services.token_create(actor=Actor("user", "alice", None), site=site_berlin)
    client.force_login(admin_user)
    rows = shown(client.get("/audit/", params))
    assert any(r.startswith("n") for r in rows) == want_nodes
    assert any(not r.startswith("n") for r in rows) == want_events


def test_it_filters_by_node_and_by_site(client: Client, admin_user: Any, site_berlin: Site, site_ohio: Site) -> None:
    berlin, ohio = node_at(site_berlin, 2), node_at(site_ohio, 4)
    client.force_login(admin_user)
    assert shown(client.get("/audit/", {"node": str(ohio.uuid), "source": "node"})) == ["n4", "n3", "n2", "n1"]
    assert shown(client.get("/audit/", {"site": str(site_berlin.uuid), "source": "node"})) == ["n2", "n1"]
    assert shown(client.get("/audit/", {"actor": str(berlin.uuid)[:8], "source": "node"})) == ["n2", "n1"]
    response = client.get("/audit/", {"node": "not-a-uuid"})
    assert response.status_code == 400 and "node: Enter a valid UUID." in response.content.decode()


def test_a_person_sees_only_the_node_entries_and_logs_of_their_sites(client: Client, operator: Any,
                                                                    site_berlin: Site, site_ohio: Site) -> None:
    berlin, ohio = node_at(site_berlin, 2), node_at(site_ohio, 3)
    client.force_login(operator)
    response = client.get("/audit/", {"source": "node"})
    assert shown(response) == ["n2", "n1"]
    page = response.content.decode()
    assert str(berlin.uuid) in page and str(ohio.uuid) not in page
    assert client.get(f"/audit/nodes/{ohio.uuid}/1/").status_code == 404
    detail = client.get(f"/audit/nodes/{berlin.uuid}/2/")
    assert detail.status_code == 200 and "query.answered" in detail.content.decode()
    assert "in the node's checkpoint of 2 entries" in detail.content.decode()


def test_it_shows_each_node_logs_checkpoint_status_and_a_forked_one_everywhere(client: Client, admin_user: Any,
                                                                                site_berlin: Site) -> None:
    healthy, forked = node_at(site_berlin, 5), node_at(site_berlin, 4)
    forked.entries = forked.entries[:2]
    forked.cosigned_size = forked.stored = 2
    assert forked.sync(forked.upload(start=2)).state == "forked"
    client.force_login(admin_user)
    page = client.get("/audit/").content.decode()
    assert "Node logs" in page and 'class="badge log-forked"' in page and "shrank" in page
    only_forked = client.get("/audit/", {"log_state": "forked"}).content.decode()
    assert str(forked.uuid) in only_forked and f"?node={healthy.uuid}" not in only_forked
    # Every console page carries the banner while a log the reader may see is forked.
    fleet = client.get(reverse("sites:fleet"))
    assert fleet.status_code == 200 and "A node's audit log has" in fleet.content.decode()
    assert NodeLog.objects.get(node_uuid=forked.uuid).state == NodeLogState.FORKED


def test_the_node_page_shows_its_audit_log_and_a_fork(client: Client, admin_user: Any, site_berlin: Site) -> None:
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    row, _ = services.node_enroll(request=protocol.EnrollRequest(token=token, name="gw-log"), ip=None)
    node = Node()
    node.uuid, node.site, node.origin = row.uuid, site_berlin.uuid, node_log_origin(str(row.uuid))
    node.log(3)
    assert node.sync().state == "ok"
    client.force_login(admin_user)
    page = client.get(reverse("sites:node-detail", args=[row.uuid])).content.decode()
    assert 'class="badge log-ok"' in page and "3 entries stored, checkpoint of 3 cosigned" in page
    node.entries = node.entries[:1]
    node.stored = node.cosigned_size = 1
    assert node.sync(node.upload(start=1)).state == "forked"
    page = client.get(reverse("sites:node-detail", args=[row.uuid])).content.decode()
    assert 'class="badge log-forked"' in page and "shrank" in page and "nothing more is taken" in page
    # The merged list names the node, not only its uuid.
    assert "Plant Berlin / gw-log" in client.get("/audit/", {"source": "node"}).content.decode()

"""A real node's audit log reaching a real control plane: cosigned, caught up after an outage, flagged when forked."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import pytest
from django.test import Client
from django.urls import reverse

from audit import checkpoints
from audit.log_models import NodeLog, NodeLogEntry, NodeLogState
from audit.models import AuditEvent
from audit.node_verify import node_logs_verify
from edge_runtime import notes
from edge_runtime.audit import NodeAudit, node_log_origin
from edge_runtime.identity_key import NodeKey
from sites.models import Site
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]


def node_id(node: EdgeNode) -> str:
    return str(json.loads(node.state_dir.joinpath("identity.json").read_text())["node_id"])


def local_entries(node: EdgeNode) -> list[tuple[int, str, str]]:
    return [(e.seq, e.action, e.hash) for e in NodeAudit.in_state_dir(node.state_dir).events_after(0, limit=100_000)]


def caught_up(node: EdgeNode) -> NodeLog | None:
    """The node's log as witnessed, once the control plane holds and cosigned everything the node logged."""
    size, _ = NodeAudit.in_state_dir(node.state_dir).head()
    log = NodeLog.objects.filter(node_uuid=node_id(node)).first()
    return log if log is not None and log.stored == size and log.cosigned_size == size else None


def test_a_node_log_is_cosigned_and_survives_an_outage_and_a_restart_without_loss_or_duplicates(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-audit")
    log = wait_until(lambda: caught_up(node), what=f"the node's log to be cosigned\n{node.log_text()}")
    assert log.state == NodeLogState.OK and log.stored >= 1
    # The cosigned note is the node's checkpoint, signed by its identity key and cosigned by the audit log key.
    key = NodeKey.load_or_create(node.state_dir)
    note, checkpoint = notes.open_checkpoint(log.cosigned_note, node_log_origin(node_id(node)),
                                             key.private.public_key())
    audit_key = checkpoints.checkpoint_key()
    assert notes.verify_cosignature(note, audit_key.name, audit_key.public) > 0 and checkpoint.size == log.stored

    # The control plane goes away; the node keeps logging, and restarts meanwhile.
    live_control_plane.stop()
    local = NodeAudit.in_state_dir(node.state_dir)
    for i in range(1500):
        local.append("local.operation", {"i": i}, durable=False)
    node.stop()
    for i in range(1000):
        local.append("local.operation", {"i": 1500 + i}, durable=False)
    local.append("local.operation", {"i": "last"})
    node.start()
    live_control_plane.start()
    wait_until(lambda: caught_up(node), timeout=60, what=f"the backlog to arrive\n{node.log_text()}")

    stored = list(NodeLogEntry.objects.filter(node_uuid=node_id(node)).order_by("seq")
                  .values_list("seq", "action"))
    assert stored == [(seq, action) for seq, action, _ in local_entries(node)]
    assert sum(1 for _, action in stored if action == "local.operation") == 2501
    # The agent's own events are among them: both starts, and the desired state it applied.
    actions = [action for _, action in stored]
    assert actions.count("node.started") == 2 and "desired.applied" in actions
    assert node_logs_verify(audit_key).breaks == []


def test_a_node_that_rewrites_its_log_after_a_cosigned_checkpoint_is_flagged_forked(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site, admin_user: object
) -> None:
    node = edge_node(site_berlin, "gw-fork")
    local = NodeAudit.in_state_dir(node.state_dir)
    for i in range(20):
        local.append("local.operation", {"i": i})
    wait_until(lambda: caught_up(node), what=f"the node's log to be cosigned\n{node.log_text()}")
    # The node's owner rewrites its history and rebuilds the log's tree from it, as a tampering node would.
    node.stop()
    with sqlite3.connect(node.state_dir / "audit.sqlite3") as db:
        db.execute("UPDATE events SET detail = '{\"i\":\"rewritten\"}' WHERE seq = 5")
        db.execute("DELETE FROM tree")
    NodeAudit.in_state_dir(node.state_dir)  # rebuilds the tree from the (rewritten) events
    local.append("local.operation", {"i": "after"})
    node.start()
    log = wait_until(lambda: NodeLog.objects.filter(node_uuid=node_id(node), state=NodeLogState.FORKED).first(),
                     what=f"the fork to be flagged\n{node.log_text()}")
    assert "does not extend" in log.fork_reason or "differs" in log.fork_reason
    assert AuditEvent.objects.filter(action="node.audit_forked", after__node=node_id(node)).count() == 1
    # Nothing after the fork is taken, and the console says so on every page.
    assert not NodeLogEntry.objects.filter(node_uuid=node_id(node), detail__contains="after").exists()
    client = Client()
    client.force_login(admin_user)  # type: ignore[arg-type]
    page = client.get(reverse("sites:fleet"))
    assert page.status_code == 200 and "A node's audit log has" in page.content.decode()

"""Real ``edge-runtime`` processes against a real control plane on loopback.

The control plane answers with a 1 s sync interval in tests, so the back-off
cap is 6 s; every wait is bounded by ``wait_until``.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys, quiet, rotation
from orchestrator.desired_state import desired_state_content
from orchestrator.models import DesiredState, Epoch
from sites import services
from sites.models import Node, NodeStatus, Site
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]


def node_id(node: EdgeNode) -> str:
    return str(json.loads(node.state_dir.joinpath("identity.json").read_text())["node_id"])


def row(node: EdgeNode) -> Node:
    return Node.objects.get(uuid=node_id(node))


def published(node: EdgeNode) -> int:
    return int(DesiredState.objects.get(node__uuid=node_id(node)).generation)


def wait_applied(node: EdgeNode, generation: int, timeout: float = 15) -> dict[str, Any]:
    """Wait until the node's own status and the control plane both say ``generation`` is applied."""
    status = wait_until(lambda: (s := node.status())["applied_generation"] == generation and s,
                        timeout=timeout, what=f"{node.name} to apply generation {generation}\n{node.log_text()}")
    wait_until(lambda: row(node).applied_generation == generation, timeout=timeout,
               what=f"the control plane to record generation {generation} for {node.name}")
    return dict(status)


def refusals(node: EdgeNode) -> list[dict[str, Any]]:
    return [e.after for e in AuditEvent.objects.filter(action="node.desired_state_refused", object_id=node_id(node))]


def offer(node: EdgeNode, state: protocol.DesiredState, key: Any) -> None:
    """Put ``state``, signed with ``key``, in the node's desired-state row, as a forged or restored row would be."""
    signed = signing.sign_desired_state(state, key)
    DesiredState.objects.filter(node=row(node)).update(
        generation=state.generation, payload=signed.payload, signature=signed.signature,
        key_fingerprint=signed.key_fingerprint, epoch=state.epoch, content_hash="offered-by-the-test")
    # Written behind the services' back, so Redis is told as a publish would tell it: the node's next sync
    # takes the whole path and is offered the row (orchestrator.quiet).
    quiet.bump([node_id(node)])


def state_for(node: EdgeNode, generation: int, *, epoch: str | None = None, started: str | None = None,
              **labels: str) -> protocol.DesiredState:
    trust = keys.current()
    content = {**desired_state_content(row(node)), "labels": labels,
               "epoch": trust.epoch if epoch is None else epoch,
               "epoch_started_at": trust.epoch_started_at if started is None else started}
    return protocol.DesiredState(generation=generation, issued_at=timezone.now(), **content)


def test_it_enrolls_runs_and_comes_online_with_the_published_generation(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1", role="gateway")
    status = wait_applied(node, published(node))
    db = row(node)
    assert db.status == NodeStatus.ONLINE and db.role == "gateway" and db.name == "gw-1"
    assert db.hardware["cpu_cores"] >= 1 and db.hardware["memory_mb"] > 0 and db.hardware["hostname"]
    assert db.health["status"] == "ok"
    assert status["site"] == "plant-berlin" and status["url"] == live_control_plane.url
    assert status["desired_state"]["verified"] is True
    assert status["signing_key_fingerprint"] == keys.public_key_fingerprint()
    assert status["last_sync_at"] is not None and status["consecutive_failures"] == 0
    assert "sync ok generation=1" in node.log_text()


def test_it_applies_a_site_change_at_once_when_nudged(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "line-3")
    wait_applied(node, 1)
    wait_until(lambda: "stream connected" in node.log_text(), what=f"the node's stream to connect\n{node.log_text()}")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "3", "shift": "night"})
    assert published(node) == 2
    status = wait_applied(node, 2, timeout=5)
    assert status["desired_state"]["labels"] == {"line": "3", "shift": "night"}
    # The stream's nudge reached the node, not only its polling, carrying the state itself; the node applied it
    # before any sync, then reported it (the control plane records it applied).
    wait_until(lambda: "nudge generation=2 with its desired state" in node.log_text(), timeout=5,
               what=f"the nudge\n{node.log_text()}")
    log = node.log_text()
    # Applied from the nudge: no sync applied it (that would log "sync ok generation=2" at INFO).
    assert "applied desired state generation=2" in log[log.index("nudge generation=2 with its desired state"):]
    assert "sync ok generation=2" not in log
    wait_until(lambda: Node.objects.get(name="line-3").applied_generation == 2, timeout=5,
               what="the control plane to record generation 2 applied")


def test_it_refuses_a_desired_state_signed_with_another_key_and_reports_it_on_every_sync(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    offer(node, state_for(node, 2, owner="mallory"), signing.generate_private_key())
    wait_until(lambda: refusals(node), what=f"the refusal in the audit trail\n{node.log_text()}")
    [refusal] = refusals(node)
    assert refusal["generation"] == 2 and "not the pinned key" in refusal["reason"]
    assert re.search(r"refused desired state generation=2: signed by key \w+, not the pinned key", node.log_text())
    # It keeps what it had, audits the refusal once, and says it refuses on every sync, not only the first.
    for _ in range(3):
        seen = row(node).last_seen_at
        wait_until(lambda seen=seen: row(node).last_seen_at > seen, what="another sync")
        db = row(node)
        assert db.actual_state["refusing"]["generation"] == 2 and db.health["status"] == "degraded"
        assert "refusing generation 2" in db.health["message"]
    status = node.status()
    assert status["applied_generation"] == 1 and status["desired_state"]["generation"] == 1
    assert status["desired_state"]["labels"] == {}
    assert row(node).applied_generation == 1
    assert len(refusals(node)) == 1


def test_it_accepts_the_next_state_signed_with_the_pinned_key_again(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    offer(node, state_for(node, 2, owner="mallory"), signing.generate_private_key())
    wait_until(lambda: refusals(node), what="the refusal in the audit trail")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"owner": "ops"})
    status = wait_applied(node, 3)
    assert status["desired_state"]["labels"] == {"owner": "ops"}
    wait_until(lambda: row(node).actual_state.get("refusing") is None, what="the refusal to end")
    assert row(node).health["status"] == "ok"


def test_it_recovers_when_a_restored_database_holds_a_lower_generation(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "1"})
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "2"})
    wait_applied(node, 3)
    # The database is restored from a backup taken at generation 1 (same epoch, validly signed).
    offer(node, state_for(node, 1), keys.signing_key())
    # The node reports generation 3; the control plane publishes above it instead of offering 1.
    wait_until(lambda: published(node) == 4, what=f"a state above the node's generation\n{node.log_text()}")
    wait_applied(node, 4)
    assert refusals(node) == []
    assert node.status()["desired_state"]["labels"] == {"line": "2"}


def test_it_follows_a_new_epoch_after_a_restore_and_refuses_the_older_one_meanwhile(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    before = keys.current()
    backup = DesiredState.objects.get(node=row(node))
    rotation.epoch_start(actor=Actor.system("test"), reason="an epoch the backup does not know")
    wait_until(lambda: node.status().get("epoch") == keys.current().epoch, what=f"the new epoch\n{node.log_text()}")
    # Restore the backup: the later epoch is gone from the database, the row is the old one.
    Epoch.objects.exclude(uuid=before.epoch).delete()
    DesiredState.objects.filter(pk=backup.pk).update(generation=backup.generation, payload=backup.payload,
                                                     signature=backup.signature, epoch=backup.epoch,
                                                     content_hash=backup.content_hash)
    # A restore retires what Redis remembers of the newer database (README: Running a large fleet).
    quiet.forget_all()
    wait_until(lambda: refusals(node), timeout=20, what=f"the older epoch refused\n{node.log_text()}")
    assert "older than epoch" in refusals(node)[0]["reason"]
    wait_until(lambda: (row(node).actual_state.get("refusing") or {}).get("generation") == backup.generation,
               what="the refusal reported")
    # What the operator does after a restore: a new epoch, which the node accepts whatever its generation.
    keys.forget()
    after = rotation.epoch_start(actor=Actor.system("test"), reason="restored the backup")
    wait_until(lambda: node.status().get("epoch") == after, what=f"the node in the operator's epoch\n{node.log_text()}")
    wait_until(lambda: row(node).actual_state.get("refusing") is None, what="the refusal to end")


def test_it_follows_a_key_rotation(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site,
    rotate_signing_key: Callable[[], str],
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    new = rotate_signing_key()
    wait_until(lambda: node.status()["signing_key_fingerprint"] == new, timeout=20,
               what=f"the node to pin the new key\n{node.log_text()}")
    assert f"pinned the control plane's new signing key {new[:16]}" in node.log_text()
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"after": "rotation"})
    status = wait_applied(node, published(node))
    assert status["desired_state"]["labels"] == {"after": "rotation"} and refusals(node) == []
    # Restarted, it verifies its state with the key it pinned.
    node.stop()
    node.start()
    wait_until(lambda: "loaded desired state generation" in node.log_text(), what="the restarted node")
    assert node.status()["desired_state"]["verified"] is True


def test_it_carries_on_while_the_control_plane_is_down_and_resyncs_when_it_returns(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "7"})
    wait_applied(node, 2)
    live_control_plane.stop()

    # It keeps running and retries with growing delays, capped at 6 sync intervals.
    def ceilings() -> list[float]:
        return [float(c) for c in re.findall(r"sync failed attempt=\d+: .*backoff ceiling ([\d.]+)s", node.log_text())]

    wait_until(lambda: len(ceilings()) >= 4, timeout=30, what=f"four failed syncs\n{node.log_text()}")
    assert ceilings()[:4] == [1.0, 2.0, 4.0, 6.0]
    assert "cannot reach" in node.log_text() and "stream disconnected" in node.log_text()
    assert node.proc is not None and node.proc.poll() is None
    status = node.status()
    assert status["applied_generation"] == 2 and status["desired_state"]["labels"] == {"line": "7"}
    assert status["consecutive_failures"] >= 4 and "cannot reach" in status["last_error"]

    # Restarted while the control plane is still down, it carries on from disk.
    proc = node.proc
    node.stop()
    assert proc.returncode == 0 and node.log_text().rstrip().endswith("stopped")
    node.start()
    wait_until(lambda: "loaded desired state generation=2 from disk" in node.log_text(),
               what=f"the restarted node to load its state\n{node.log_text()}")
    wait_until(lambda: node.log_text().count("sync failed attempt=1:") >= 2, what="the restarted node to retry")
    assert node.proc is not None and node.proc.poll() is None
    assert node.status()["applied_generation"] == 2

    seen = row(node).last_seen_at
    live_control_plane.start()
    wait_until(lambda: row(node).last_seen_at > seen, timeout=20,
               what=f"the node to sync with the control plane again\n{node.log_text()}")
    wait_until(lambda: re.search(r"sync ok generation=2 after \d+ failed attempts", node.log_text()),
               what="the node to log its recovery")
    wait_until(lambda: node.status()["consecutive_failures"] == 0, what="the failures to reset")
    assert row(node).applied_generation == 2


def test_it_refuses_a_tampered_desired_state_file_at_start(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"zone": "a"})
    wait_applied(node, 2)
    node.stop()
    path = node.state_dir / "desired_state.json"
    document = json.loads(path.read_text())
    document["payload"] = document["payload"].replace('"zone":"a"', '"zone":"b"')
    path.write_text(json.dumps(document))
    assert node.status()["desired_state"]["verified"] is False

    node.start()
    wait_until(lambda: refusals(node), what=f"the refusal in the audit trail\n{node.log_text()}")
    [refusal] = refusals(node)
    assert "desired state on disk refused" in refusal["reason"] and "failed verification" in refusal["reason"]
    assert "refused desired state generation=2: desired state on disk refused" in node.log_text()
    # The control plane sends the genuine state again, which replaces the tampered file.
    wait_until(lambda: node.status()["desired_state"].get("labels") == {"zone": "a"},
               what="the genuine desired state back on disk")
    assert node.status()["applied_generation"] == 2


def test_it_retries_slowly_when_its_credential_is_revoked(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    services.node_revoke(actor=Actor.system("test"), node=row(node))
    wait_until(lambda: "sync refused: credential not accepted (HTTP 403" in node.log_text(),
               what=f"the refusal in the log\n{node.log_text()}")
    line = next(x for x in node.log_text().splitlines() if "sync refused: credential not accepted" in x)
    delay = float(re.search(r"retrying in ([\d.]+)s", line).group(1))  # type: ignore[union-attr]
    assert 5.4 <= delay <= 6.6
    assert node.proc is not None and node.proc.poll() is None
    assert "revoked" in node.status()["last_error"]


def test_it_stops_cleanly_on_sigint(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    proc = node.proc
    node.stop(signal.SIGINT)
    assert proc is not None and proc.returncode == 0
    assert "stopping on SIGINT" in node.log_text() and "Traceback" not in node.log_text()

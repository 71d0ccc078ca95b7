"""Real ``edge-runtime`` processes against a real control plane on loopback.

The control plane answers with a 1 s sync interval in tests, so the back-off
cap is 6 s; every wait is bounded by ``wait_until``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys
from sites import services
from sites.models import DesiredState, Node, NodeStatus, Site
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


@pytest.fixture
def other_signing_key() -> Iterator[Callable[[], None]]:
    """Swap the control plane's signing key for another one; the original is always put back."""
    path = Path(settings.SIGNING_KEY_PATH)
    keys.signing_key()  # make sure the key exists before saving it
    original = path.read_bytes()

    def replace(data: bytes) -> None:
        tmp = path.with_name(path.name + ".swap")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def swap() -> None:
        replace(signing.private_key_to_pem(signing.generate_private_key()))
        assert keys.public_key_fingerprint() != signing.fingerprint(
            signing.public_key_raw(signing.private_key_from_pem(original).public_key()))

    yield swap
    replace(original)
    assert keys.signing_key().private_bytes_raw() == signing.private_key_from_pem(original).private_bytes_raw()


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
    # The stream's nudge reached the node, not only its polling.
    wait_until(lambda: "nudge generation=2" in node.log_text(), timeout=5, what=f"the nudge\n{node.log_text()}")
    assert "applied desired state generation=2" in node.log_text()


def test_it_refuses_a_desired_state_signed_with_another_key_and_reports_it(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site,
    other_signing_key: Callable[[], None],
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    other_signing_key()
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"owner": "mallory"})
    assert published(node) == 2
    wait_until(lambda: refusals(node), what=f"the refusal in the audit trail\n{node.log_text()}")
    [refusal] = refusals(node)
    assert refusal["generation"] == 2 and "not the pinned key" in refusal["reason"]
    assert re.search(r"refused desired state generation=2: signed by key \w+, not the pinned key", node.log_text())
    # It keeps what it had, and reports the refusal once although the document is offered on every sync.
    wait_until(lambda: row(node).last_seen_at and node.status()["pending_refusals"] == [],
               what="the refusal to be reported")
    seen = row(node).last_seen_at
    wait_until(lambda: row(node).last_seen_at > seen, what="another sync")
    status = node.status()
    assert status["applied_generation"] == 1 and status["desired_state"]["generation"] == 1
    assert status["desired_state"]["labels"] == {}
    assert row(node).applied_generation == 1
    assert len(refusals(node)) == 1


def test_it_accepts_the_next_state_signed_with_the_pinned_key_again(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site,
    other_signing_key: Callable[[], None],
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_applied(node, 1)
    path = Path(settings.SIGNING_KEY_PATH)
    original = path.read_bytes()
    other_signing_key()
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"owner": "mallory"})
    wait_until(lambda: refusals(node), what="the refusal in the audit trail")
    tmp = path.with_name(path.name + ".back")
    tmp.write_bytes(original)
    os.replace(tmp, path)
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"owner": "ops"})
    status = wait_applied(node, 3)
    assert status["desired_state"]["labels"] == {"owner": "ops"}


def test_it_refuses_a_lower_generation_as_after_a_database_restore(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    services.site_update(actor=Actor.system("test"), site=site_berlin, labels={"line": "1"})
    wait_applied(node, 2)
    # The control plane's row goes back to generation 1, validly signed: a restored backup.
    db = row(node)
    old = protocol.DesiredState(generation=1, issued_at=timezone.now() - dt.timedelta(days=1),
                                **services.desired_state_content(db))
    signed = signing.sign_desired_state(old, keys.signing_key())
    DesiredState.objects.filter(node=db).update(generation=1, payload=signed.payload, signature=signed.signature,
                                                key_fingerprint=signed.key_fingerprint)
    wait_until(lambda: refusals(node), what=f"the refusal in the audit trail\n{node.log_text()}")
    [refusal] = refusals(node)
    assert refusal == {"generation": 1, "reason": "lower than applied 2", "at": refusal["at"]}
    assert "refused desired state generation=1: lower than applied 2" in node.log_text()
    status = node.status()
    assert status["applied_generation"] == 2 and status["desired_state"]["labels"] == {"line": "1"}
    assert row(node).applied_generation == 2


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

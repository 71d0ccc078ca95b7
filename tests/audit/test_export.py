"""The auditor's export and the proof downloads, checked by the standalone verifier as an auditor runs it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from audit import checkpoints
from audit.log_key import log_key
from audit.log_models import NodeLogEntry, TreeNode
from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import notes, signing
from edge_runtime.audit import node_log_origin
from edge_runtime.audit_inclusion import verify_inclusion_document
from sites import services
from sites.models import Site
from tests.audit.test_witness import Node
from tests.models_registry.helpers import make_node

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("audit_dirs")]


def registered_node(site: Site, name: str, entries: int) -> Node:
    """A node of ``site`` with its identity key registered, whose log of ``entries`` was uploaded and cosigned."""
    row, _ = make_node(site, name)
    node = Node()
    node.uuid, node.site = row.uuid, site.uuid
    row.identity_key = base64.b64encode(signing.public_key_raw(node.key.public_key())).decode()
    row.save(update_fields=["identity_key"])
    node.origin = node_log_origin(str(row.uuid))
    node.log(entries)
    assert node.sync().state == "ok"
    return node


@pytest.fixture
def estate(site_berlin: Site, site_ohio: Site) -> dict[str, Node]:
    for site in (site_berlin, site_ohio):
        services.token_create(actor=Actor.system("test"), site=site)
    nodes = {"berlin": registered_node(site_berlin, "gw-1", 12), "ohio": registered_node(site_ohio, "gw-2", 5)}
    nodes["berlin"].log(4)
    assert nodes["berlin"].sync().state == "ok"
    checkpoints.checkpoint_take()
    return nodes


def audit_verify(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Nothing but the edge runtime: no settings, no database, no network.
    return subprocess.run([sys.executable, "-m", "edge_runtime", "audit-verify", *args], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)


def export(path: Path) -> str:
    """``manage.py audit_export PATH``; what it printed."""
    buffer = StringIO()
    call_command("audit_export", str(path), stdout=buffer)
    return buffer.getvalue()


def raw(sql: str, params: list[Any]) -> None:
    """What a database superuser can do: past the append-only querysets and triggers, straight to the table."""
    table = sql.split()[1]
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        cursor.execute(sql, params)
        cursor.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")


def test_an_honest_export_verifies_standalone_against_the_control_planes_key(estate: dict[str, Node],
                                                                             tmp_path: Path) -> None:
    bundle = tmp_path / "estate.zip"
    printed = export(bundle)
    vkey = log_key().vkey
    assert "node logs: 2, 21 entries" in printed and vkey in printed
    result = audit_verify(str(bundle), "--vkey", vkey, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
    assert any(str(estate["berlin"].uuid) in name for name in names)
    assert any(str(estate["ohio"].uuid) in name for name in names)
    # The export is itself in the trail: who, and what it held.
    event = AuditEvent.objects.get(action="audit.export")
    assert event.actor == "audit_export" and event.after["node_entries"] == 21


def test_the_verifier_refuses_the_honest_export_against_another_key(estate: dict[str, Node], tmp_path: Path) -> None:
    bundle = tmp_path / "estate.zip"
    export(bundle)
    other = notes.vkey(log_key().name, signing.generate_private_key().public_key())
    result = audit_verify(str(bundle), "--vkey", other, cwd=tmp_path)
    assert result.returncode != 0 and "another key" in result.stdout + result.stderr


def test_it_refuses_to_export_a_control_plane_record_changed_after_it_was_logged(estate: dict[str, Node],
                                                                                tmp_path: Path) -> None:
    event = AuditEvent.objects.filter(action="token.create").order_by("seq").first()
    assert event is not None
    raw("UPDATE audit_auditevent SET actor = 'mallory' WHERE id = %s", [event.pk])
    bundle = tmp_path / "estate.zip"
    with pytest.raises(CommandError, match=rf"event #{event.seq}, token.create\) does not match the leaf"):
        export(bundle)
    assert not bundle.exists()


def test_it_refuses_to_export_a_node_entry_changed_after_it_was_stored(estate: dict[str, Node],
                                                                      tmp_path: Path) -> None:
    node = estate["ohio"]
    raw("UPDATE audit_nodelogentry SET detail = '{\"n\":\"forged\"}' WHERE node_uuid = %s AND seq = 3", [node.uuid])
    bundle = tmp_path / "estate.zip"
    with pytest.raises(CommandError, match=rf"entry #3 of node {node.uuid}'s log does not match"):
        export(bundle)
    assert not bundle.exists()


def test_a_node_entry_rewritten_with_its_stored_leaf_is_caught_by_the_verifier(estate: dict[str, Node],
                                                                              tmp_path: Path) -> None:
    node = estate["berlin"]
    forged = NodeLogEntry.objects.get(node_uuid=node.uuid, seq=7)
    entry = node.entries[6].model_copy(update={"detail": '{"n":"forged"}'})
    raw("UPDATE audit_nodelogentry SET detail = %s WHERE id = %s", [entry.detail, forged.pk])
    raw("UPDATE audit_treenode SET hash = %s WHERE log = %s AND level = 0 AND index = 6",
        [entry.leaf_hash(), str(node.uuid)])
    assert bytes(TreeNode.objects.get(log=str(node.uuid), level=0, index=6).hash) == entry.leaf_hash()
    bundle = tmp_path / "estate.zip"
    export(bundle)  # the records agree with each other; only the signed checkpoints can tell
    result = audit_verify(str(bundle), "--vkey", log_key().vkey, cwd=tmp_path)
    assert result.returncode != 0
    assert str(node.uuid) in result.stdout + result.stderr


def new_identity_key(node: Node) -> None:
    """The node makes a new identity key and an operator accepts it (the registered key changes)."""
    from sites.models import Node as NodeRow
    node.key = signing.generate_private_key()
    row = NodeRow.objects.get(uuid=node.uuid)
    row.identity_key = base64.b64encode(signing.public_key_raw(node.key.public_key())).decode()
    row.save(update_fields=["identity_key"])


def test_a_node_whose_key_was_replaced_exports_with_the_checkpoints_of_its_current_key(estate: dict[str, Node],
                                                                                      tmp_path: Path) -> None:
    node = estate["ohio"]
    new_identity_key(node)
    node.log(3)
    assert node.sync().state == "ok"
    checkpoints.checkpoint_take()
    bundle = tmp_path / "estate.zip"
    printed = export(bundle)
    assert f"node {node.uuid}: 1 checkpoints signed with an earlier identity key left out" in printed
    result = audit_verify(str(bundle), "--vkey", log_key().vkey, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_refuses_a_node_with_no_checkpoint_under_its_registered_key_yet(estate: dict[str, Node],
                                                                          tmp_path: Path) -> None:
    node = estate["ohio"]
    new_identity_key(node)  # and the node has not synced since
    bundle = tmp_path / "estate.zip"
    with pytest.raises(CommandError, match=rf"no cosigned checkpoint of node {node.uuid}'s log verifies with the "
                                           "node's registered identity key"):
        export(bundle)
    assert not bundle.exists()


def test_the_command_never_overwrites_a_file(estate: dict[str, Node], tmp_path: Path) -> None:
    existing = tmp_path / "estate.zip"
    existing.write_text("keep me")
    with pytest.raises(CommandError, match="exists"):
        export(existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(CommandError, match="is not a directory"):
        export(tmp_path / "missing" / "estate.zip")


def test_the_console_export_is_for_estate_wide_auditors_only_and_is_audited(estate: dict[str, Node], client: Client,
                                                                            admin_user: Any, operator: Any,
                                                                            tmp_path: Path) -> None:
    url = reverse("audit:export")
    assert client.get(url).status_code == 302  # to the login page
    client.force_login(operator)
    assert client.get(url).status_code == 403
    assert not AuditEvent.objects.filter(action="audit.export").exists()
    assert "Export the estate" not in client.get(reverse("audit:event-list")).content.decode()
    client.force_login(admin_user)
    assert "Export the estate" in client.get(reverse("audit:event-list")).content.decode()
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].startswith('attachment; filename="edgewise-audit-')
    bundle = tmp_path / "download.zip"
    bundle.write_bytes(b"".join(response.streaming_content))  # type: ignore[attr-defined]
    result = audit_verify(str(bundle), "--vkey", log_key().vkey, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert AuditEvent.objects.get(action="audit.export").actor == "admin"


def test_an_events_inclusion_proof_downloads_from_its_page_and_verifies(estate: dict[str, Node], client: Client,
                                                                       admin_user: Any, tmp_path: Path) -> None:
    client.force_login(admin_user)
    event = AuditEvent.objects.filter(action="token.create").order_by("seq").first()
    assert event is not None
    page = client.get(reverse("audit:event-detail", args=[event.uuid])).content.decode()
    url = reverse("audit:event-proof", args=[event.uuid])
    assert url in page
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Disposition"].startswith("attachment;")
    proof = tmp_path / "event.proof.json"
    proof.write_bytes(response.content)
    result = audit_verify(str(proof), "--vkey", log_key().vkey, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The proof is of this event: another event's leaf in its place does not verify.
    document = json.loads(response.content)
    other = AuditEvent.objects.filter(action="token.create").order_by("seq").last()
    assert other is not None and other.pk != event.pk
    other_proof = json.loads(client.get(reverse("audit:event-proof", args=[other.uuid])).content)
    document["leaf_data"] = other_proof["leaf_data"]
    assert verify_inclusion_document(document, trusted_vkey=log_key().vkey).error is not None
    # Proof sizes stay within log2(n) hashes.
    assert len(other_proof["proof"]) <= max(1, (checkpoints.log_size() - 1).bit_length())


def test_an_event_not_yet_in_a_checkpoint_has_no_proof_yet(estate: dict[str, Node], client: Client,
                                                          admin_user: Any, site_berlin: Site) -> None:
    services.token_create(actor=Actor.system("test"), site=site_berlin)
    event = AuditEvent.objects.order_by("-seq").first()
    assert event is not None
    client.force_login(admin_user)
    assert "after the next checkpoint" in client.get(reverse("audit:event-detail", args=[event.uuid])).content.decode()
    response = client.get(reverse("audit:event-proof", args=[event.uuid]))
    assert response.status_code == 409 and "not in a signed checkpoint yet" in response.content.decode()
    checkpoints.checkpoint_take()
    assert client.get(reverse("audit:event-proof", args=[event.uuid])).status_code == 200


def test_a_node_entrys_proof_is_trusted_through_the_control_planes_cosignature(estate: dict[str, Node],
                                                                              client: Client, admin_user: Any,
                                                                              tmp_path: Path) -> None:
    node = estate["berlin"]
    client.force_login(admin_user)
    page = client.get(reverse("audit:node-entry", args=[node.uuid, 9])).content.decode()
    url = reverse("audit:node-entry-proof", args=[node.uuid, 9])
    assert url in page
    response = client.get(url)
    assert response.status_code == 200, response.content
    proof = tmp_path / "entry.proof.json"
    proof.write_bytes(response.content)
    result = audit_verify(str(proof), "--vkey", log_key().vkey, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(response.content)
    assert document["entry"]["seq"] == 9 and document["index"] == 8
    # The node's checkpoint without the control plane's cosignature is not trusted through the control plane's key.
    document["checkpoint"] = "\n".join(line for line in document["checkpoint"].split("\n")
                                       if not line.startswith(f"\u2014 {log_key().name} ")) + "\n"
    assert verify_inclusion_document(document, trusted_vkey=log_key().vkey).error is not None


def test_a_node_entrys_proof_is_shown_only_to_whoever_may_see_its_site(estate: dict[str, Node], client: Client,
                                                                      operator: Any) -> None:
    client.force_login(operator)  # an operator of the EU region: Berlin, not Ohio
    assert client.get(reverse("audit:node-entry-proof", args=[estate["berlin"].uuid, 2])).status_code == 200
    assert client.get(reverse("audit:node-entry-proof", args=[estate["ohio"].uuid, 2])).status_code == 404

"""Rewrites of the control plane's audit log by a database superuser, each detected against an earlier anchor.

The attacker works past the application with raw SQL and the triggers
disabled, as a PostgreSQL superuser can; they hold no log key, so they
cannot sign a checkpoint. Each test keeps a copy of the anchor file taken
before the rewrite, as an auditor would elsewhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from audit import anchors
from audit.checkpoints import checkpoint_take
from audit.log_key import log_key
from audit.log_models import CONTROL_PLANE_LOG
from audit.models import AuditEvent, AuditLogLeaf
from audit.services import Actor, audit_record, audit_verify
from audit.verify import VerifyReport
from edge_runtime import merkle, notes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("audit_dirs")]
TABLES = ("audit_auditevent", "audit_auditlogleaf", "audit_auditcheckpoint")


def superuser(sql: str, *params: object) -> None:
    """Run ``sql`` as a superuser would: with the append-only triggers off."""
    with connection.cursor() as cursor:
        # The test's open transaction still holds deferred foreign-key checks, which ALTER TABLE would refuse.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        for table in TABLES:
            cursor.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        cursor.execute(sql, params)
        for table in TABLES:
            cursor.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")


def record(count: int, label: str) -> None:
    with transaction.atomic():
        for i in range(count):
            audit_record(actor=Actor.system("test"), action=f"test.{label}", object_repr=f"{label} {i}",
                         after={"i": i, "label": label})


@pytest.fixture
def kept(tmp_path: Path, django_capture_on_commit_callbacks: Any) -> Path:
    """A log of 20 records with checkpoints at 12 and 20, and a copy of its anchor file kept elsewhere."""
    record(12, "first")
    with django_capture_on_commit_callbacks(execute=True):  # the anchor is written once the checkpoint commits
        checkpoint_take()
    record(8, "second")
    with django_capture_on_commit_callbacks(execute=True):
        checkpoint_take()
    copy = tmp_path / "kept-anchor.log"
    shutil.copy(anchors.anchor_path(), copy)
    return copy


def verify(kept: Path) -> VerifyReport:
    report = audit_verify(anchor_files=[kept])
    assert not report.ok, "the rewrite was not detected"
    return report


def seq_at(position: int) -> int:
    return int(AuditLogLeaf.objects.get(position=position).event.seq)


def rebuild_tree() -> None:
    """Recompute every leaf and every subtree hash from the (rewritten) records, as a thorough attacker would."""
    superuser("DELETE FROM audit_treenode WHERE log = %s", CONTROL_PLANE_LOG)
    frontier = merkle.Frontier()
    rows = AuditLogLeaf.objects.order_by("position").values_list("position", "event_id")
    for position, event_id in rows:
        event = AuditEvent.objects.get(id=event_id)
        leaf = merkle.leaf_hash(event.leaf_data())
        superuser("UPDATE audit_auditevent SET hash = %s WHERE id = %s", event.compute_hash(), event_id)
        superuser("UPDATE audit_auditlogleaf SET leaf = %s WHERE position = %s", leaf, position)
        for (level, index), digest in frontier.append(leaf):
            superuser("INSERT INTO audit_treenode (log, level, index, hash) VALUES (%s, %s, %s, %s)",
                      CONTROL_PLANE_LOG, level, index, digest)
    superuser("UPDATE audit_auditcheckpoint SET root = %s WHERE size = %s", frontier.root().hex(), frontier.size)


def test_it_passes_an_untouched_log_against_its_anchor(kept: Path) -> None:
    report = audit_verify(anchor_files=[kept])
    assert report.ok, report.problems
    assert report.checked == 20 and report.size == 20 and report.checkpoints == 4


def test_it_names_an_edited_record(kept: Path) -> None:
    seq = seq_at(3)
    superuser("UPDATE audit_auditevent SET actor = 'mallory' WHERE seq = %s", seq)
    report = verify(kept)
    altered = report.first("altered")
    assert altered is not None and (altered.position, altered.seq) == (3, seq)
    assert f"position 3 (seq {seq}): its content does not match its hash" in altered.message
    with pytest.raises(CommandError, match=rf"altered: position 3 \(seq {seq}\)"):
        call_command("audit_verify", "--anchor", str(kept))


def test_it_names_a_deleted_record(kept: Path) -> None:
    event_id = AuditLogLeaf.objects.get(position=5).event_id
    superuser("DELETE FROM audit_auditlogleaf WHERE position = 5")
    superuser("DELETE FROM audit_auditevent WHERE id = %s", event_id)
    report = verify(kept)
    missing = report.first("missing")
    assert missing is not None and missing.position == 5 and "the record is missing" in missing.message


def test_it_names_an_inserted_record(kept: Path) -> None:
    event = AuditEvent.objects.get(seq=seq_at(2))
    superuser("INSERT INTO audit_auditevent (seq, uuid, created_at, actor_type, actor, action, object_type, "
              "object_id, object_repr, before, after, prev_hash, hash) VALUES (%s, gen_random_uuid(), %s, 'user', "
              "'mallory', 'role.grant', '', '', 'forged', NULL, NULL, '', %s)",
              event.seq * 1000, event.created_at, "f" * 64)
    report = verify(kept)
    inserted = report.first("inserted")
    assert inserted is not None and inserted.seq == event.seq * 1000 and "inserted" in inserted.message


def test_it_names_reordered_records(kept: Path) -> None:
    superuser("UPDATE audit_auditlogleaf SET position = -1 WHERE position = 6")
    superuser("UPDATE audit_auditlogleaf SET position = 6 WHERE position = 7")
    superuser("UPDATE audit_auditlogleaf SET position = 7 WHERE position = -1")
    report = verify(kept)
    moved = [p.position for p in report.problems if p.kind == "moved"]
    assert moved == [6, 7], report.problems
    rewritten = report.first("rewritten")
    assert rewritten is not None and "among positions 0..11" in rewritten.message


def test_it_names_a_truncated_tail(kept: Path) -> None:
    superuser("DELETE FROM audit_auditcheckpoint WHERE size > 12")
    superuser("DELETE FROM audit_treenode WHERE log = %s AND index >= 12 AND level = 0", CONTROL_PLANE_LOG)
    doomed = list(AuditLogLeaf.objects.filter(position__gte=15).values_list("event_id", flat=True))
    superuser("DELETE FROM audit_auditlogleaf WHERE position >= 15")
    superuser("DELETE FROM audit_auditevent WHERE id = ANY(%s)", doomed)
    report = verify(kept)
    tail = report.first("tail")
    assert tail is not None and "ends at 15 records" in tail.message and "15..19" in tail.message
    removed = report.first("checkpoint")
    assert removed is not None and "size 20" in removed.message


@pytest.mark.parametrize("checkpoints", ["edited", "deleted"])
def test_it_detects_a_rewrite_with_every_hash_recomputed(kept: Path, checkpoints: str) -> None:
    seq = seq_at(14)
    superuser("UPDATE audit_auditevent SET actor = 'mallory' WHERE seq = %s", seq)
    rebuild_tree()
    if checkpoints == "deleted":
        superuser("DELETE FROM audit_auditcheckpoint")
    report = verify(kept)
    assert report.first("altered") is None and report.first("moved") is None and report.first("tree") is None
    rewritten = report.first("rewritten")
    assert rewritten is not None, report.problems
    assert "root at size 20" in rewritten.message and "among positions 12..19" in rewritten.message
    assert "agrees with its checkpoints up to size 12" in rewritten.message
    if checkpoints == "edited":
        changed = report.first("signature")
        assert changed is not None and "the row was changed" in changed.message


def test_it_detects_a_truncate_table(kept: Path) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("TRUNCATE audit_auditpending, audit_auditlogleaf, audit_auditcheckpoint, audit_auditevent")
        cursor.execute("DELETE FROM audit_treenode WHERE log = %s", [CONTROL_PLANE_LOG])
    report = verify(kept)
    truncated = report.first("truncated")
    assert truncated is not None and "the log is empty" in truncated.message and "TRUNCATE" in truncated.message
    with pytest.raises(CommandError, match="TRUNCATE"):
        call_command("audit_verify", "--anchor", str(kept))


def test_it_refuses_an_anchor_whose_signature_fails(kept: Path, tmp_path: Path) -> None:
    data = kept.read_text()
    first_note = anchors.anchors_read(kept, [log_key().vkey])[0].note
    assert first_note in data
    bad = tmp_path / "bad.log"
    anchors.anchor_write(bad, [first_note.replace("\n12\n", "\n13\n", 1)], log_key().vkey)
    report = verify(bad)
    failed = report.first("signature")
    assert failed is not None and "does not verify" in failed.message


def test_it_names_a_fork(kept: Path, tmp_path: Path) -> None:
    key = log_key()
    other = notes.sign_note(notes.Checkpoint(key.name, 12, b"\x07" * 32).body(), key.name, key.private)
    fork = tmp_path / "fork.log"
    anchors.anchor_write(fork, [other], key.vkey)
    report = verify(fork)
    found = report.first("fork")
    assert found is not None and found.message.startswith("fork at size 12:")

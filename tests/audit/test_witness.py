"""The control plane as the witness of a node's audit log: what it takes, cosigns, flags and verifies.

The node here is built from the protocol's parts (a Merkle tree, a signed
checkpoint, the two proofs), so that each test can make it honest or not.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from audit import checkpoints
from audit.log_models import NodeLog, NodeLogCheckpoint, NodeLogEntry, NodeLogState, TreeNode
from audit.models import AuditEvent
from audit.node_verify import node_logs_verify
from audit.witness import node_heads_record, node_log_ingest
from edge_runtime import merkle, notes, protocol
from edge_runtime.audit import node_log_origin
from edge_runtime.protocol.audit import encode_proof, entry_chain_hash

pytestmark = pytest.mark.django_db(transaction=True)


class Node:
    """A node's log as the protocol describes it, and the uploads it makes."""

    def __init__(self) -> None:
        self.uuid, self.site = uuid.uuid4(), uuid.uuid4()
        self.key = Ed25519PrivateKey.generate()
        self.origin = node_log_origin(str(self.uuid))
        self.entries: list[protocol.LogEntry] = []
        self.stored = 0
        self.cosigned_size = 0

    def log(self, count: int, action: str = "query.answered") -> None:
        for _ in range(count):
            prev = entry_chain_hash(self.entries[-1].leaf_data()) if self.entries else "0" * 64
            self.entries.append(protocol.LogEntry(seq=len(self.entries) + 1, at="2026-12-03T10:00:00+00:00",
                                                  action=action, detail=f'{{"n":{len(self.entries)}}}',
                                                  prev_hash=prev))

    def rewrite(self, seq: int) -> None:
        old = self.entries[seq - 1]
        self.entries[seq - 1] = old.model_copy(update={"detail": '{"n":"forged"}'})

    def upload(self, *, start: int | None = None, batch: int = protocol.AUDIT_BATCH_MAX,
               key: Ed25519PrivateKey | None = None) -> protocol.AuditUpload:
        tree = merkle.MemoryTree(e.leaf_hash() for e in self.entries)
        size = tree.size
        start = self.stored if start is None else start
        sent = self.entries[start:start + batch]
        checkpoint = notes.Checkpoint(self.origin, size, tree.root())
        return protocol.AuditUpload(
            checkpoint=notes.sign_note(checkpoint.body(), self.origin, key or self.key),
            cosigned_size=self.cosigned_size,
            proof_from_cosigned=encode_proof(merkle.consistency_proof(tree, self.cosigned_size, size)),
            start=start, entries=sent,
            proof_from_batch=encode_proof(merkle.consistency_proof(tree, start + len(sent), size)))

    def sync(self, upload: protocol.AuditUpload | None = None, *, key_mismatch: bool = False,
             registered: bool = True) -> protocol.AuditAck:
        with transaction.atomic():
            ack = node_log_ingest(node_uuid=self.uuid, site_uuid=self.site,
                                  public_key=self.key.public_key() if registered else None,
                                  key_mismatch=key_mismatch, upload=upload or self.upload())
        if ack.state == "ok":
            self.stored, self.cosigned_size = ack.stored, ack.cosigned_size
        return ack


def stored_details(node: Node) -> list[str]:
    return list(NodeLogEntry.objects.filter(node_uuid=node.uuid).order_by("seq").values_list("detail", flat=True))


def test_an_honest_node_is_stored_and_cosigned_sync_after_sync() -> None:
    node = Node()
    key = checkpoints.checkpoint_key()
    for count in (5, 0, 17):
        node.log(count)
        ack = node.sync()
        assert ack.state == "ok" and ack.stored == ack.cosigned_size == len(node.entries), ack.message
        note, checkpoint = notes.open_checkpoint(ack.cosigned, node.origin, node.key.public_key())
        assert checkpoint.size == len(node.entries)
        assert notes.verify_cosignature(note, key.name, key.public) > 0
    assert stored_details(node) == [e.detail for e in node.entries]
    assert list(NodeLogCheckpoint.objects.filter(node_uuid=node.uuid).values_list("size", flat=True)
                .order_by("size")) == [5, 22]
    # The stored tree proves any entry's inclusion in the cosigned checkpoint.
    from audit.trees import TreeStore
    proof = merkle.inclusion_proof(TreeStore(str(node.uuid)), 7, 22)
    assert merkle.verify_inclusion(7, 22, node.entries[7].leaf_hash(), proof,
                                   merkle.MemoryTree(e.leaf_hash() for e in node.entries).root())


def test_an_upload_sent_twice_is_stored_once() -> None:
    node = Node()
    node.log(8)
    upload = node.upload()
    assert node.sync(upload).state == "ok"
    # The answer was lost: the node sends the same entries again, and more.
    node.stored, node.cosigned_size = 0, 0
    node.log(3)
    ack = node.sync(node.upload(start=0))
    assert ack.state == "ok" and ack.stored == 11
    assert stored_details(node) == [e.detail for e in node.entries]


def test_a_long_offline_backlog_arrives_in_batches_each_cosigned() -> None:
    node = Node()
    node.log(2500)
    stored = []
    for _ in range(3):
        ack = node.sync(node.upload(batch=1000))
        assert ack.state == "ok", ack.message
        stored.append(ack.stored)
    assert stored == [1000, 2000, 2500]
    assert NodeLogEntry.objects.filter(node_uuid=node.uuid).count() == 2500
    assert node_logs_verify(checkpoints.checkpoint_key()).breaks == []


def forked_event(node: Node) -> AuditEvent:
    return AuditEvent.objects.get(action="node.audit_forked", after__node=str(node.uuid))


def test_a_log_that_shrank_is_flagged_forked_once_and_takes_nothing_more() -> None:
    node = Node()
    node.log(10)
    assert node.sync().state == "ok"
    node.entries = node.entries[:6]
    node.cosigned_size = node.stored = 6
    ack = node.sync(node.upload(start=6))
    assert ack.state == "forked" and "shrank" in ack.message
    log = NodeLog.objects.get(node_uuid=node.uuid)
    assert log.state == NodeLogState.FORKED and log.fork_evidence.startswith(node.origin + "\n6\n")
    assert "shrank" in forked_event(node).after["reason"]
    # Nothing more is taken, and the flag is raised once.
    node.log(5)
    assert node.sync(node.upload(start=10)).state == "forked"
    assert NodeLogEntry.objects.filter(node_uuid=node.uuid).count() == 10
    assert AuditEvent.objects.filter(action="node.audit_forked").count() == 1


def test_a_history_rewritten_after_a_cosigned_checkpoint_is_flagged_forked() -> None:
    node = Node()
    node.log(12)
    assert node.sync().state == "ok"
    node.rewrite(4)
    node.log(3)
    ack = node.sync()
    assert ack.state == "forked" and "does not extend the checkpoint of 12" in ack.message
    assert NodeLogEntry.objects.filter(node_uuid=node.uuid).count() == 12


def test_an_entry_sent_again_with_other_content_is_a_fork() -> None:
    node = Node()
    node.log(6)
    assert node.sync().state == "ok"
    node.log(2)
    # An honest checkpoint and proofs, but the third entry, already stored, sent again changed.
    upload = node.upload(start=0)
    entries = list(upload.entries)
    entries[2] = entries[2].model_copy(update={"detail": '{"n":"forged"}'})
    ack = node.sync(upload.model_copy(update={"entries": entries}))
    assert ack.state == "forked" and "entry #3 differs" in ack.message


def test_entries_that_are_not_the_checkpoints_are_refused_as_a_fork_and_none_is_stored() -> None:
    node = Node()
    node.log(4)
    upload = node.upload()
    other = Node()
    other.log(4)
    # The checkpoint and proofs of one history, the entries of another.
    ack = node.sync(upload.model_copy(update={"entries": [e.model_copy(update={"detail": '{"x":1}'})
                                                          for e in upload.entries]}))
    assert ack.state == "forked" and "are not the first 4" in ack.message
    assert NodeLogEntry.objects.filter(node_uuid=node.uuid).count() == 0
    assert not TreeNode.objects.filter(log=str(node.uuid)).exists()


@pytest.mark.parametrize("case", ["other key", "no key", "mismatch", "gap", "unknown cosigned size"])
def test_uploads_that_cannot_be_taken_say_why_and_change_nothing(case: str) -> None:
    node = Node()
    node.log(5)
    assert node.sync().state == "ok"
    node.log(5)
    expected = {"other key": ("refused", "does not verify"), "no key": ("no_identity_key", "no identity key"),
                "mismatch": ("identity_key_mismatch", "another identity key"),
                "gap": ("refused", "send from #6"), "unknown cosigned size": ("refused", "never cosigned")}[case]
    if case == "other key":
        ack = node.sync(node.upload(key=Ed25519PrivateKey.generate()))
    elif case == "no key":
        ack = node.sync(registered=False)
    elif case == "mismatch":
        ack = node.sync(key_mismatch=True)
    elif case == "gap":
        ack = node.sync(node.upload(start=7))
    else:
        node.cosigned_size = 7
        ack = node.sync()
    assert (ack.state, ack.stored) == (expected[0], 5) and expected[1] in ack.message
    assert NodeLogEntry.objects.filter(node_uuid=node.uuid).count() == 5
    assert NodeLog.objects.get(node_uuid=node.uuid).state == NodeLogState.OK


# -- verifying what is stored -----------------------------------------------------------------------------------------

def witnessed(count: int = 30) -> Node:
    node = Node()
    node.log(count // 2)
    assert node.sync().state == "ok"
    node.log(count - count // 2)
    assert node.sync().state == "ok"
    with transaction.atomic():
        assert node_heads_record() == 1
    return node


def superuser(sql: str, *params: object) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_an_untouched_node_log_verifies() -> None:
    node = witnessed()
    report = node_logs_verify(checkpoints.checkpoint_key())
    assert (report.breaks, report.entries, report.logs) == ([], 30, 1)
    heads = AuditEvent.objects.get(action="audit.node_heads").after["heads"]
    assert heads[str(node.uuid)][0] == 30


TAMPERING = {
    "edit": ("UPDATE audit_nodelogentry SET detail = '{\"n\":\"x\"}' WHERE node_uuid = %(node)s AND seq = 9",
             "entry #9 does not match its leaf hash"),
    "delete": ("DELETE FROM audit_nodelogentry WHERE node_uuid = %(node)s AND seq = 9", "entry #9 is missing"),
    "insert": ("UPDATE audit_nodelogentry SET seq = seq + 1000 WHERE node_uuid = %(node)s AND seq >= 20; "
               "UPDATE audit_nodelogentry SET seq = seq - 999 WHERE node_uuid = %(node)s AND seq > 1000; "
               "INSERT INTO audit_nodelogentry (node_uuid, site_uuid, seq, at, created_at, action, detail, prev_hash, "
               "received_at) SELECT node_uuid, site_uuid, 20, at, created_at, 'role.grant', detail, prev_hash, "
               "received_at FROM audit_nodelogentry WHERE node_uuid = %(node)s AND seq = 19",
               "entry #20 does not match its leaf hash"),
    "reorder": ("UPDATE audit_nodelogentry SET seq = CASE seq WHEN 4 THEN 5 ELSE 4 END "
                "WHERE node_uuid = %(node)s AND seq IN (4, 5)", "entry #4 does not match its leaf hash"),
    "truncate the tail": ("DELETE FROM audit_nodelogentry WHERE node_uuid = %(node)s AND seq > 25",
                          "its tail is missing"),
    "truncate the table": ("TRUNCATE audit_nodelogentry", "its tail is missing"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_each_rewrite_of_a_stored_node_log_is_named(case: str) -> None:
    node = witnessed()
    sql, message = TAMPERING[case]
    if case == "reorder":
        superuser("ALTER TABLE audit_nodelogentry DROP CONSTRAINT audit_nodelogentry_unique")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, None if "TRUNCATE" in sql else {"node": node.uuid})
        breaks = node_logs_verify(checkpoints.checkpoint_key()).breaks
        assert len(breaks) == 1 and breaks[0].node_uuid == str(node.uuid) and message in breaks[0].reason, breaks
    finally:
        if case == "reorder":  # the schema outlives this test's rows: put the constraint back
            superuser("DELETE FROM audit_nodelogentry")
            superuser("ALTER TABLE audit_nodelogentry ADD CONSTRAINT audit_nodelogentry_unique UNIQUE (node_uuid, seq)")


def test_a_rewrite_that_recomputes_every_hash_and_row_still_differs_from_the_control_planes_log() -> None:
    node = witnessed()
    node.rewrite(9)
    forged = node.entries[8]
    tree = merkle.MemoryTree(e.leaf_hash() for e in node.entries)
    superuser("UPDATE audit_nodelogentry SET detail = %s WHERE node_uuid = %s AND seq = 9", forged.detail, node.uuid)
    for (level, index), digest in tree.nodes((lvl, i) for lvl in range(6) for i in range(32)).items():
        superuser("UPDATE audit_treenode SET hash = %s WHERE log = %s AND level = %s AND index = %s",
                  digest, str(node.uuid), level, index)
    # Without the audit log key no cosigned note can be forged: the rows go, roots and all.
    superuser("DELETE FROM audit_nodelogcheckpoint WHERE node_uuid = %s", node.uuid)
    superuser("UPDATE audit_nodelog SET cosigned_root = %s WHERE node_uuid = %s", tree.root().hex(), node.uuid)
    breaks = node_logs_verify(checkpoints.checkpoint_key()).breaks
    assert len(breaks) == 1 and "do not make the cosigned checkpoint of 30 entries" in breaks[0].reason, breaks


def test_a_checkpoint_row_changed_without_its_cosigned_note_is_named() -> None:
    witnessed()
    superuser("UPDATE audit_nodelogcheckpoint SET root = %s WHERE size = 30", "ab" * 32)
    breaks = node_logs_verify(checkpoints.checkpoint_key()).breaks
    assert any("the row was altered" in b.reason for b in breaks), breaks


@pytest.mark.usefixtures("audit_dirs")
def test_audit_verify_checks_the_nodes_cosignatures_with_the_pinned_key_not_the_key_file(settings: Any,
                                                                                        tmp_path: Path) -> None:
    witnessed()
    checkpoints.checkpoint_take()
    pinned = checkpoints.checkpoint_key().vkey
    out = io.StringIO()
    call_command("audit_verify", "--vkey", pinned, "--no-anchor-dir", stdout=out)
    assert "30 entries of 1 node logs verified" in out.getvalue()
    # A key file swapped for another: with the pinned key, what it cosigned would not pass.
    other = notes.vkey(checkpoints.checkpoint_key().name, Ed25519PrivateKey.generate().public_key())
    out = io.StringIO()
    call_command("audit_verify", "--vkey", other, "--vkey", pinned, "--no-anchor-dir", stdout=out)
    assert "30 entries of 1 node logs verified" in out.getvalue()  # any pinned key (a rotation) is taken
    with pytest.raises(CommandError, match="the cosigned checkpoint of 15 entries does not verify"):
        call_command("audit_verify", "--vkey", other, "--no-anchor-dir", stdout=io.StringIO())

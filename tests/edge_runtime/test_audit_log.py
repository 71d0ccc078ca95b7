"""The node's audit log as a Merkle log: its tree, its upgrade, its upload and what it keeps of the answer."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import merkle, notes, signing
from edge_runtime.audit import NodeAudit, event_hash, node_log_origin
from edge_runtime.audit_upload import AuditError
from edge_runtime.protocol.audit import (
    AUDIT_BATCH_BYTES,
    AUDIT_BATCH_MAX,
    AuditAck,
    AuditUpload,
    LogEntry,
    decode_proof,
)

ORIGIN = node_log_origin("7d3c1f5e-0000-4000-8000-000000000001")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return signing.generate_private_key()


@pytest.fixture
def witness_key() -> Ed25519PrivateKey:
    return signing.generate_private_key()


def leaves(log: NodeAudit) -> list[bytes]:
    """The leaf hashes of every event, recomputed from the events (not from the tree table)."""
    found = []
    with sqlite3.connect(log.path) as conn:
        for seq, at, action, detail, prev_hash in conn.execute(
                "SELECT seq, at, action, detail, prev_hash FROM events ORDER BY seq"):
            found.append(LogEntry(seq=seq, at=at, action=action, detail=detail, prev_hash=prev_hash).leaf_hash())
    return found


def filled(path: Path, count: int, *, pad: int = 0) -> NodeAudit:
    log = NodeAudit(path)
    for i in range(count):
        log.append("query.answered", {"i": i, "pad": "x" * pad}, durable=False)
    return log


def opened(upload: AuditUpload, key: Ed25519PrivateKey) -> notes.Checkpoint:
    _, checkpoint = notes.open_checkpoint(upload.checkpoint, ORIGIN, key.public_key())
    return checkpoint


def cosign(upload: AuditUpload, witness_key: Ed25519PrivateKey) -> str:
    return notes.add_cosignature(upload.checkpoint, "edgewise/control-plane", witness_key, 1_700_000_000)


def test_its_tree_is_the_merkle_tree_of_its_events_after_many_appends(tmp_path: Path) -> None:
    log = NodeAudit(tmp_path / "audit.sqlite3")
    reference = merkle.MemoryTree()
    for i in range(1, 71):
        log.append("query.answered", {"i": i}, durable=False)
        reference.append(leaves(log)[-1])
        if i in (1, 2, 3, 7, 8, 33, 64, 70):
            assert log.root() == reference.root(), f"root after {i} appends"
    assert [log.root(size) for size in range(71)] == [reference.root(size) for size in range(71)]
    size, proof = log.inclusion_proof(5)
    assert size == 70 and merkle.verify_inclusion(4, 70, reference.levels[0][4], proof, reference.root())
    with pytest.raises(ValueError, match="#71 is not in"):
        log.inclusion_proof(71)


_APPENDER = """
import sys
from pathlib import Path
from edge_runtime.audit import NodeAudit
log = NodeAudit(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.append("query.received", {"writer": sys.argv[2], "i": i}, durable=False)
"""


def test_it_keeps_one_tree_when_two_processes_append_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    NodeAudit(path)
    writers = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), name, "120"], cwd=ROOT)
               for name in ("agent", "server")]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    log = NodeAudit(path)
    assert log.verify() == (240, None)
    details = [e.detail["writer"] for e in log.events_after(0, limit=1000)]
    assert details.count("agent") == details.count("server") == 120
    assert log.root() == merkle.MemoryTree(leaves(log)).root()


_OLD_SCHEMA = """
CREATE TABLE events (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL,
                     prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
"""


def old_format_log(path: Path, count: int) -> None:
    """A log file as the runtime before the Merkle tree wrote it: the events and the head, nothing else."""
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
        prev = "0" * 64
        for seq in range(1, count + 1):
            at, detail = f"2025-01-01T00:00:{seq % 60:02d}.000000+00:00", json.dumps({"n": seq})
            digest = event_hash(seq=seq, at=at, action="policy.applied", detail_json=detail, prev_hash=prev)
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                         (seq, at, "policy.applied", detail, prev, digest))
            prev = digest
        conn.execute("INSERT INTO head VALUES (1, ?, ?)", (count, prev))


def test_it_upgrades_a_log_written_before_the_tree_once_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    old_format_log(path, 37)
    log = NodeAudit(path)
    assert log.verify() == (37, None)
    assert log.root() == merkle.MemoryTree(leaves(log)).root()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM tree").fetchone()[0]
    NodeAudit(path)  # opened again: nothing to build
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tree").fetchone()[0] == rows
    log.append("query.answered", {"after": "upgrade"})
    assert log.root() == merkle.MemoryTree(leaves(log)).root() and log.size() == 38


def test_it_refuses_to_open_an_old_log_with_a_record_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    old_format_log(path, 9)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 4")
    with pytest.raises(AuditError, match="lacks record #4"):
        NodeAudit(path)


def test_its_upload_carries_a_signed_checkpoint_and_proofs_that_verify(tmp_path: Path,
                                                                       key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 21)
    upload = log.upload(key, ORIGIN)
    checkpoint = opened(upload, key)
    reference = merkle.MemoryTree(leaves(log))
    assert (checkpoint.origin, checkpoint.size, checkpoint.root) == (ORIGIN, 21, reference.root())
    assert upload.start == 0 and [e.seq for e in upload.entries] == list(range(1, 22))
    assert [e.leaf_hash() for e in upload.entries] == reference.levels[0]
    assert upload.cosigned_size == 0 and upload.proof_from_cosigned == [] and upload.proof_from_batch == []
    # The control plane holds 8 and cosigned a checkpoint of 8: both proofs are from there.
    with sqlite3.connect(log.path) as conn:
        conn.execute("UPDATE witness SET stored = 5, cosigned_size = 8")
    upload = log.upload(key, ORIGIN)
    assert upload.start == 5 and upload.entries[0].seq == 6 and upload.end == 21
    assert merkle.verify_consistency(8, 21, reference.root(8), reference.root(),
                                     decode_proof(upload.proof_from_cosigned))
    assert not merkle.verify_consistency(8, 21, reference.root(7), reference.root(),
                                         decode_proof(upload.proof_from_cosigned))


def test_its_batches_respect_both_limits_and_an_empty_one_still_carries_a_fresh_checkpoint(
        tmp_path: Path, key: Ed25519PrivateKey, witness_key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", AUDIT_BATCH_MAX + 30)
    reference = merkle.MemoryTree(leaves(log))
    first = log.upload(key, ORIGIN)
    assert len(first.entries) == AUDIT_BATCH_MAX
    assert merkle.verify_consistency(AUDIT_BATCH_MAX, reference.size, reference.root(AUDIT_BATCH_MAX),
                                     reference.root(), decode_proof(first.proof_from_batch))
    ack = AuditAck(stored=AUDIT_BATCH_MAX, cosigned_size=reference.size, cosigned=cosign(first, witness_key))
    assert log.acknowledge(first, ack) is None
    second = log.upload(key, ORIGIN)
    assert second.start == AUDIT_BATCH_MAX and len(second.entries) == 30 and second.proof_from_batch == []
    assert log.acknowledge(second, AuditAck(stored=second.end, cosigned_size=reference.size)) is None
    empty = log.upload(key, ORIGIN)
    assert empty.entries == [] and empty.start == reference.size
    assert opened(empty, key).size == reference.size
    # Large entries: the batch stops before AUDIT_BATCH_BYTES of JSON.
    big = filled(tmp_path / "big.sqlite3", 40, pad=15_000)
    batch = big.upload(key, ORIGIN)
    sent = sum(len(e.model_dump_json().encode()) + 1 for e in batch.entries)
    assert 0 < len(batch.entries) < 40 and sent <= AUDIT_BATCH_BYTES
    assert sent + 15_000 > AUDIT_BATCH_BYTES  # one more would not have fitted


def test_an_empty_upload_is_a_fresh_signature_of_the_current_log(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = NodeAudit(tmp_path / "audit.sqlite3")
    upload = log.upload(key, ORIGIN)
    assert upload.entries == [] and opened(upload, key) == notes.Checkpoint(ORIGIN, 0, merkle.EMPTY_ROOT)
    log.append("node.started", {})
    again = log.upload(key, ORIGIN)
    assert opened(again, key).size == 1 and [e.action for e in again.entries] == ["node.started"]


def test_acknowledge_moves_stored_and_keeps_the_cosigned_note_across_a_reopen(
        tmp_path: Path, key: Ed25519PrivateKey, witness_key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 12)
    upload = log.upload(key, ORIGIN)
    cosigned = cosign(upload, witness_key)
    assert log.acknowledge(upload, AuditAck(stored=12, cosigned_size=12, cosigned=cosigned)) is None
    reopened = NodeAudit(tmp_path / "audit.sqlite3").witness()
    assert (reopened.stored, reopened.cosigned_size, reopened.note_size, reopened.note) == (12, 12, 12, cosigned)
    assert reopened.note_root == merkle.MemoryTree(leaves(log)).root().hex()
    note = notes.parse_note(reopened.note)
    assert notes.verify_cosignature(note, "edgewise/control-plane", witness_key.public_key()) == 1_700_000_000
    # More than was sent is capped; a lower count (a control plane restored from a backup) is taken as it is.
    assert log.acknowledge(upload, AuditAck(stored=99, cosigned_size=99)) is None
    assert (log.witness().stored, log.witness().cosigned_size) == (12, 12)
    assert log.acknowledge(upload, AuditAck(stored=3, cosigned_size=0)) is None
    again = log.upload(key, ORIGIN)
    assert (again.start, again.cosigned_size, again.proof_from_cosigned) == (3, 0, [])
    assert (log.witness().note_size, log.witness().note) == (12, cosigned)  # the note received stays


def test_acknowledge_keeps_no_note_that_is_not_the_checkpoint_sent(
        tmp_path: Path, key: Ed25519PrivateKey, witness_key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 4)
    earlier = log.upload(key, ORIGIN)
    log.append("query.answered", {"i": 4})
    upload = log.upload(key, ORIGIN)
    problem = log.acknowledge(upload, AuditAck(stored=5, cosigned=cosign(earlier, witness_key)))
    assert problem is not None and "other than the one this node sent" in problem
    uncosigned = log.acknowledge(upload, AuditAck(stored=5, cosigned=upload.checkpoint))
    assert uncosigned is not None and "no cosignature" in uncosigned
    garbled = log.acknowledge(upload, AuditAck(stored=5, cosigned="not a note"))
    assert garbled is not None and "not a signed note" in garbled
    witness = log.witness()
    assert witness.stored == 5 and (witness.note_size, witness.note) == (0, "")


def test_acknowledge_changes_nothing_on_a_state_other_than_ok(tmp_path: Path, key: Ed25519PrivateKey,
                                                             witness_key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 3)
    upload = log.upload(key, ORIGIN)
    problem = log.acknowledge(upload, AuditAck(state="forked", stored=3, cosigned=cosign(upload, witness_key),
                                               message="the log of 3 does not extend the cosigned log of 5"))
    assert problem is not None and "forked" in problem and "cosigned log of 5" in problem
    assert log.witness() == NodeAudit(log.path).witness() and log.witness().stored == 0
    assert log.witness().note == ""
    # "refused" says where the control plane stands, so the next upload fits; it cosigned nothing.
    problem = log.acknowledge(upload, AuditAck(state="refused", stored=2, cosigned_size=1, message="send from #3"))
    assert problem is not None and "send from #3" in problem
    assert (log.witness().stored, log.witness().cosigned_size, log.witness().note) == (2, 1, "")
    assert log.upload(key, ORIGIN).start == 2


def test_a_log_rewritten_after_a_cosigned_checkpoint_cannot_prove_consistency(
        tmp_path: Path, key: Ed25519PrivateKey, witness_key: Ed25519PrivateKey) -> None:
    path = tmp_path / "audit.sqlite3"
    log = filled(path, 10)
    upload = log.upload(key, ORIGIN)
    log.acknowledge(upload, AuditAck(stored=10, cosigned_size=10, cosigned=cosign(upload, witness_key)))
    cosigned_root = bytes.fromhex(log.witness().note_root)
    # The node rewrites record 4 and everything after it: chain, tree and head recomputed, as a careful
    # forger with the file would.
    rows = [(e.seq, e.at, e.action, e.detail) for e in log.events_after(0)]
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    forged = NodeAudit(path)
    for seq, _, action, detail in rows:
        forged.append(action, {**detail, "i": "forged"} if seq == 4 else detail, durable=False)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE witness SET stored = 10, cosigned_size = 10")
    for _ in range(3):
        forged.append("query.answered", {"later": True})
    assert forged.verify() == (13, None)  # the local chain alone cannot tell
    upload = forged.upload(key, ORIGIN)
    checkpoint = opened(upload, key)
    assert not merkle.verify_consistency(10, checkpoint.size, cosigned_root, checkpoint.root,
                                         decode_proof(upload.proof_from_cosigned))


def test_a_log_cut_short_after_a_cosigned_checkpoint_says_so(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 6)
    with sqlite3.connect(log.path) as conn:
        conn.execute("UPDATE witness SET stored = 9, cosigned_size = 9")
    upload = log.upload(key, ORIGIN)
    assert opened(upload, key).size == 6 and upload.cosigned_size == 9 and upload.proof_from_cosigned == []
    assert upload.start == 6 and upload.entries == []


def test_an_upload_that_cannot_be_built_is_an_audit_error(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    log = filled(tmp_path / "audit.sqlite3", 5)
    with sqlite3.connect(log.path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 3")
    with pytest.raises(AuditError, match="upload cannot be built"):
        log.upload(key, ORIGIN)
    with pytest.raises(AuditError, match="no spaces"):
        log.upload(key, "an origin with spaces")

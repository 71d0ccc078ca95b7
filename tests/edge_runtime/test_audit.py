"""The node's audit chain: append-only, hash-chained, and any tampering is named by its record."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from edge_runtime.audit import GENESIS_HASH, NodeAudit


@pytest.fixture
def audit(tmp_path: Path) -> NodeAudit:
    log = NodeAudit.in_state_dir(tmp_path)
    for i in range(1, 6):
        log.append("query.answered" if i % 2 else "policy.applied", {"n": i, "note": f"event {i}"})
    return log


def raw(audit: NodeAudit, sql: str, *params: object) -> None:
    with sqlite3.connect(audit.path) as conn:
        conn.execute(sql, params)


def test_it_chains_each_event_to_the_one_before(audit: NodeAudit) -> None:
    events = audit.events_after(0)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert audit.verify() == (5, None)
    assert audit.head() == (5, events[-1].hash)
    assert [e.seq for e in audit.events_after(3, limit=1)] == [4]


def test_it_detects_an_altered_detail(audit: NodeAudit) -> None:
    raw(audit, "UPDATE events SET detail = ? WHERE seq = 3", json.dumps({"n": 3, "note": "nothing to see"}))
    checked, brk = audit.verify()
    assert checked == 2 and brk is not None and brk.seq == 3 and "altered" in brk.reason


def test_it_detects_an_altered_action_or_time(audit: NodeAudit) -> None:
    raw(audit, "UPDATE events SET at = '2000-01-01T00:00:00+00:00' WHERE seq = 2")
    assert audit.verify()[1] is not None and audit.verify()[1].seq == 2  # type: ignore[union-attr]


def test_it_detects_a_removed_record(audit: NodeAudit) -> None:
    raw(audit, "DELETE FROM events WHERE seq = 2")
    _, brk = audit.verify()
    assert brk is not None and brk.seq == 2 and "missing" in brk.reason


def test_it_detects_a_rehashed_record_by_the_next_link(audit: NodeAudit) -> None:
    # Rewriting a record and its own hash still breaks the link from the record after it.
    from edge_runtime.audit import event_hash
    from edge_runtime.signing import canonical_json

    event = audit.events_after(1, limit=1)[0]
    detail = canonical_json({"n": 2, "note": "rewritten"})
    digest = event_hash(seq=2, at=event.at, action=event.action, detail_json=detail, prev_hash=event.prev_hash)
    raw(audit, "UPDATE events SET detail = ?, hash = ? WHERE seq = 2", detail, digest)
    _, brk = audit.verify()
    assert brk is not None and brk.seq == 3 and "previous-hash" in brk.reason


def test_it_detects_dropped_newest_records(audit: NodeAudit) -> None:
    raw(audit, "DELETE FROM events WHERE seq >= 4")
    _, brk = audit.verify()
    assert brk is not None and brk.seq == 4 and "head" in brk.reason


def test_it_keeps_one_chain_when_appending_from_many_threads(tmp_path: Path) -> None:
    log = NodeAudit(tmp_path / "audit.sqlite3")

    def work(worker: int) -> None:
        other = NodeAudit(tmp_path / "audit.sqlite3")  # a second handle, as another process would have
        for i in range(15):
            other.append("query.received", {"worker": worker, "i": i})

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.verify() == (60, None)


def test_it_refuses_an_empty_action(audit: NodeAudit) -> None:
    with pytest.raises(ValueError, match="action"):
        audit.append("")


def test_it_refuses_a_detail_longer_than_an_entry_carries(tmp_path: Path) -> None:
    from edge_runtime.protocol.audit import MAX_ENTRY_DETAIL

    log = NodeAudit.in_state_dir(tmp_path)
    with pytest.raises(ValueError, match=f"{MAX_ENTRY_DETAIL + 8} characters of JSON"):
        log.append("query.answered", {"x": "y" * MAX_ENTRY_DETAIL})  # {"x":"..."}: 8 characters more
    assert log.head()[0] == 0
    log.append("query.answered", {"x": "y" * (MAX_ENTRY_DETAIL - 8)})
    assert log.head()[0] == 1


def test_its_hash_is_the_chain_hash_of_the_entry_the_control_plane_receives(audit: NodeAudit) -> None:
    from edge_runtime.protocol.audit import LogEntry, entry_chain_hash
    from edge_runtime.signing import canonical_json

    for event in audit.events_after(0):
        entry = LogEntry(seq=event.seq, at=event.at, action=event.action, detail=canonical_json(event.detail),
                         prev_hash=event.prev_hash)
        assert entry_chain_hash(entry.leaf_data()) == event.hash

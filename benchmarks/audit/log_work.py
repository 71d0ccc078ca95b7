"""The audit log benchmark's work inside the control plane (``manage.py shell -c``; Django is set up).

* ``writes(threads, seconds)``: audited writes per second with N threads, one
  event per transaction, with the old chain append (every append locks one
  head row; kept here only as the baseline, on a table of its own) and with
  :func:`audit.services.audit_record`.
* ``appends(entries)``: entries per second appended and sequenced into the
  log (``audit_record`` then ``checkpoint_take``) against plain inserts of the
  same rows into a copy of the table without indexes or triggers.
* ``verify(entries)``: ``audit_verify`` of a log of that many entries against
  reading the same rows with ``values_list`` (the least any verifier does).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.checkpoints import checkpoint_take
from audit.models import LEAF_FIELDS, AuditEvent, AuditLogLeaf, AuditPending
from audit.services import Actor, audit_record, audit_verify

ACTOR = Actor.system("benchmark")
OLD_HEAD = "bench_old_chain_head"
OLD_EVENTS = "bench_old_chain_event"
PLAIN = "bench_plain_event"


def _old_tables() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {OLD_HEAD} (id int PRIMARY KEY, seq bigint, hash text)")
        cursor.execute(f"INSERT INTO {OLD_HEAD} VALUES (1, 0, %s) ON CONFLICT DO NOTHING", ["0" * 64])
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {OLD_EVENTS} (LIKE audit_auditevent INCLUDING ALL)")


def _old_append(label: str) -> None:
    """The chain append as it was: lock the head row, chain to its hash, move it."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SELECT seq, hash FROM {OLD_HEAD} WHERE id = 1 FOR UPDATE")
        seq, prev = cursor.fetchone()
        event = AuditEvent(seq=seq + 1, created_at=timezone.now(), actor_type=ACTOR.type, actor=ACTOR.label,
                           action="bench.old", object_repr=label, prev_hash=prev)
        digest = event.compute_hash()
        cursor.execute(f"INSERT INTO {OLD_EVENTS} (seq, uuid, created_at, actor_type, actor, action, object_type, "
                       "object_id, object_repr, prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, '', '', %s, %s, %s)",
                       [event.seq, event.uuid, event.created_at, event.actor_type, event.actor, event.action,
                        label, prev, digest])
        cursor.execute(f"UPDATE {OLD_HEAD} SET seq = %s, hash = %s WHERE id = 1", [event.seq, digest])


def _new_append(label: str) -> None:
    with transaction.atomic():
        audit_record(actor=ACTOR, action="bench.new", object_repr=label)


def _rate(append: Any, threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = threading.Event()

    def run(n: int) -> None:
        try:
            while not stop.is_set():
                append(f"{n}-{counts[n]}")
                counts[n] += 1
        finally:
            connection.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def writes(threads: list[int], seconds: float) -> dict[str, Any]:
    _old_tables()
    rows = []
    for n in threads:
        old = _rate(_old_append, n, seconds)
        new = _rate(_new_append, n, seconds)
        rows.append({"threads": n, "old_chain_per_s": round(old, 1), "merkle_log_per_s": round(new, 1),
                     "ratio": round(new / old, 2) if old else None})
    checkpoint_take()
    return {"rows": rows}


def _plain_insert(count: int) -> float:
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {PLAIN} "
                       "(LIKE audit_auditevent INCLUDING DEFAULTS INCLUDING IDENTITY)")
    fields = ", ".join(LEAF_FIELDS[:9]) + ", prev_hash, hash"
    start = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        for i in range(count):
            cursor.execute(f"INSERT INTO {PLAIN} ({fields}) VALUES (%s, gen_random_uuid(), now(), 'system', "
                           "'benchmark', 'bench.plain', '', '', %s, '', %s)",
                           [i, f"plain {i}", hashlib.sha256(str(i).encode()).hexdigest()])
    return time.perf_counter() - start


def appends(entries: int) -> dict[str, Any]:
    checkpoint_take()
    plain_s = _plain_insert(entries)
    start = time.perf_counter()
    with transaction.atomic():
        for i in range(entries):
            audit_record(actor=ACTOR, action="bench.append", object_repr=f"append {i}")
    append_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpoint_take()
    sequence_s = time.perf_counter() - start
    return {"entries": entries, "plain_insert_per_s": round(entries / plain_s, 1),
            "append_per_s": round(entries / append_s, 1), "sequence_and_sign_per_s": round(entries / sequence_s, 1),
            "append_over_plain": round(plain_s / append_s, 3),
            "append_and_sequence_over_plain": round(plain_s / (append_s + sequence_s), 3)}


def _fill(entries: int) -> None:
    """Grow the log to ``entries`` positions quickly: events inserted in bulk, then sequenced."""
    have = AuditLogLeaf.objects.count()
    now = timezone.now()
    last = int(AuditEvent.objects.order_by("-seq").values_list("seq", flat=True).first() or 0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval('audit_event_seq', %s)", [last + entries])
    for start in range(have, entries, 20_000):
        batch = []
        for i in range(start, min(entries, start + 20_000)):
            event = AuditEvent(seq=last + 1 + i, created_at=now, actor_type="system", actor="benchmark",
                               action="bench.fill", object_repr=f"fill {i}", after={"i": i}, prev_hash="")
            event.hash = event.compute_hash()
            batch.append(event)
        AuditEvent.objects.bulk_create(batch, batch_size=5000)
        AuditPending.objects.bulk_create([AuditPending(event=e) for e in batch], batch_size=5000)
        checkpoint_take()


def verify(entries: int) -> dict[str, Any]:
    _fill(entries)
    size = AuditLogLeaf.objects.count()
    start = time.perf_counter()
    read = 0
    fields = ("position", "leaf", *(f"event__{f}" for f in LEAF_FIELDS), "event__hash")
    position = 0
    while True:
        rows = list(AuditLogLeaf.objects.filter(position__gte=position).order_by("position")
                    .values_list(*fields)[:10_000])
        if not rows:
            break
        read += len(rows)
        position = rows[-1][0] + 1
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    report = audit_verify()
    verify_s = time.perf_counter() - start
    if not report.ok or report.checked != size:
        raise RuntimeError(f"the benchmark's log did not verify: {report.problems[:3]}")
    return {"entries": size, "read_rows_s": round(read_s, 2), "verify_s": round(verify_s, 2),
            "verify_over_read": round(verify_s / read_s, 2) if read_s else None,
            "verify_entries_per_s": round(size / verify_s, 1)}

"""The sequencer and checkpointer of the control plane's audit log.

:func:`checkpoint_take`, one at a time (a PostgreSQL advisory lock; SQLite's
single writer), takes the committed events of the pending queue in ``seq``
order, appends them to the Merkle log as its next positions, keeps the
subtree hashes they complete (:class:`audit.trees.TreeStore`) and, when the
log grew or has no checkpoint yet, signs a checkpoint of its size and root
with the log key, timestamped by a cosignature of the same key. The signed
note is stored (:class:`AuditCheckpoint`) and, once committed, appended to
the anchor file outside the database (:mod:`audit.anchors`).

An event's number (``seq``) comes from a sequence when it is written, so
numbers are not in commit order; positions are, batch by batch. Every
committed event gets exactly one position; one that rolled back gets none.
"""

from __future__ import annotations

import time

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from audit import anchors, witness
from audit.log_key import LogKey, key_path, log_key
from audit.log_models import CONTROL_PLANE_LOG
from audit.models import LEAF_FIELDS, AuditCheckpoint, AuditEvent, AuditLogLeaf, AuditPending, leaf_data
from audit.trees import TreeStore
from edge_runtime import merkle, notes

# One checkpointer at a time, across every process: the key of its PostgreSQL advisory lock.
LOCK_KEY = 0x6564676577697365  # "edgewise"
BATCH = 5000


# Key files whose log has signed: checkpoints are append-only, so the question need not be asked again.
_signed_before: set[str] = set()


def checkpoint_key() -> LogKey:
    """The log key; made only while the log has no checkpoint, else a missing file is an AuditKeyError."""
    path = str(key_path())
    if path not in _signed_before and AuditCheckpoint.objects.exists():
        _signed_before.add(path)
    return log_key(create=path not in _signed_before)


def checkpoint_take() -> AuditCheckpoint | None:
    """Sequence the pending events and sign a checkpoint if the log grew; the new checkpoint, or None."""
    with transaction.atomic():
        _lock()
        # The node logs' newly cosigned heads, as one audit event sequenced into this checkpoint.
        witness.node_heads_record()
        key = checkpoint_key()
        store = TreeStore(CONTROL_PLANE_LOG)
        size = log_size()
        frontier = store.frontier(size)
        while _sequence_batch(store, frontier):
            pass
        latest = AuditCheckpoint.objects.order_by("-size").first()
        if latest is not None and latest.size == frontier.size:
            return None
        checkpoint = _sign(key, frontier)
        transaction.on_commit(lambda: anchors.anchor_append(checkpoint.note, key.vkey))
    return checkpoint


def log_size() -> int:
    last = AuditLogLeaf.objects.aggregate(last=Max("position"))["last"]
    return 0 if last is None else int(last) + 1


def _lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
    # SQLite: the transaction holds the database's one write lock from its first statement (IMMEDIATE).


def _sequence_batch(store: TreeStore, frontier: merkle.Frontier) -> int:
    """Append up to BATCH pending events (lowest seq first); how many."""
    ids = list(AuditPending.objects.order_by("event__seq").values_list("event_id", flat=True)[:BATCH])
    if not ids:
        return 0
    rows = AuditEvent.objects.filter(id__in=ids).order_by("seq").values_list("id", *LEAF_FIELDS)
    leaves: list[AuditLogLeaf] = []
    completed: list[tuple[merkle.Key, bytes]] = []
    for event_id, *values in rows:
        leaf = merkle.leaf_hash(leaf_data(tuple(values)))
        leaves.append(AuditLogLeaf(position=frontier.size, event_id=event_id, leaf=leaf))
        completed.extend(frontier.append(leaf))
    AuditLogLeaf.objects.bulk_create(leaves, batch_size=2000)
    store.add(completed)
    AuditPending.objects.filter(event_id__in=ids).delete()
    return len(ids)


def _sign(key: LogKey, frontier: merkle.Frontier) -> AuditCheckpoint:
    root = frontier.root()
    note = notes.sign_note(notes.Checkpoint(key.name, frontier.size, root).body(), key.name, key.private)
    note = notes.add_cosignature(note, key.name, key.private, int(time.time()))
    return AuditCheckpoint.objects.create(size=frontier.size, root=root.hex(), note=note, created_at=timezone.now())


def checkpoint_latest() -> AuditCheckpoint | None:
    return AuditCheckpoint.objects.order_by("-size").first()


"""Heartbeats of quiet syncs, written from Redis to PostgreSQL in batches.

A quiet sync (``orchestrator.quiet``) records when the node was heard, from where and its health in one Redis
hash. :func:`heartbeats_flush` takes that hash whole (a rename, so heartbeats that arrive meanwhile start a new
one) and writes it with one ``UPDATE ... FROM (VALUES ...)`` per batch:

* ``last_seen_at`` only ever moves forward, to the time the heartbeat *arrived*, never the time of the flush:
  a flush that is late, or repeated, cannot make a node look more recently heard than it was;
* a heartbeat lost in Redis before a flush is simply missing: the node looks as old as its last heartbeat
  that reached PostgreSQL, which can turn it stale or offline but never online;
* a revoked (or deleted) node's heartbeat is not written, and its quiet snapshot is retired, so a revocation
  whose notice did not reach Redis still stops quiet answers within one flush.

One flush runs at a time across all processes (a Redis lock); a flush that failed leaves its batch to the next.
Every ASGI process flushes every ``EDGEWISE_HEARTBEAT_FLUSH_INTERVAL`` seconds in a thread of its own
(:func:`flusher_start`), and the liveness sweep flushes before it looks.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from orchestrator import quiet
from sites.models import Node

logger = logging.getLogger("edgewise.heartbeats")

BATCH = 2000
LOCK_TTL_S = 30


def _taking_key() -> str:
    return quiet.heartbeats_key() + ":taking"


def _lock_key() -> str:
    return quiet.heartbeats_key() + ":lock"


def _rows(raw: dict[Any, Any]) -> list[tuple[str, dt.datetime, str | None, str]]:
    rows = []
    for node_uuid, payload in raw.items():
        try:
            beat = json.loads(payload)
            at = dt.datetime.fromtimestamp(float(beat["t"]), tz=dt.UTC)
            rows.append((str(uuid.UUID(str(node_uuid))), at, beat.get("ip") or None, json.dumps(beat["health"])))
        except (ValueError, KeyError, TypeError):
            logger.error("heartbeat of %r is unreadable and was dropped: %r", node_uuid, payload[:200])
    return rows


_UPDATE = """
UPDATE {table} AS n
SET last_seen_at = v.at,
    last_seen_ip = v.ip::inet,
    health = v.health::jsonb
FROM (VALUES {values}) AS v(uuid, at, ip, health)
WHERE n.uuid = v.uuid::uuid AND n.revoked_at IS NULL
  AND (n.last_seen_at IS NULL OR n.last_seen_at < v.at)
RETURNING n.uuid
"""


def _write(rows: list[tuple[str, dt.datetime, str | None, str]]) -> set[str]:
    """Write one batch; the uuids of the nodes that are active (written or already newer)."""
    values = ", ".join(["(%s, %s::timestamptz, %s, %s)"] * len(rows))
    params: list[Any] = [p for row in rows for p in row]
    with connection.cursor() as cursor:
        cursor.execute(_UPDATE.format(table=Node._meta.db_table, values=values), params)
        written = {str(r[0]) for r in cursor.fetchall()}
    pending = [r[0] for r in rows if r[0] not in written]
    if pending:
        active = Node.objects.filter(uuid__in=pending, revoked_at__isnull=True).values_list("uuid", flat=True)
        written |= {str(u) for u in active}
    return written


def heartbeats_flush() -> int:
    """Write the heartbeats waiting in Redis to PostgreSQL; how many were taken (0 when another flush runs)."""
    if not quiet.enabled() or connection.vendor != "postgresql":
        return 0
    client = quiet.client()
    token = uuid.uuid4().hex
    if not client.set(_lock_key(), token, nx=True, ex=LOCK_TTL_S):
        return 0
    try:
        taking = _taking_key()
        if not client.exists(taking):
            try:
                client.rename(quiet.heartbeats_key(), taking)
            except redis.ResponseError:
                return 0  # no heartbeat since the last flush
        rows = _rows(client.hgetall(taking))
        stopped: list[str] = []
        with transaction.atomic():
            for start in range(0, len(rows), BATCH):
                batch = rows[start:start + BATCH]
                active = _write(batch)
                stopped += [r[0] for r in batch if r[0] not in active]
        client.delete(taking)
        if stopped:
            logger.info("heartbeats of %d revoked or removed node(s) dropped; their quiet syncs stop", len(stopped))
            quiet.bump(stopped)
        return len(rows)
    finally:
        if client.get(_lock_key()) == token:
            client.delete(_lock_key())


_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _flush_forever(interval: float) -> None:
    while True:
        time.sleep(interval)
        try:
            close_old_connections()
            heartbeats_flush()
        except Exception:  # noqa: BLE001 - the thread must outlive a database or Redis outage; logged
            logger.exception("heartbeat flush failed; retrying in %.1fs", interval)
        finally:
            close_old_connections()


def flusher_start() -> bool:
    """Start this process's flushing thread (once); False when quiet syncs are off or flushing is disabled."""
    global _flusher
    interval = settings.HEARTBEAT_FLUSH_S
    if not quiet.enabled() or interval <= 0:
        return False
    with _flusher_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_forever, args=(interval,), name="heartbeat-flush", daemon=True)
            _flusher.start()
    return True

"""Writes of telemetry: commit what nodes send (idempotently), prune old history.

:func:`telemetry_commit` takes the frames of many nodes at once, because the
stream consumers of a process commit together (``sites.telemetry.committer``):
one transaction, one locked read of the nodes' high-water marks, one upsert
per history row touched, however many nodes. Safe to run twice with the same
frames: items at or below a node's mark are skipped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection, models, transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import protocol
from orchestrator.realtime import FLEET_GROUP, site_group
from sites.models import Node
from sites.telemetry import events
from sites.telemetry.models import RESOLUTIONS, GapReason, TelemetryGap, TelemetrySample, TelemetryStream

# Points older than this are committed but not pushed to the site pages (whose
# charts show this much), so that a long backlog does not flood the browsers.
LIVE_WINDOW = dt.timedelta(minutes=15)

SUMMED = ("points", "interval_sum", "requests", "errors", "batches", "batch_items", "latency_weight",
          "latency_p50_wsum", "latency_p95_wsum", "cpu_sum", "load_sum", "memory_used_sum", "disk_used_sum")
MAXED = ("latency_p95_max", "queue_depth_max", "cpu_max", "memory_total_max", "disk_total_max", "backlog_max")
KEY = ("node_id", "resolution", "model", "version", "bucket")


@dataclasses.dataclass(frozen=True)
class Committed:
    """What a commit did: each node's high-water mark, and the events to broadcast now that it has committed."""

    marks: dict[int, int]
    events: list[tuple[str, str, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Submission:
    """One frame from one node's stream, with what the consumer already knows of the node."""

    node_id: int
    node_uuid: str
    site_uuid: str
    frame: protocol.TelemetryFrame


def bucket_start(at: dt.datetime, resolution: int) -> dt.datetime:
    ts = at.timestamp()
    return dt.datetime.fromtimestamp(ts - ts % resolution, dt.UTC)


def _fold_point(rows: dict[tuple[Any, ...], dict[str, float]], node_id: int, point: protocol.TelemetryPoint) -> None:
    r = point.resources
    for resolution in RESOLUTIONS:
        bucket = bucket_start(point.at, resolution)
        row = rows[(node_id, resolution, "", "", bucket)]
        row["points"] += 1
        row["interval_sum"] += point.interval_s
        row["cpu_sum"] += r.cpu_percent
        row["cpu_max"] = max(row["cpu_max"], r.cpu_percent)
        row["load_sum"] += r.load1
        row["memory_used_sum"] += r.memory_used_mb
        row["memory_total_max"] = max(row["memory_total_max"], r.memory_total_mb)
        row["disk_used_sum"] += r.disk_used_mb
        row["disk_total_max"] = max(row["disk_total_max"], r.disk_total_mb)
        row["queue_depth_max"] = max(row["queue_depth_max"], r.inference_queue_depth)
        row["backlog_max"] = max(row["backlog_max"], r.telemetry_backlog)
        for m in point.models:
            mrow = rows[(node_id, resolution, m.model, m.version, bucket)]
            mrow["points"] += 1
            mrow["interval_sum"] += point.interval_s
            mrow["requests"] += m.requests
            mrow["errors"] += m.errors
            mrow["batches"] += m.batches
            mrow["batch_items"] += (m.batch_size_mean or 0.0) * m.batches
            mrow["queue_depth_max"] = max(mrow["queue_depth_max"], m.queue_depth)
            if m.latency_p50_ms is not None and m.latency_p95_ms is not None and m.requests:
                mrow["latency_weight"] += m.requests
                mrow["latency_p50_wsum"] += m.latency_p50_ms * m.requests
                mrow["latency_p95_wsum"] += m.latency_p95_ms * m.requests
                mrow["latency_p95_max"] = max(mrow["latency_p95_max"], m.latency_p95_ms)


def _upsert_sql() -> str:
    table = TelemetrySample._meta.db_table
    columns = [*KEY, *SUMMED, *MAXED]
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in SUMMED]
    sets += [f"{c} = {greatest}({table}.{c}, excluded.{c})" for c in MAXED]
    conflict = f"ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {', '.join(sets)}"
    if connection.vendor == "postgresql":
        # One statement for the whole round, a column per array: a statement per row cost PostgreSQL
        # a parse, plan and execution each, most of a round's time at a thousand nodes.
        arrays = ", ".join(f"%b::{_db_type(TelemetrySample, c)}[]" for c in columns)
        return (f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "  # noqa: S608 - names are ours, values are parameters
                f"{conflict}")
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "  # noqa: S608 - names are ours, values are parameters
            f"{conflict}")


STREAM_COLUMNS = ("id", "last_seq", "points", "lost", "received_at", "last_point_at", "latest")


def _stream_update_sql() -> str:
    table = TelemetryStream._meta.db_table
    sets = ", ".join(f"{c} = v.{c}" for c in STREAM_COLUMNS[1:])
    if connection.vendor == "postgresql":
        # As for the samples: one UPDATE from arrays instead of one per stream (or bulk_update's CASE per
        # column). ``latest`` travels as text and becomes jsonb here.
        arrays = ", ".join(f"%b::{'text' if c == 'latest' else _db_type(TelemetryStream, c)}[]"
                           for c in STREAM_COLUMNS)
        return (f"UPDATE {table} SET {sets.replace('v.latest', 'v.latest::jsonb')} "  # noqa: S608 - names are ours
                f"FROM unnest({arrays}) AS v({', '.join(STREAM_COLUMNS)}) WHERE {table}.id = v.id")
    return (f"UPDATE {table} SET {', '.join(f'{c} = %s' for c in STREAM_COLUMNS[1:])} WHERE id = %s")  # noqa: S608 - names are ours


def _typed(column: str, value: float) -> float:
    """``value`` (summed as a float) as its column holds it: an integer column gets an int."""
    return int(value) if column in _INTEGER_COLUMNS else value


_INTEGER_COLUMNS = frozenset(f.column for f in TelemetrySample._meta.concrete_fields
                             if f.get_internal_type() in ("IntegerField", "PositiveIntegerField", "BigIntegerField"))


def _db_type(model: type[models.Model], column: str) -> str:
    field = next(f for f in model._meta.concrete_fields if f.column == column)
    return str(field.db_type(connection))


def _write(sql: str, rows: list[list[Any]]) -> None:
    """Run ``sql`` (from :func:`_upsert_sql` or :func:`_stream_update_sql`) for ``rows``: once with a column
    array each on PostgreSQL, once per row elsewhere (SQLite, the embedded control plane)."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.executemany(sql, rows)
        return
    # The driver's own cursor, in the same transaction: Django's binds on the client, quoting every
    # element of every array into the SQL text, which cost more than the statement itself. This one
    # sends the arrays as binary parameters (``%b``).
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, [list(column) for column in zip(*rows, strict=True)])


@dataclasses.dataclass
class _Round:
    """What one commit gathers from its submissions before writing it."""

    now: dt.datetime
    rows: dict[tuple[Any, ...], dict[str, float]] = dataclasses.field(
        default_factory=lambda: defaultdict(lambda: dict.fromkeys((*SUMMED, *MAXED), 0.0)))
    gaps: list[TelemetryGap] = dataclasses.field(default_factory=list)
    live_points: dict[str, list[events.PointEvent]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    summary: dict[str, events.SiteConfirmation] = dataclasses.field(default_factory=dict)


def telemetry_commit(*, submissions: Sequence[Submission], now: dt.datetime | None = None) -> Committed:
    """Commit ``submissions`` in one transaction; returns each node's high-water mark after it.

    Per node, in frame order: an item at or below the mark is a duplicate
    and skipped; a point is folded into the history; a gap is recorded (only
    its part above the mark); a sequence number skipped without a gap is
    recorded as a "missing" gap. Returns the ``site.telemetry`` and
    ``fleet.telemetry`` events for the caller to broadcast once this has
    returned (committed): the committer sends them from the event loop with
    ``orchestrator.realtime.broadcast_committed``, so the next round's
    transaction does not wait on the channel layer.
    """
    if not submissions:
        return Committed(marks={}, events=[])
    gathered = _Round(now=now or timezone.now())
    node_ids = sorted({s.node_id for s in submissions})
    with transaction.atomic():
        streams = _locked_streams(node_ids)
        for sub in submissions:
            _gather(gathered, sub, streams[sub.node_id])
        _store(gathered, [streams[n] for n in sorted({s.node_id for s in submissions})])
    to_send: list[tuple[str, str, dict[str, Any]]] = [
        (site_group(site_uuid), "site.telemetry", {"site": site_uuid, "points": points})
        for site_uuid, points in gathered.live_points.items()
    ]
    to_send.append((FLEET_GROUP, "fleet.telemetry", {"sites": gathered.summary}))
    return Committed(marks={n: streams[n].last_seq for n in node_ids}, events=to_send)


def _locked_streams(node_ids: list[int]) -> dict[int, TelemetryStream]:
    """Each node's stream row, created if new, locked in node order (two overlapping commits wait, never deadlock)."""
    streams = {s.node_id: s for s in TelemetryStream.objects.select_for_update().filter(node_id__in=node_ids)
               .order_by("node_id")}
    missing = [n for n in node_ids if n not in streams]
    if missing:
        TelemetryStream.objects.bulk_create([TelemetryStream(node_id=n) for n in missing], ignore_conflicts=True)
        streams.update({s.node_id: s for s in TelemetryStream.objects.select_for_update()
                        .filter(node_id__in=missing).order_by("node_id")})
    return streams


def _gather(gathered: _Round, sub: Submission, stream: TelemetryStream) -> None:
    """Fold one submission's items above the stream's mark into ``gathered``, moving the mark."""
    now = gathered.now
    new_lost = 0
    for item in sub.frame.items:
        if item.last_seq <= stream.last_seq:
            continue  # already committed: a resend after a lost ack
        first = max(item.seq, stream.last_seq + 1)
        if first > stream.last_seq + 1:
            skipped = first - stream.last_seq - 1
            gathered.gaps.append(TelemetryGap(node_id=sub.node_id, first_seq=stream.last_seq + 1, last_seq=first - 1,
                                              count=skipped, reason=GapReason.MISSING, received_at=now))
            new_lost += skipped
        if isinstance(item, protocol.TelemetryPoint):
            _fold_point(gathered.rows, sub.node_id, item)
            stream.points += 1
            stream.last_point_at = item.at
            stream.latest = item.model_dump(mode="json")
            if item.at >= now - LIVE_WINDOW:
                gathered.live_points[sub.site_uuid].append(events.point_event(sub.node_uuid, item))
        else:
            count = item.last_seq - first + 1
            gathered.gaps.append(TelemetryGap(node_id=sub.node_id, first_seq=first, last_seq=item.last_seq,
                                              count=count, start=item.start, end=item.end, reason=item.reason,
                                              received_at=now))
            new_lost += count
        stream.last_seq = item.last_seq
    stream.lost += new_lost
    stream.received_at = now
    site = gathered.summary.setdefault(sub.site_uuid, {"confirmed_at": now.isoformat(), "nodes": {}})
    known = site["nodes"].get(sub.node_uuid)
    site["nodes"][sub.node_uuid] = {"seq": stream.last_seq, "confirmed_at": now.isoformat(),
                                    "lost": new_lost + (known["lost"] if known else 0)}


def _store(gathered: _Round, touched: list[TelemetryStream]) -> None:
    """Write the gathered history rows, gaps (audited) and the touched streams' marks."""
    if gathered.rows:
        _write(_upsert_sql(), [[*key, *(_typed(c, values[c]) for c in (*SUMMED, *MAXED))]
                               for key, values in sorted(gathered.rows.items())])
    if gathered.gaps:
        TelemetryGap.objects.bulk_create(gathered.gaps)
        _audit_gaps(gathered.gaps)
    streams_rows = [[st.pk, st.last_seq, st.points, st.lost, st.received_at, st.last_point_at,
                     json.dumps(st.latest, separators=(",", ":"))] for st in touched]
    if connection.vendor != "postgresql":
        streams_rows = [[*row[1:], row[0]] for row in streams_rows]  # the WHERE id = %s comes last
    _write(_stream_update_sql(), streams_rows)


def _audit_gaps(gaps: list[TelemetryGap]) -> None:
    """Lost telemetry is on the record: one audit event per gap (rare: only after the node's disk budget ran out)."""
    nodes = Node.objects.select_related("site").in_bulk({g.node_id for g in gaps})
    for gap in gaps:
        node = nodes[gap.node_id]
        audit_record(
            actor=Actor.node(node), action="node.telemetry_gap", obj=node, site_uuid=node.site.uuid,
            object_repr=f"{node.site.slug}/{node.name}",
            after={"first_seq": gap.first_seq, "last_seq": gap.last_seq, "count": gap.count, "reason": gap.reason,
                   "start": gap.start.isoformat() if gap.start else None,
                   "end": gap.end.isoformat() if gap.end else None},
        )


def telemetry_prune(*, now: dt.datetime | None = None) -> int:
    """Delete history past its retention; returns the rows deleted. Safe to run twice."""
    now = now or timezone.now()
    fine_cut = now - dt.timedelta(seconds=settings.TELEMETRY_FINE_RETENTION_S)
    coarse_cut = now - dt.timedelta(seconds=settings.TELEMETRY_COARSE_RETENTION_S)
    deleted = 0
    for resolution, cut in ((RESOLUTIONS[0], fine_cut), (RESOLUTIONS[1], coarse_cut)):
        count, _ = TelemetrySample.objects.filter(resolution=resolution, bucket__lt=cut).delete()
        deleted += count
    count, _ = TelemetryGap.objects.filter(received_at__lt=coarse_cut).delete()
    return deleted + count

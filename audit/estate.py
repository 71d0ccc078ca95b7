"""The estate's audit trail in one list: the control plane's events and every node's entries, as a reader may see them.

Both come from one SQL UNION, so that filters, ordering and pagination apply
to the merged list as to one table. The nodes' logs' checkpoint status (last
cosigned size, its age, ok or forked) is read alongside.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import CharField, F, QuerySet, Value
from django.db.models.functions import Cast, Substr
from django.utils import timezone

from audit.log_models import NodeLog, NodeLogEntry
from audit.models import AuditEvent

CONTROL_PLANE = "control-plane"
NODE = "node"

# How the console names a node (the sites app registers it: this app sits below sites).
_node_names: list[Callable[[Iterable[str]], dict[str, str]]] = []


def node_names_register(source: Callable[[Iterable[str]], dict[str, str]]) -> None:
    """Register what maps node uuids to their names (called from an AppConfig.ready())."""
    if source not in _node_names:
        _node_names.append(source)


def node_names(uuids: Iterable[str]) -> dict[str, str]:
    wanted = {u for u in uuids if u}
    names: dict[str, str] = {}
    for source in _node_names:
        names.update(source(wanted))
    return names


FIELDS = ("kind", "ref", "seq", "at", "actor_type", "actor", "action", "object_type", "object_id", "object_repr",
          "site", "source_ip", "hash")
COLUMNS = tuple(f"e_{name}" for name in FIELDS)


def _text(value: str) -> Value:
    return Value(value, output_field=CharField())


def _events(events: QuerySet[AuditEvent]) -> QuerySet[Any]:
    return events.annotate(
        e_kind=_text(CONTROL_PLANE), e_ref=Cast("uuid", CharField()), e_seq=F("seq"), e_at=F("created_at"),
        e_actor_type=F("actor_type"), e_actor=F("actor"), e_action=F("action"), e_object_type=F("object_type"),
        e_object_id=F("object_id"), e_object_repr=F("object_repr"), e_site=F("site_uuid"),
        e_source_ip=Cast("source_ip", CharField()), e_hash=F("hash")).values_list(*COLUMNS)


def _entries(entries: QuerySet[NodeLogEntry]) -> QuerySet[Any]:
    node = Cast("node_uuid", CharField())
    return entries.annotate(
        e_kind=_text(NODE), e_ref=node, e_seq=F("seq"), e_at=F("created_at"), e_actor_type=_text("node"),
        e_actor=node, e_action=F("action"), e_object_type=_text("node log"), e_object_id=node,
        e_object_repr=Substr("detail", 1, 200), e_site=F("site_uuid"), e_source_ip=_text(""),
        e_hash=_text("")).values_list(*COLUMNS)


def merged(events: QuerySet[AuditEvent] | None, entries: QuerySet[NodeLogEntry] | None) -> QuerySet[Any]:
    """One list of control-plane events and node entries (either may be left out), newest first."""
    parts = [*([_events(events)] if events is not None else []), *([_entries(entries)] if entries is not None else [])]
    if not parts:
        raise ValueError("merged() needs events, entries or both")
    combined = parts[0] if len(parts) == 1 else parts[0].union(parts[1], all=True)
    return combined.order_by("-e_at", "-e_seq")


def as_rows(rows: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows as dicts for the template, with node names where the console knows them."""
    dicts = [dict(zip(FIELDS, row, strict=True)) for row in rows]
    nodes = {str(r["object_id"]) for r in dicts if r["kind"] == NODE or r["object_type"] == "sites.node"}
    names = node_names(nodes)
    for row in dicts:
        row["node_name"] = names.get(str(row["object_id"]), "")
    return dicts


@dataclasses.dataclass(frozen=True)
class LogStatus:
    node: str
    node_name: str
    state: str
    stored: int
    cosigned_size: int
    cosigned_at: dt.datetime | None
    age_s: float | None
    fork_reason: str


def node_log_statuses(user: Any, *, state: str = "") -> list[LogStatus]:
    logs = NodeLog.objects.all().restrict(user).order_by("-state", "-cosigned_at")
    if state:
        logs = logs.filter(state=state)
    rows = list(logs[:500])
    names = node_names(str(log.node_uuid) for log in rows)
    now = timezone.now()
    return [LogStatus(node=str(log.node_uuid), node_name=names.get(str(log.node_uuid), ""), state=log.state,
                      stored=log.stored, cosigned_size=log.cosigned_size, cosigned_at=log.cosigned_at,
                      age_s=(now - log.cosigned_at).total_seconds() if log.cosigned_at else None,
                      fork_reason=log.fork_reason) for log in rows]

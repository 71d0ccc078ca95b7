"""The estate's audit trail in one list: the control plane's events and every node's entries, as a reader may see them.

Both come from one SQL UNION, so that filters, ordering and pagination apply
to the merged list as to one table. The nodes' logs' checkpoint status (last
cosigned size, its age, ok or forked) is read alongside.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import CharField, F, Q, QuerySet, Value
from django.db.models.functions import Cast, Substr
from django.utils import timezone

from audit.log_models import NodeLog, NodeLogEntry
from audit.models import AuditEvent

CONTROL_PLANE = "control-plane"
NODE = "node"
COLUMNS = ("e_kind", "e_ref", "e_at", "e_actor_type", "e_actor", "e_action", "e_summary", "e_site", "e_node", "e_seq")

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


@dataclasses.dataclass(frozen=True)
class EstateFilter:
    source: str = ""  # "", CONTROL_PLANE or NODE
    site: uuid.UUID | None = None
    node: uuid.UUID | None = None
    actor: str = ""
    action: str = ""
    start: dt.datetime | None = None
    end: dt.datetime | None = None


def _control_plane(user: Any, f: EstateFilter) -> QuerySet[AuditEvent]:
    events = AuditEvent.objects.all().restrict(user)
    if f.site:
        events = events.filter(site_uuid=f.site)
    if f.node:
        events = events.filter(Q(object_id=str(f.node)) | Q(actor=str(f.node)))
    if f.actor:
        events = events.filter(actor__icontains=f.actor)
    if f.action:
        events = events.filter(action__startswith=f.action)
    if f.start:
        events = events.filter(created_at__gte=f.start)
    if f.end:
        events = events.filter(created_at__lt=f.end)
    return events.annotate(
        e_kind=Value(CONTROL_PLANE, CharField()), e_ref=Cast("uuid", CharField()), e_at=F("created_at"),
        e_actor_type=F("actor_type"), e_actor=F("actor"), e_action=F("action"), e_summary=F("object_repr"),
        e_site=F("site_uuid"), e_node=F("object_id"), e_seq=F("seq"))


def _nodes(user: Any, f: EstateFilter) -> QuerySet[NodeLogEntry]:
    entries = NodeLogEntry.objects.all().restrict(user)
    if f.site:
        entries = entries.filter(site_uuid=f.site)
    if f.node:
        entries = entries.filter(node_uuid=f.node)
    if f.actor:
        # A node's entries are its own doing: its uuid is their actor.
        entries = entries.annotate(actor_text=Cast("node_uuid", CharField())).filter(actor_text__icontains=f.actor)
    if f.action:
        entries = entries.filter(action__startswith=f.action)
    if f.start:
        entries = entries.filter(created_at__gte=f.start)
    if f.end:
        entries = entries.filter(created_at__lt=f.end)
    return entries.annotate(
        e_kind=Value(NODE, CharField()), e_ref=Cast("id", CharField()), e_at=F("created_at"),
        e_actor_type=Value("node", CharField()), e_actor=Cast("node_uuid", CharField()), e_action=F("action"),
        e_summary=Substr("detail", 1, 200), e_site=F("site_uuid"), e_node=Cast("node_uuid", CharField()),
        e_seq=F("seq"))


def estate_entries(user: Any, f: EstateFilter) -> QuerySet[Any]:
    """The merged list, newest first: rows of :data:`COLUMNS` (as tuples)."""
    parts = []
    if f.source in ("", CONTROL_PLANE):
        parts.append(_control_plane(user, f).values_list(*COLUMNS))
    if f.source in ("", NODE):
        parts.append(_nodes(user, f).values_list(*COLUMNS))
    merged = parts[0] if len(parts) == 1 else parts[0].union(parts[1], all=True)
    return merged.order_by("-e_at", "-e_seq")


def as_rows(rows: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows as dicts for the template, with node names where the console knows them."""
    dicts = [dict(zip((c[2:] for c in COLUMNS), row, strict=True)) for row in rows]
    names = node_names(str(r["node"]) for r in dicts if r["node"])
    for row in dicts:
        row["node_name"] = names.get(str(row["node"]), "")
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

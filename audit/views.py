"""The audit trail in the console: the estate's events and node log entries in one filtered, paginated list,
the nodes' logs' checkpoint status, and one event's or entry's detail.

Everything is read through ``restrict``: a person sees the events and entries
of the sites they may see (administrators and auditors see the whole estate).
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import uuid
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import CharField, Q, QuerySet
from django.db.models.functions import Cast
from django.http import FileResponse, HttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.http import require_GET

from audit.checkpoints import checkpoint_latest
from audit.estate import CONTROL_PLANE, NODE, as_rows, merged, node_log_statuses, node_names
from audit.export import ExportError, audit_export, may_export
from audit.log_key import AuditKeyError, log_key
from audit.log_models import NodeLog, NodeLogEntry, NodeLogState
from audit.models import ActorType, AuditEvent, AuditLogLeaf
from audit.proofs import NoProof, event_inclusion_proof, node_entry_inclusion_proof
from audit.services import Actor
from core.htmx import HtmxHttpRequest, render_page

PAGE_SIZE = 50


class AuditFilterForm(forms.Form):
    actor_type = forms.ChoiceField(required=False, label="Actor type",
                                   choices=[("", "Any actor"), *ActorType.choices])
    actor = forms.CharField(required=False, max_length=150, label="Actor")
    action = forms.CharField(required=False, max_length=80, label="Action",
                             help_text="A prefix: node. matches node.enroll, node.revoke, …")
    object = forms.CharField(required=False, max_length=200, label="Object")
    source = forms.ChoiceField(required=False, label="Log", choices=[
        ("", "Control plane and nodes"), (CONTROL_PLANE, "Control plane"), (NODE, "Nodes")])
    site = forms.UUIDField(required=False, label="Site")
    node = forms.UUIDField(required=False, label="Node")
    log_state = forms.ChoiceField(required=False, label="Node logs", choices=[("", "Any"), *NodeLogState.choices])
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", "must be on or after the From date")
        return data


def _filtered(events: QuerySet[AuditEvent], data: dict[str, Any]) -> QuerySet[AuditEvent]:
    if data.get("actor_type"):
        events = events.filter(actor_type=data["actor_type"])
    if data.get("actor"):
        events = events.filter(actor__icontains=data["actor"].strip())
    if data.get("action"):
        events = events.filter(action__startswith=data["action"].strip())
    if data.get("object"):
        text = data["object"].strip()
        events = events.filter(Q(object_id=text) | Q(object_repr__icontains=text) | Q(object_type__icontains=text))
    # Dates are whole days in the console's time zone (UTC); "To" includes its day.
    if data.get("date_from"):
        events = events.filter(created_at__gte=_day_start(data["date_from"]))
    if data.get("date_to"):
        events = events.filter(created_at__lt=_day_start(data["date_to"] + dt.timedelta(days=1)))
    return events


def _site_and_node(events: QuerySet[AuditEvent], data: dict[str, Any]) -> QuerySet[AuditEvent]:
    if data.get("site"):
        events = events.filter(site_uuid=data["site"])
    if data.get("node"):
        events = events.filter(Q(object_id=str(data["node"])) | Q(actor=str(data["node"])))
    return events


def _entries_filtered(entries: QuerySet[NodeLogEntry], data: dict[str, Any]) -> QuerySet[NodeLogEntry]:
    """The same filters, for node log entries (their actor is their node, their object its log)."""
    if data.get("site"):
        entries = entries.filter(site_uuid=data["site"])
    if data.get("node"):
        entries = entries.filter(node_uuid=data["node"])
    for text in (data.get("actor"), data.get("object")):
        if text and text.strip():
            entries = entries.annotate(node_text=Cast("node_uuid", CharField())).filter(
                Q(node_text__icontains=text.strip()) | Q(detail__icontains=text.strip()))
    if data.get("action"):
        entries = entries.filter(action__startswith=data["action"].strip())
    if data.get("date_from"):
        entries = entries.filter(created_at__gte=_day_start(data["date_from"]))
    if data.get("date_to"):
        entries = entries.filter(created_at__lt=_day_start(data["date_to"] + dt.timedelta(days=1)))
    return entries


def _listed(user: Any, data: dict[str, Any] | None) -> QuerySet[Any]:
    """The merged list the filters ``data`` ask for (None: no filter)."""
    data = data or {}
    events: QuerySet[AuditEvent] | None = None
    entries: QuerySet[NodeLogEntry] | None = None
    if data.get("source") in ("", None, CONTROL_PLANE):
        events = _site_and_node(_filtered(AuditEvent.objects.all().restrict(user), data), data)
    if data.get("source") in ("", None, NODE) and data.get("actor_type") in ("", None, ActorType.NODE):
        entries = _entries_filtered(NodeLogEntry.objects.all().restrict(user), data)
    return merged(events, entries)


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=timezone.get_current_timezone())


@login_required
@require_GET
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    params = request.GET.copy()
    page_number = params.pop("page", ["1"])[-1]
    form = AuditFilterForm(params or None)
    status, rows = 200, _listed(request.user, form.cleaned_data if form.is_valid() else None)
    if form.is_bound and not form.is_valid():
        # A filter that cannot be applied shows nothing rather than everything.
        status, rows = 400, rows.none()
    page = Paginator(rows, PAGE_SIZE).get_page(page_number)
    log_state = form.cleaned_data.get("log_state", "") if form.is_valid() else ""
    context = {"form": form, "page": page, "rows": as_rows(page.object_list), "query": params.urlencode(),
               "node_logs": node_log_statuses(request.user, state=log_state), "may_export": may_export(request.user)}
    template = "audit/auditevent_list.html"
    return render_page(request, template, "audit-table", context, status=status)


@login_required
@require_GET
def event_detail(request: HtmxHttpRequest, event_id: uuid.UUID) -> HttpResponse:
    event = get_object_or_404(AuditEvent.objects.all().restrict(request.user), uuid=event_id)
    position = AuditLogLeaf.objects.filter(event=event).values_list("position", flat=True).first()
    latest = checkpoint_latest() if position is not None else None
    context = {
        "event": event,
        "before_json": _pretty(event.before),
        "after_json": _pretty(event.after),
        "proof_ready": latest is not None and position is not None and latest.size > position,
        "checkpoint_size": latest.size if latest is not None else 0,
    }
    template = "audit/auditevent_detail.html"
    return render_page(request, template, "event-body", context)


@login_required
@require_GET
def node_entry_detail(request: HtmxHttpRequest, node_id: uuid.UUID, seq: int) -> HttpResponse:
    entry = get_object_or_404(NodeLogEntry.objects.all().restrict(request.user), node_uuid=node_id, seq=seq)
    log = NodeLog.objects.filter(node_uuid=node_id).first()
    try:
        detail = _pretty(json.loads(entry.detail))
    except ValueError:
        detail = entry.detail
    context = {"entry": entry, "log": log, "detail_json": detail,
               "node_name": node_names([str(node_id)]).get(str(node_id), ""),
               "covered": log is not None and entry.seq <= log.cosigned_size}
    return render_page(request, "audit/nodelogentry_detail.html", "entry-body", context)


@login_required
@require_GET
def event_proof(request: HtmxHttpRequest, event_id: uuid.UUID) -> HttpResponse:
    """The event's inclusion proof in the log's latest signed checkpoint (JSON, for edge-runtime audit-verify)."""
    event = get_object_or_404(AuditEvent.objects.all().restrict(request.user), uuid=event_id)
    try:
        document = event_inclusion_proof(event)
    except (NoProof, AuditKeyError) as exc:
        return _plain(str(exc), status=409)
    return _download(json.dumps(document, indent=2), f"audit-event-{event.seq}.proof.json")


@login_required
@require_GET
def node_entry_proof(request: HtmxHttpRequest, node_id: uuid.UUID, seq: int) -> HttpResponse:
    """A node entry's inclusion proof in its log's latest cosigned checkpoint covering it."""
    entry = get_object_or_404(NodeLogEntry.objects.all().restrict(request.user), node_uuid=node_id, seq=seq)
    try:
        document = node_entry_inclusion_proof(entry)
    except (NoProof, AuditKeyError) as exc:
        return _plain(str(exc), status=409)
    return _download(json.dumps(document, indent=2), f"node-{node_id}-entry-{seq}.proof.json")


@login_required
@require_GET
def export(request: HtmxHttpRequest) -> HttpResponseBase:
    """The estate's audit bundle (zip), for those who may read the whole trail; the export is itself audited."""
    if not may_export(request.user):
        raise PermissionDenied("exporting the audit trail needs the estate-wide audit permission")
    bundle = tempfile.TemporaryFile()  # noqa: SIM115 - FileResponse closes it
    try:
        audit_export(bundle, actor=Actor.from_request(request))
    except (ExportError, AuditKeyError) as exc:
        bundle.close()
        return _plain(f"the audit trail was not exported: {exc}", status=409)
    except BaseException:
        bundle.close()
        raise
    bundle.seek(0)
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    return FileResponse(bundle, as_attachment=True, filename=f"edgewise-audit-{stamp}.zip",
                        content_type="application/zip")


def _plain(text: str, *, status: int) -> HttpResponse:
    return HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")


def _download(text: str, filename: str) -> HttpResponse:
    response = HttpResponse(text, content_type="application/json")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Cache-Control"] = "no-store"
    return response


def _pretty(value: Any) -> str:
    return "" if value is None else json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


@require_GET
def checkpoint(request: HtmxHttpRequest) -> HttpResponse:
    """The log's latest signed checkpoint (C2SP signed note), for outside witnesses: public, never cached."""
    latest = checkpoint_latest()
    if latest is None:
        response = HttpResponse("the audit log has no checkpoint yet\n", status=404,
                                content_type="text/plain; charset=utf-8")
    else:
        response = HttpResponse(latest.note, content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def vkey(request: HtmxHttpRequest) -> HttpResponse:
    """The audit log key's public half as a C2SP verifier key, for outside witnesses and auditors to pin."""
    try:
        response = HttpResponse(log_key().vkey + "\n", content_type="text/plain; charset=utf-8")
    except AuditKeyError:
        response = HttpResponse("the audit log has no key yet: it is made with the first checkpoint\n", status=404,
                                content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response

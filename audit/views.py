"""The audit trail in the console: a filtered, paginated list and one event's detail.

Everything is read through ``restrict``: a person sees the events of the sites
they may see (administrators and auditors see the whole chain).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.http import HttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.views.decorators.http import require_GET

from audit.checkpoints import checkpoint_latest
from audit.models import ActorType, AuditEvent
from core.htmx import HtmxHttpRequest, render_page

PAGE_SIZE = 50


class AuditFilterForm(forms.Form):
    actor_type = forms.ChoiceField(required=False, label="Actor type",
                                   choices=[("", "Any actor"), *ActorType.choices])
    actor = forms.CharField(required=False, max_length=150, label="Actor")
    action = forms.CharField(required=False, max_length=80, label="Action",
                             help_text="A prefix: node. matches node.enroll, node.revoke, …")
    object = forms.CharField(required=False, max_length=200, label="Object")
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


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time.min, tzinfo=timezone.get_current_timezone())


@login_required
@require_GET
def event_list(request: HtmxHttpRequest) -> HttpResponse:
    params = request.GET.copy()
    page_number = params.pop("page", ["1"])[-1]
    form = AuditFilterForm(params or None)
    events: QuerySet[AuditEvent] = AuditEvent.objects.all().restrict(request.user).order_by("-seq")
    status = 200
    if form.is_bound and not form.is_valid():
        # A filter that cannot be applied shows nothing rather than everything.
        events = events.none()
        status = 400
    elif form.is_bound:
        events = _filtered(events, form.cleaned_data)
    page = Paginator(events, PAGE_SIZE).get_page(page_number)
    context = {"form": form, "page": page, "query": params.urlencode()}
    template = "audit/auditevent_list.html"
    return render_page(request, template, "audit-table", context, status=status)


@login_required
@require_GET
def event_detail(request: HtmxHttpRequest, event_id: uuid.UUID) -> HttpResponse:
    event = get_object_or_404(AuditEvent.objects.all().restrict(request.user), uuid=event_id)
    context = {
        "event": event,
        "before_json": _pretty(event.before),
        "after_json": _pretty(event.after),
    }
    template = "audit/auditevent_detail.html"
    return render_page(request, template, "event-body", context)


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

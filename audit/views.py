from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from audit.models import AuditEvent
from policies.permissions import restrict


@login_required
def audit_list(request: HttpRequest) -> HttpResponse:
    events = restrict(AuditEvent.objects.all(), request.user)[:200]
    return render(request, "audit/auditevent_list.html", {"events": events})

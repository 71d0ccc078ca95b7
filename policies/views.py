"""The policies console: see the placement and rollout policies, their history, and write a new version.

Seeing policies needs ``view`` on at least one site (they govern the
estate); writing one needs the estate-wide Admin role (or superuser), since a
rule reaches every site. A document that does not validate is shown again
with the error naming the rule, and nothing is saved.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from audit.services import Actor
from core.permissions import may_anywhere, may_everywhere
from policies import selectors, services
from policies.forms import PolicyForm
from policies.models import PolicyKind
from policies.services import DOCUMENTS


def can_view_policies(user: Any) -> bool:
    if not user.is_authenticated:
        return False
    return user.is_staff or may_anywhere(user, "view")


def can_edit_policies(user: Any) -> bool:
    return may_everywhere(user, "administer")


def _viewer(request: HttpRequest) -> None:
    if not can_view_policies(request.user):
        raise PermissionDenied("you may not see the policies")


@login_required
@require_GET
def policy_list(request: HttpRequest) -> HttpResponse:
    _viewer(request)
    return render(request, "policies/policy_list.html", {"rows": selectors.policy_list(),
                                                          "can_edit": can_edit_policies(request.user)})


def _current_text(kind: str) -> str:
    current = selectors.policy_version_current(kind)
    document = current.document if current else DOCUMENTS[kind]().model_dump(mode="json")
    return json.dumps(document, indent=2)


@login_required
@require_http_methods(["GET", "POST"])
def policy_detail(request: HttpRequest, kind: str) -> HttpResponseBase:
    _viewer(request)
    if kind not in PolicyKind.values:
        raise Http404("no such policy")
    status = 200
    form = PolicyForm(initial={"document": _current_text(kind)})
    if request.method == "POST":
        if not can_edit_policies(request.user):
            raise PermissionDenied("writing a policy needs the estate-wide Admin role")
        form = PolicyForm(request.POST)
        status = 422
        if form.is_valid():
            try:
                services.policy_update(actor=Actor.from_request(request), kind=kind,
                                       document=form.cleaned_data["document"], comment=form.cleaned_data["comment"])
            except services.PoliciesError as exc:
                form.add_error("document", exc.message)
            else:
                return redirect(reverse("policies:policy-detail", args=[kind]))
    return render(request, "policies/policy_detail.html", {
        "kind": kind, "label": PolicyKind(kind).label, "current": selectors.policy_version_current(kind),
        "versions": selectors.policy_versions(kind)[:50], "form": form,
        "can_edit": can_edit_policies(request.user)}, status=status)

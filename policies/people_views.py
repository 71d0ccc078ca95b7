"""The People console: users, their estate-wide roles and their grants on regions and sites.

Everything here needs the estate-wide Admin role (or superuser): who may do
what anywhere is the estate's to decide. Each change goes through
:mod:`policies.people` or :mod:`policies.permissions` and is audited there;
a refused change is shown again with the reason, and nothing is saved.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from audit.services import Actor
from core.permissions import may_everywhere
from policies import people
from policies.permissions import ROLES, grants_of, role_grant, role_revoke
from sites.models import Region, Site


def can_manage_people(user: Any) -> bool:
    return may_everywhere(user, "administer")


def _admin(request: HttpRequest) -> None:
    if not can_manage_people(request.user):
        raise PermissionDenied("managing people needs the estate-wide Admin role")


def _scopes() -> list[tuple[str, str]]:
    regions = [(f"region:{r.slug}", f"region {r.name}") for r in Region.objects.order_by("name")]
    return regions + [(f"site:{s.slug}", f"site {s.name}") for s in Site.objects.order_by("name")]


def _scope_object(value: str) -> Region | Site | None:
    kind, _, slug = value.partition(":")
    if kind == "region":
        return Region.objects.filter(slug=slug).first()
    return Site.objects.filter(slug=slug).first() if kind == "site" else None


@login_required
@require_GET
def people_list(request: HttpRequest) -> HttpResponse:
    _admin(request)
    return _list(request)


def _list(request: HttpRequest, *, error: str = "", form: dict[str, Any] | None = None,
          status: int = 200) -> HttpResponse:
    users = get_user_model().objects.order_by("username").prefetch_related("groups")
    rows = [{"user": u, "roles": [g.name for g in u.groups.all() if g.name in ROLES]} for u in users]
    return render(request, "policies/people_list.html", {
        "rows": rows, "roles": list(ROLES), "error": error, "form": form or {}}, status=status)


@login_required
@require_POST
def person_create(request: HttpRequest) -> HttpResponseBase:
    _admin(request)
    data = request.POST
    try:
        user = people.user_create(actor=Actor.from_request(request), username=data.get("username", ""),
                                  password=data.get("password", ""), email=data.get("email", ""),
                                  roles=data.getlist("roles"))
    except people.PeopleError as exc:
        form = {"username": data.get("username", ""), "email": data.get("email", ""), "roles": data.getlist("roles")}
        return _list(request, error=exc.message, form=form, status=422)
    return redirect(reverse("people:person-detail", args=[user.pk]))


def _detail(request: HttpRequest, user: Any, *, error: str = "", status: int = 200) -> HttpResponse:
    return render(request, "policies/person_detail.html", {
        "person": user, "estate_roles": people.estate_roles(user), "roles": list(ROLES),
        "grants": [{"role": role, "obj": obj, "scope": f"{obj._meta.model_name}:{obj.slug}"}  # type: ignore[attr-defined]
                   for role, obj in grants_of(user)],
        "scopes": _scopes(), "error": error, "myself": user.pk == request.user.pk}, status=status)


@login_required
@require_GET
def person_detail(request: HttpRequest, user_id: int) -> HttpResponse:
    _admin(request)
    return _detail(request, get_object_or_404(get_user_model(), pk=user_id))


@login_required
@require_POST
def person_update(request: HttpRequest, user_id: int) -> HttpResponseBase:
    """The person form: estate-wide roles, e-mail, may log in; or a new password when one is given."""
    _admin(request)
    user = get_object_or_404(get_user_model(), pk=user_id)
    actor = Actor.from_request(request)
    try:
        if request.POST.get("password"):
            people.user_password_set(actor=actor, user=user, password=request.POST["password"])
        else:
            people.user_update(actor=actor, user=user, acting_user=request.user, roles=request.POST.getlist("roles"),
                               active=request.POST.get("active") == "on", email=request.POST.get("email", ""))
    except people.PeopleError as exc:
        return _detail(request, user, error=exc.message, status=422)
    return redirect(reverse("people:person-detail", args=[user.pk]))


@login_required
@require_POST
def person_grant(request: HttpRequest, user_id: int, change: str) -> HttpResponseBase:
    """Grant (``change`` "add") or take away ("remove") a role on one region or site."""
    _admin(request)
    user = get_object_or_404(get_user_model(), pk=user_id)
    role, scope = request.POST.get("role", ""), request.POST.get("scope", "")
    obj = _scope_object(scope)
    if role not in ROLES:
        return _detail(request, user, error=f"role: unknown role {role!r}; roles are {', '.join(ROLES)}", status=422)
    if obj is None:
        return _detail(request, user, error=f"scope: no region or site {scope!r}", status=422)
    held = any(r == role and o == obj for r, o in grants_of(user))
    if change == "add" and held:
        return _detail(request, user, error=f"{user} already holds {role} on {scope}", status=422)
    if change == "remove" and not held:
        return _detail(request, user, error=f"{user} holds no {role} on {scope}", status=422)
    (role_grant if change == "add" else role_revoke)(actor=Actor.from_request(request), principal=user, role=role,
                                                     obj=obj)
    return redirect(reverse("people:person-detail", args=[user.pk]))

"""Roles, scopes and the one permission helper every read goes through.

**Roles** are what a person may do: ``Viewer`` (see), ``Operator`` (see and
operate: tokens, installers, deployments), ``Approver`` (see and approve other
people's changes), ``Admin`` (everything). Each role is a Django group.
The ``query`` action (run federated queries against a site) has no
permission of its own: it comes with ``operate`` (:data:`IMPLIED_BY`).

**Scope** is where: membership of a role's group grants it estate-wide;
:func:`role_grant` grants it on one region or one site only, as django-guardian
object permissions. A grant on a region covers every site in it, including
sites added later.

Every query that depends on who asks goes through :func:`restrict`, so no view
can forget it, and this is the only module that calls guardian.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar

from django.contrib.auth.models import Group, Permission
from django.db import models, transaction
from guardian.shortcuts import assign_perm, get_objects_for_user, remove_perm

if TYPE_CHECKING:
    from audit.services import Actor

Action = Literal["view", "operate", "approve", "administer", "query"]
ACTIONS: tuple[Action, ...] = ("view", "operate", "approve", "administer")
# Actions granted with another one rather than by a permission of their own: running a federated query
# against a site comes with operating it (Operator, Admin), per region or site like any grant.
IMPLIED_BY: dict[Action, Action] = {"query": "operate"}

ROLES: dict[str, tuple[Action, ...]] = {
    "Viewer": ("view",),
    "Operator": ("view", "operate"),
    "Approver": ("view", "approve"),
    "Admin": ("view", "operate", "approve", "administer"),
}

M = TypeVar("M", bound=models.Model)


def _codename(action: Action, model_name: str) -> str:
    return f"{action}_{model_name}"


def roles_sync() -> None:
    """Create the role groups and give each the estate-wide permissions of its actions."""
    for role, actions in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        codenames = [_codename(a, m) for a in actions for m in ("region", "site")]
        if "view" in actions:
            codenames += ["view_node", "view_enrollmenttoken"]
        if "administer" in actions:
            codenames += ["view_auditevent"]
        perms = Permission.objects.filter(
            content_type__app_label__in=["sites", "audit"], codename__in=codenames
        )
        group.permissions.add(*perms)


def _site_model() -> type[models.Model]:
    from sites.models import Site

    return Site


def _region_model() -> type[models.Model]:
    from sites.models import Region

    return Region


def site_ids_for(user: Any, action: Action) -> models.QuerySet[Any] | None:
    """Primary keys of the sites ``user`` may ``action``; None means every site."""
    action = IMPLIED_BY.get(action, action)
    if not user.is_authenticated or not user.is_active:
        return _site_model().objects.none().values("pk")
    if user.is_superuser or user.has_perm(f"sites.{_codename(action, 'site')}"):
        return None
    Site = _site_model()
    Region = _region_model()
    direct = get_objects_for_user(
        user, f"sites.{_codename(action, 'site')}", klass=Site, accept_global_perms=False
    ).values("pk")
    regions = get_objects_for_user(
        user, f"sites.{_codename(action, 'region')}", klass=Region, accept_global_perms=False
    ).values("pk")
    return Site.objects.filter(models.Q(pk__in=direct) | models.Q(region__in=regions)).values("pk")


def restrict(queryset: models.QuerySet[M], user: Any, action: Action = "view") -> models.QuerySet[M]:
    """Narrow ``queryset`` to the objects ``user`` may ``action``.

    Knows how each model hangs off a site; a model it does not know is an
    error, never an unfiltered queryset.
    """
    model = queryset.model
    label = model._meta.label_lower
    ids = site_ids_for(user, action)
    if label == "sites.site":
        return queryset if ids is None else queryset.filter(pk__in=ids)
    if label == "sites.region":
        if ids is None:
            return queryset
        return queryset.filter(sites__in=ids).distinct()
    if label in {"sites.node", "sites.enrollmenttoken"}:
        return queryset if ids is None else queryset.filter(site__in=ids)
    if label == "audit.auditevent":
        if user.is_authenticated and (user.is_superuser or user.has_perm("audit.view_auditevent")):
            return queryset
        if ids is None:
            return queryset
        site_uuids = _site_model().objects.filter(pk__in=ids).values("uuid")
        return queryset.filter(site_uuid__in=site_uuids)
    raise TypeError(f"restrict() does not know how {label} is scoped")


def user_can(user: Any, action: Action, site: models.Model) -> bool:
    ids = site_ids_for(user, action)
    if ids is None:
        return True
    return _site_model().objects.filter(pk=site.pk, pk__in=ids).exists()


def role_grant(*, actor: Actor, principal: Any, role: str, obj: models.Model) -> None:
    """Grant ``role`` to a user or group on one region or site, audited."""
    from audit.services import audit_record

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    model_name = obj._meta.model_name
    if model_name not in {"region", "site"}:
        raise TypeError("roles are granted on a region or a site")
    with transaction.atomic():
        for action in ROLES[role]:
            assign_perm(f"sites.{_codename(action, model_name)}", principal, obj)
        audit_record(
            actor=actor,
            action="role.grant",
            obj=obj,
            site_uuid=getattr(obj, "uuid", None) if model_name == "site" else None,
            after={"principal": str(principal), "role": role, "scope": f"{model_name}:{obj}"},
        )


def role_revoke(*, actor: Actor, principal: Any, role: str, obj: models.Model) -> None:
    from audit.services import audit_record

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    model_name = obj._meta.model_name
    with transaction.atomic():
        for action in ROLES[role]:
            remove_perm(f"sites.{_codename(action, model_name)}", principal, obj)
        audit_record(
            actor=actor,
            action="role.revoke",
            obj=obj,
            site_uuid=getattr(obj, "uuid", None) if model_name == "site" else None,
            before={"principal": str(principal), "role": role, "scope": f"{model_name}:{obj}"},
        )

"""Roles and their grants: estate-wide, or on one region or one site.

**Roles** are what a person may do: ``Viewer`` (see), ``Operator`` (see and
operate: tokens, installers, deployments), ``Approver`` (see and approve other
people's changes), ``Admin`` (everything). Each role is a Django group.
The ``query`` action (run federated queries against a site) has no
permission of its own: it comes with ``operate`` (``core.permissions.IMPLIED_BY``).

**Scope** is where: membership of a role's group grants it estate-wide;
:func:`role_grant` grants it on one region or one site only, as django-guardian
object permissions. A grant on a region covers every site in it, including
sites added later.

Reads go through ``Model.objects.restrict(user, action)`` (:mod:`core.permissions`,
where each model declares its scope); this module writes the grants. The two
are the only modules that call guardian.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db import models, transaction
from guardian.shortcuts import assign_perm, remove_perm

from audit.services import Actor, audit_record
from core.permissions import Action, codename

ROLES: dict[str, tuple[Action, ...]] = {
    "Viewer": ("view",),
    "Operator": ("view", "operate"),
    "Approver": ("view", "approve"),
    "Admin": ("view", "operate", "approve", "administer"),
}

def roles_sync() -> None:
    """Create the role groups and give each the estate-wide permissions of its actions."""
    for role, actions in ROLES.items():
        group, _ = Group.objects.get_or_create(name=role)
        codenames = [codename(a, m) for a in actions for m in ("region", "site")]
        if "view" in actions:
            codenames += ["view_node", "view_enrollmenttoken"]
        if "administer" in actions:
            codenames += ["view_auditevent"]
        perms = Permission.objects.filter(
            content_type__app_label__in=["sites", "audit"], codename__in=codenames
        )
        group.permissions.add(*perms)


def role_grant(*, actor: Actor, principal: Any, role: str, obj: models.Model) -> None:
    """Grant ``role`` to a user or group on one region or site, audited."""
    _role_change(actor=actor, principal=principal, role=role, obj=obj, grant=True)


def role_revoke(*, actor: Actor, principal: Any, role: str, obj: models.Model) -> None:
    """Take ``role`` on one region or site away from a user or group, audited."""
    _role_change(actor=actor, principal=principal, role=role, obj=obj, grant=False)


def _role_change(*, actor: Actor, principal: Any, role: str, obj: models.Model, grant: bool) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    model_name = obj._meta.model_name
    if model_name not in {"region", "site"}:
        raise TypeError("roles are granted on a region or a site")
    change = assign_perm if grant else remove_perm
    record = {"principal": str(principal), "role": role, "scope": f"{model_name}:{obj}"}
    actions = set(ROLES[role])
    if not grant and isinstance(principal, get_user_model()):
        # Keep what another role held on the same object still needs (Operator and Approver share "view").
        actions -= {a for other, where in grants_of(principal) if where == obj and other != role
                    for a in ROLES[other]}
    with transaction.atomic():
        for action in sorted(actions):
            change(f"sites.{codename(action, model_name)}", principal, obj)
        audit_record(
            actor=actor,
            action="role.grant" if grant else "role.revoke",
            obj=obj,
            site_uuid=getattr(obj, "uuid", None) if model_name == "site" else None,
            before=None if grant else record,
            after=record if grant else None,
        )


def grants_of(principal: Any) -> list[tuple[str, models.Model]]:
    """The roles granted to a user on single regions and sites: (role, region or site), by where then role.

    A grant is the set of its role's actions on the object (:func:`role_grant`); actions that make up no
    role exactly are shown as the largest role they hold.
    """
    from guardian.models import UserObjectPermission

    held: dict[tuple[str, str], set[str]] = {}
    for row in UserObjectPermission.objects.filter(user=principal).select_related("permission__content_type"):
        model_name = row.permission.content_type.model
        if model_name in {"region", "site"}:
            held.setdefault((model_name, row.object_pk), set()).add(row.permission.codename.split("_", 1)[0])
    found: list[tuple[str, models.Model]] = []
    from django.apps import apps

    for (model_name, pk), actions in held.items():
        obj = apps.get_model("sites", model_name).objects.filter(pk=pk).first()
        if obj is None:
            continue
        for role, role_actions in ROLES.items():
            if set(role_actions) <= actions and not any(
                    set(role_actions) < set(other) <= actions for other in ROLES.values()):
                found.append((role, obj))
    return sorted(found, key=lambda g: (g[1]._meta.model_name or "", str(g[1]), g[0]))

"""People: console users, their estate-wide roles and their grants on regions and sites, all audited.

Estate-wide roles are memberships of the role groups (``policies.permissions``);
grants on one region or site go through :func:`role_grant` and
:func:`role_revoke`. Each write here runs in one transaction with its audit
event and raises :class:`PeopleError` naming the field at fault; nothing is
half-applied. No one can take their own Admin role away or deactivate
themselves, so an estate cannot lose its last way in by a slip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.exceptions import ValidationError
from django.db import transaction

from audit.services import Actor, audit_record
from policies.permissions import ROLES


class PeopleError(Exception):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def estate_roles(user: Any) -> list[str]:
    return [name for name in ROLES if user.groups.filter(name=name).exists()]


def _fields(user: Any) -> dict[str, Any]:
    return {"username": user.get_username(), "email": user.email, "active": user.is_active,
            "roles": estate_roles(user)}


def _roles_clean(roles: Sequence[str]) -> list[str]:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise PeopleError(f"roles: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}", field="roles")
    return [r for r in ROLES if r in roles]


def _password_check(password: str, user: Any) -> None:
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise PeopleError("password: " + " ".join(exc.messages), field="password") from None


def user_create(*, actor: Actor, username: str, password: str, email: str = "",
                roles: Sequence[str] = ()) -> Any:
    """A new console user with ``roles`` estate-wide (none: grant them a region or site next)."""
    model = get_user_model()
    username = username.strip()
    try:
        UnicodeUsernameValidator()(username)
    except ValidationError:
        raise PeopleError(f"username: {username!r} may hold only letters, digits and @ . + - _",
                          field="username") from None
    if not username or len(username) > 150:
        raise PeopleError("username: 1 to 150 characters", field="username")
    cleaned = _roles_clean(roles)
    with transaction.atomic():
        if model.objects.filter(username__iexact=username).exists():
            raise PeopleError(f"username: {username} is taken", field="username")
        user = model(username=username, email=email.strip())
        _password_check(password, user)
        user.set_password(password)
        user.save()
        user.groups.set(Group.objects.filter(name__in=cleaned))
        audit_record(actor=actor, action="user.create", obj=user, object_repr=username, after=_fields(user))
    return user


def user_update(*, actor: Actor, user: Any, acting_user: Any, active: bool | None = None,
                roles: Sequence[str] | None = None, email: str | None = None) -> Any:
    """Change a user's estate-wide roles, e-mail or whether they may log in; audited with before and after."""
    cleaned = None if roles is None else _roles_clean(roles)
    with transaction.atomic():
        user = get_user_model().objects.select_for_update().get(pk=user.pk)
        before = _fields(user)
        myself = user.pk == getattr(acting_user, "pk", None)
        if myself and active is False:
            raise PeopleError("active: you cannot deactivate yourself; ask another administrator", field="active")
        if myself and cleaned is not None and "Admin" in before["roles"] and "Admin" not in cleaned:
            raise PeopleError("roles: you cannot take your own Admin role away; ask another administrator",
                              field="roles")
        if active is not None:
            user.is_active = active
        if email is not None:
            user.email = email.strip()
        user.save()
        if cleaned is not None:
            user.groups.set(Group.objects.filter(name__in=cleaned))
        after = _fields(user)
        if after != before:
            changed = [k for k in after if after[k] != before[k]]
            audit_record(actor=actor, action="user.update", obj=user, object_repr=user.get_username(),
                         before={k: before[k] for k in changed}, after={k: after[k] for k in changed})
    return user


def user_password_set(*, actor: Actor, user: Any, password: str) -> None:
    """Give a user a new password (an administrator's reset); audited, the password never recorded."""
    _password_check(password, user)
    with transaction.atomic():
        user.set_password(password)
        user.save(update_fields=["password"])
        audit_record(actor=actor, action="user.password_set", obj=user, object_repr=user.get_username())

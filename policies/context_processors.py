"""What every console page needs to know of the user's roles: whether to offer People."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from core.permissions import may_everywhere


def console_roles(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"can_manage_people": SimpleLazyObject(lambda: may_everywhere(user, "administer"))}

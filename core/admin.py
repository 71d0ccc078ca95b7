"""What every app's admin pages share: a missing object answers 404, and read-only pages stay read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import Http404


class NotFoundAdminMixin:
    """An id that names no object answers 404, on the change, delete and history pages alike.

    Django's admin redirects to its index for a missing object; for an id
    that is not even a valid key (``abc`` for an integer key, a UUID) the
    pages it reaches are not all as careful. One answer for both, as every
    other page of the console gives: 404.
    """

    def get_object(self, request: Any, object_id: str, from_field: str | None = None) -> Any:
        obj = super().get_object(request, object_id, from_field)  # type: ignore[misc]
        if obj is None:
            raise Http404(f"no {self.model._meta.verbose_name} with id {object_id!r}")  # type: ignore[attr-defined]
        return obj


class ReadOnlyAdmin(NotFoundAdminMixin, admin.ModelAdmin):
    """Listed and shown, never added, changed or deleted here: such rows change only through their services."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

"""Rollouts in the Django admin: read-only (they move only through their services and ticks)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from audit.admin import NotFoundAdminMixin
from rollouts.models import Rollout, RolloutEvent


class ReadOnly(NotFoundAdminMixin, admin.ModelAdmin):
    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Rollout)
class RolloutAdmin(ReadOnly):
    list_display = ["uuid", "version", "state", "current_wave", "wave_phase", "created_at"]
    list_filter = ["state"]


@admin.register(RolloutEvent)
class RolloutEventAdmin(ReadOnly):
    list_display = ["rollout", "kind", "from_state", "to_state", "node", "at"]
    list_filter = ["kind"]

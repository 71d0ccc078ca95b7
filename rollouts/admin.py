"""Rollouts in the Django admin: read-only (they move only through their services and ticks)."""

from __future__ import annotations

from django.contrib import admin

from core.admin import ReadOnlyAdmin
from rollouts.models import Rollout, RolloutEvent


@admin.register(Rollout)
class RolloutAdmin(ReadOnlyAdmin):
    list_display = ["uuid", "version", "state", "current_wave", "wave_phase", "created_at"]
    list_filter = ["state"]


@admin.register(RolloutEvent)
class RolloutEventAdmin(ReadOnlyAdmin):
    list_display = ["rollout", "kind", "from_state", "to_state", "node", "at"]
    list_filter = ["kind"]

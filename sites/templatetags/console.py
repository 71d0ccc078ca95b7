"""Small formatting filters of the console."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def ago(value: dt.datetime | None) -> str:
    """"12 s ago", "3 min ago": node syncs come every few seconds, so seconds matter."""
    if value is None:
        return "never"
    seconds = max(0, int((timezone.now() - value).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


@register.filter
def compact_json(value: Any) -> str:
    """One line of JSON, the way the audit trail stores it."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "), default=str)

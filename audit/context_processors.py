"""What every console page needs to know about the audit trail: node logs that forked (a banner)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from audit.log_models import NodeLog, NodeLogState


def audit_alerts(request: HttpRequest) -> dict[str, Any]:
    """``audit_forked``: how many node logs the user may see are forked; counted only if a page shows it."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"audit_forked": SimpleLazyObject(
        lambda: NodeLog.objects.restrict(user).filter(state=NodeLogState.FORKED).count())}

from __future__ import annotations

from typing import Any

from django.contrib import admin

from audit.models import AuditEvent
from core.admin import ReadOnlyAdmin


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the audit trail is append-only for everyone."""

    list_display = ["seq", "created_at", "actor_type", "actor", "action", "object_repr"]
    list_filter = ["actor_type", "action"]
    search_fields = ["actor", "action", "object_repr", "object_id"]


class AuditedAdminMixin:
    """Writes an audit event for every add, change and delete made in the admin.

    The admin runs each save in a transaction, so the record commits or rolls
    back with the change.
    """

    def save_model(self, request: Any, obj: Any, form: Any, change: bool) -> None:
        from django.forms.models import model_to_dict

        from audit.services import Actor, audit_record

        before = None
        if change:
            old = type(obj).objects.filter(pk=obj.pk).first()
            before = _jsonable(model_to_dict(old)) if old is not None else None
        super().save_model(request, obj, form, change)  # type: ignore[misc]
        audit_record(
            actor=Actor.from_request(request),
            action=f"{obj._meta.model_name}.{'update' if change else 'create'}",
            obj=obj,
            site_uuid=_site_uuid(obj),
            before=before,
            after=_jsonable(model_to_dict(obj)),
        )

    def delete_model(self, request: Any, obj: Any) -> None:
        from django.forms.models import model_to_dict

        from audit.services import Actor, audit_record

        audit_record(
            actor=Actor.from_request(request),
            action=f"{obj._meta.model_name}.delete",
            obj=obj,
            site_uuid=_site_uuid(obj),
            before=_jsonable(model_to_dict(obj)),
        )
        super().delete_model(request, obj)  # type: ignore[misc]

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        for obj in queryset:
            self.delete_model(request, obj)


def _site_uuid(obj: Any) -> Any:
    if obj._meta.label_lower == "sites.site":
        return obj.uuid
    site = getattr(obj, "site", None)
    return getattr(site, "uuid", None)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    import json

    from django.core.serializers.json import DjangoJSONEncoder

    return json.loads(json.dumps(data, cls=DjangoJSONEncoder, default=str))

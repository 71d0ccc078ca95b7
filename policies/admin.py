"""Policies and approvals in the Django admin.

A policy version is written through ``policies.services.policy_update`` here
as in the console (validated, versioned, audited, pushed to nodes); versions
and approvals are never edited or deleted.

Users and groups are Django's own admin pages, audited here: a role is a
group (``policies.permissions``), so who joins or leaves one, and who becomes
a superuser or staff, is a change of permissions the audit trail must show.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth import admin as auth_admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError

from audit.services import Actor, audit_record
from core.admin import NotFoundAdminMixin, ReadOnlyAdmin
from policies import services
from policies.models import Approval, Policy, PolicyKind, PolicyVersion


class PolicyVersionForm(forms.ModelForm):
    kind = forms.ChoiceField(choices=PolicyKind.choices)
    text = forms.CharField(label="Document (JSON)", widget=forms.Textarea(attrs={"rows": 20, "cols": 100}))

    class Meta:
        model = PolicyVersion
        fields = ["comment"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if "kind" in data and "text" in data:
            try:
                services.policy_validate(kind=data["kind"], document=data["text"])
            except services.PoliciesError as exc:
                raise ValidationError({"text": exc.message}) from exc
        return data


@admin.register(PolicyVersion)
class PolicyVersionAdmin(NotFoundAdminMixin, admin.ModelAdmin):
    list_display = ["policy", "number", "created_by", "created_at", "comment"]
    list_filter = ["policy__kind"]
    readonly_fields = ["policy", "number", "document_json", "sha256", "comment", "created_by", "created_at"]
    form = PolicyVersionForm

    def get_fields(self, request: Any, obj: Any = None) -> list[Any]:
        return ["kind", "text", "comment"] if obj is None else self.readonly_fields

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [] if obj is None else self.readonly_fields

    @admin.display(description="Document")
    def document_json(self, obj: PolicyVersion) -> str:
        return json.dumps(obj.document, indent=2)

    def save_model(self, request: Any, obj: PolicyVersion, form: Any, change: bool) -> None:
        data = form.cleaned_data
        try:
            created = services.policy_update(actor=Actor.from_request(request), kind=data["kind"],
                                             document=data["text"], comment=data.get("comment", ""))
        except services.PoliciesError as exc:
            raise ValidationError(exc.message) from exc
        obj.pk, obj.policy, obj.number = created.pk, created.policy, created.number

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Policy)
class PolicyAdmin(ReadOnlyAdmin):
    list_display = ["kind", "created_at"]


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    list_display = ["subject_type", "subject_uuid", "decision", "user", "role", "decided_at", "expires_at"]
    list_filter = ["decision", "role"]


def _user_roles(user: Any) -> dict[str, Any]:
    if user.pk is None:
        return {}
    fresh = type(user).objects.get(pk=user.pk)
    return {"username": fresh.username, "is_active": fresh.is_active, "is_staff": fresh.is_staff,
            "is_superuser": fresh.is_superuser, "groups": sorted(fresh.groups.values_list("name", flat=True)),
            "permissions": sorted(fresh.user_permissions.values_list("codename", flat=True))}


def _group_roles(group: Group) -> dict[str, Any]:
    if group.pk is None:
        return {}
    fresh = Group.objects.get(pk=group.pk)
    return {"name": fresh.name, "permissions": sorted(fresh.permissions.values_list("codename", flat=True)),
            "members": sorted(fresh.user_set.values_list("username", flat=True))}


class AuditedPrincipalAdmin(NotFoundAdminMixin):
    """Audits a user's or group's permissions before and after a change (their many-to-many fields included).

    The admin saves the row, then its many-to-many fields, in one transaction;
    the before is taken ahead of both, the after once both are saved.
    """

    entity = ""

    def _roles(self, obj: Any) -> dict[str, Any]:
        """What is audited of ``obj``: each subclass (users, groups) says which of its fields count."""
        raise NotImplementedError(f"{type(self).__name__} must say what of a {self.entity or 'principal'} is audited")

    def save_model(self, request: Any, obj: Any, form: Any, change: bool) -> None:
        form.audit_before = self._roles(obj) if change else None
        super().save_model(request, obj, form, change)  # type: ignore[misc]

    def save_related(self, request: Any, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)  # type: ignore[misc]
        before, after = getattr(form, "audit_before", None), self._roles(form.instance)
        if before != after:
            audit_record(actor=Actor.from_request(request), action=f"{self.entity}.{'update' if change else 'create'}",
                         obj=form.instance, before=before, after=after)

    def delete_model(self, request: Any, obj: Any) -> None:
        audit_record(actor=Actor.from_request(request), action=f"{self.entity}.delete", obj=obj,
                     before=self._roles(obj))
        super().delete_model(request, obj)  # type: ignore[misc]

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        for obj in queryset:
            self.delete_model(request, obj)


User = get_user_model()
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class UserAdmin(AuditedPrincipalAdmin, auth_admin.UserAdmin):
    entity = "user"

    def _roles(self, obj: Any) -> dict[str, Any]:
        return _user_roles(obj)


@admin.register(Group)
class GroupAdmin(AuditedPrincipalAdmin, auth_admin.GroupAdmin):
    entity = "group"

    def _roles(self, obj: Any) -> dict[str, Any]:
        return _group_roles(obj)

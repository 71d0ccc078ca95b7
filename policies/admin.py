"""Policies and approvals in the Django admin.

A policy version is written through ``policies.services.policy_update`` here
as in the console (validated, versioned, audited, pushed to nodes); versions
and approvals are never edited or deleted.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError

from audit.services import Actor
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
class PolicyVersionAdmin(admin.ModelAdmin):
    list_display = ["policy", "number", "created_by", "created_at", "comment"]
    list_filter = ["policy__kind"]
    readonly_fields = ["policy", "number", "document_json", "sha256", "comment", "created_by", "created_at"]
    form = PolicyVersionForm

    def get_fields(self, request: Any, obj: Any = None) -> list[str]:
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
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["kind", "created_at"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Approval)
class ApprovalAdmin(admin.ModelAdmin):
    list_display = ["subject_type", "subject_uuid", "decision", "user", "role", "decided_at", "expires_at"]
    list_filter = ["decision", "role"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

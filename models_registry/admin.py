"""The registry in the Django admin.

Artifacts and validation results are read-only here; a model created or
changed, or a version uploaded, through the admin goes through the same
services as the console (stored, audited, validated by a worker; a new
classification republishes the nodes' desired states).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin

from audit.admin import AuditedAdminMixin
from audit.services import Actor
from core.admin import NotFoundAdminMixin, ReadOnlyAdmin
from models_registry import services
from models_registry.forms import VersionUploadForm
from models_registry.models import Deployment, Model, ModelVariant, ModelVersion, ModelVersionEvent, NodeModelReport

VERSION_READONLY = [
    "uuid", "model", "version", "sha256", "size", "signature", "status", "validation_log", "opset",
    "signature_inputs", "signature_outputs", "min_memory_mb", "node_roles", "required_providers",
    "preferred_providers", "forbidden_providers", "provider_options", "output_rtol", "output_atol", "finite_inputs",
    "allow_quantized", "max_batch_size", "max_queue_delay_ms", "created_by", "created_at",
    "claimed_at", "attempts",
]


@admin.register(Model)
class ModelAdmin(AuditedAdminMixin, NotFoundAdminMixin, admin.ModelAdmin):
    list_display = ["slug", "name", "classification", "created_at"]
    search_fields = ["slug", "name"]
    readonly_fields = ["uuid", "created_by", "created_at"]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        # Nodes serve a model under its slug: renaming it would orphan what they run.
        return [*self.readonly_fields, "slug"] if obj is not None else self.readonly_fields

    def save_model(self, request: Any, obj: Model, form: Any, change: bool) -> None:
        if change:
            # model_update audits, and a new classification republishes where the model may run.
            services.model_update(actor=Actor.from_request(request), model=obj,
                                  **{name: form.cleaned_data[name] for name in form.changed_data})
            return
        created = services.model_create(actor=Actor.from_request(request), slug=obj.slug, name=obj.name,
                                        description=obj.description, classification=obj.classification)
        obj.pk, obj.uuid, obj.created_at = created.pk, created.uuid, created.created_at

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class VersionAddForm(VersionUploadForm, forms.ModelForm):
    class Meta:
        model = ModelVersion
        fields = ["model"]

    def clean(self) -> dict[str, Any]:
        # The admin cannot report an error after save_model starts: check here
        # what the service would refuse before storing anything.
        data = super().clean() or {}
        model, version, file = data.get("model"), data.get("version"), data.get("file")
        if model and version and ModelVersion.objects.filter(model=model, version=version).exists():
            self.add_error("version", f"model {model.slug} already has a version {version}")
        if file is not None and file.size > settings.MAX_MODEL_BYTES:
            self.add_error("file", f"the file is larger than the limit of {settings.MAX_MODEL_BYTES} bytes")
        return data


@admin.register(ModelVersion)
class ModelVersionAdmin(NotFoundAdminMixin, admin.ModelAdmin):
    list_display = ["__str__", "status", "size", "opset", "created_at"]
    list_filter = ["status", "model"]
    search_fields = ["model__slug", "version", "sha256"]

    def get_form(self, request: Any, obj: Any = None, change: bool = False, **kwargs: Any) -> Any:
        if obj is None:
            return VersionAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: Any, obj: Any = None) -> Any:
        if obj is None:
            return ["model", *VersionUploadForm.base_fields]
        return VERSION_READONLY

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return VERSION_READONLY if obj is not None else []

    def save_model(self, request: Any, obj: ModelVersion, form: Any, change: bool) -> None:
        if change:
            return
        created = services.model_version_upload(
            actor=Actor.from_request(request), model=form.cleaned_data["model"],
            version=form.cleaned_data["version"], file=form.cleaned_data["file"], **form.requirements())
        obj.pk, obj.uuid, obj.created_at = created.pk, created.uuid, created.created_at

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(ModelVersionEvent)
class ModelVersionEventAdmin(ReadOnlyAdmin):
    list_display = ["version", "from_status", "to_status", "at", "message"]
    list_filter = ["to_status"]


@admin.register(ModelVariant)
class ModelVariantAdmin(ReadOnlyAdmin):
    list_display = ["version", "kind", "size", "max_abs_diff", "created_at"]


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = ["version", "site", "node", "created_by", "created_at", "removed_at"]
    list_filter = ["removed_at"]


@admin.register(NodeModelReport)
class NodeModelReportAdmin(ReadOnlyAdmin):
    list_display = ["node", "name", "version", "variant", "state", "first_reported_at"]
    list_filter = ["state"]

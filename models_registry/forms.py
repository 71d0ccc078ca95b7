from __future__ import annotations

from typing import Any

from django import forms

from models_registry.models import VERSION_PATTERN
from sites.models import Clearance, NodeRole


class ModelCreateForm(forms.Form):
    slug = forms.RegexField(regex=r"^[a-z0-9][a-z0-9._-]{0,99}$", max_length=100, label="Name on the wire",
                            help_text="What nodes serve it as: lower-case letters, digits, '.', '_', '-'.")
    name = forms.CharField(max_length=100)
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)
    classification = forms.TypedChoiceField(choices=Clearance.choices, coerce=int, initial=Clearance.INTERNAL,
                                            help_text="Sites below this clearance never receive it.")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]


class VersionUploadForm(forms.Form):
    file = forms.FileField(help_text="One self-contained .onnx file.")
    version = forms.RegexField(regex=VERSION_PATTERN, max_length=50, help_text="For example 1.0.0")
    min_memory_mb = forms.IntegerField(min_value=0, initial=0, label="Minimum memory (MB)")
    node_roles = forms.MultipleChoiceField(choices=NodeRole.choices, required=False,
                                           widget=forms.CheckboxSelectMultiple, help_text="None ticked: any role.")
    required_providers = forms.CharField(required=False, help_text="Comma separated; nodes without one get nothing.")
    preferred_providers = forms.CharField(required=False, help_text="Comma separated, best first.")
    allow_quantized = forms.BooleanField(required=False, label="Make an int8 variant for small devices")
    max_batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=8)
    max_queue_delay_ms = forms.FloatField(min_value=0, max_value=1000, initial=0.0, label="Max queue delay (ms)")

    def requirements(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "min_memory_mb": data["min_memory_mb"],
            "node_roles": list(data["node_roles"]),
            "required_providers": _split(data["required_providers"]),
            "preferred_providers": _split(data["preferred_providers"]),
            "allow_quantized": data["allow_quantized"],
            "max_batch_size": data["max_batch_size"],
            "max_queue_delay_ms": data["max_queue_delay_ms"],
        }

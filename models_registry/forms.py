from __future__ import annotations

import json
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
    forbidden_providers = forms.CharField(required=False, help_text="Comma separated; never run on these.")
    provider_options = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}),
        help_text='JSON by provider, e.g. {"OpenVINOExecutionProvider": {"device_type": "GPU", "precision": "FP16"}}')
    output_rtol = forms.FloatField(required=False, min_value=0, max_value=1, initial=1e-4,
                                   label="Answer tolerance (relative)",
                                   help_text="How far an accelerator's outputs may be from CPU's before CPU serves.")
    output_atol = forms.FloatField(required=False, min_value=0, max_value=1e6, initial=1e-5,
                                   label="Answer tolerance (absolute)")
    finite_inputs = forms.BooleanField(required=False, label="Inputs are never NaN or infinite",
                                       help_text="Nodes then check accelerators without NaN or infinite inputs.")
    allow_quantized = forms.BooleanField(required=False, label="Make an int8 variant for small devices")
    max_batch_size = forms.IntegerField(min_value=1, max_value=1024, initial=8)
    max_queue_delay_ms = forms.FloatField(min_value=0, max_value=1000, initial=0.0, label="Max queue delay (ms)")

    def clean_provider_options(self) -> dict[str, Any]:
        text = self.cleaned_data["provider_options"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("must be a JSON object of provider names to their options")
        return value

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
            "forbidden_providers": _split(data["forbidden_providers"]),
            "provider_options": data["provider_options"],
            "output_rtol": data["output_rtol"] if data["output_rtol"] is not None else 1e-4,
            "output_atol": data["output_atol"] if data["output_atol"] is not None else 1e-5,
            "finite_inputs": data["finite_inputs"],
        }

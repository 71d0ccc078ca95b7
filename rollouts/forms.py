"""The new-rollout form: a version, a target and a strategy (defaults from the rollout policy)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.db.models import F

from edge_runtime.policy.rollout import Strategy
from models_registry.models import ModelVersion, VersionStatus
from sites.models import NodeRole


class VersionChoiceField(forms.ModelChoiceField):
    """Versions by model, newest first, the rolled-back ones last and marked as such."""

    def label_from_instance(self, obj: Any) -> str:
        if obj.rolled_back_at is None:
            return str(obj)
        return f"{obj} — rolled back {obj.rolled_back_at:%d %b %H:%M} ({obj.rolled_back_note[:80]})"


class RolloutForm(forms.Form):
    version = VersionChoiceField(queryset=ModelVersion.objects.none(), to_field_name="uuid")
    regions = forms.MultipleChoiceField(required=False, choices=[])
    sites = forms.MultipleChoiceField(required=False, choices=[])
    labels = forms.CharField(required=False, help_text="site labels, e.g. line=3, tier=gold")
    roles = forms.MultipleChoiceField(required=False, choices=NodeRole.choices,
                                      widget=forms.CheckboxSelectMultiple)
    canary_nodes = forms.IntegerField(min_value=1, max_value=10_000)
    percentages = forms.CharField(help_text="cumulative percentages of the rest, ending at 100, e.g. 25, 50, 100")
    bake_s = forms.FloatField(min_value=0, label="Bake time per wave (s)")
    gate = forms.BooleanField(required=False, label="Health gate on every wave")
    min_requests = forms.IntegerField(min_value=1)
    max_error_rate = forms.FloatField(min_value=0, max_value=1)
    max_error_rate_increase = forms.FloatField(min_value=0, max_value=1)
    max_p95_ratio = forms.FloatField(min_value=0.01)
    fail_on_cpu_fallback = forms.BooleanField(required=False, label="Fail a wave where a node falls back to CPU",
                                              help_text="Its accelerator failed on the version or changed its answers.")
    fail_on_partial = forms.BooleanField(required=False, label="… or runs part of the graph on CPU")
    offline_timeout_s = forms.FloatField(min_value=0, label="Wait for offline nodes (s)")
    on_offline = forms.ChoiceField(choices=[("skip", "skip them and report"), ("pause", "pause the rollout")])
    max_offline_fraction = forms.FloatField(min_value=0.01, max_value=1,
                                            label="Pause while this share of the target is offline")

    def __init__(self, *args: Any, defaults: Strategy, regions: list[str], sites: list[tuple[str, str]],
                 **kwargs: Any) -> None:
        gate = defaults.gate
        initial = {
            "canary_nodes": defaults.canary_nodes,
            "percentages": ", ".join(f"{p:g}" for p in defaults.percentages),
            "bake_s": defaults.bake_s, "gate": gate is not None,
            "offline_timeout_s": defaults.offline_timeout_s, "on_offline": defaults.on_offline,
            "max_offline_fraction": defaults.max_offline_fraction,
        }
        if gate is not None:
            initial.update(min_requests=gate.min_requests, max_error_rate=gate.max_error_rate,
                           max_error_rate_increase=gate.max_error_rate_increase, max_p95_ratio=gate.max_p95_ratio,
                           fail_on_cpu_fallback=gate.fail_on_cpu_fallback, fail_on_partial=gate.fail_on_partial)
        else:
            initial.update(min_requests=20, max_error_rate=0.05, max_error_rate_increase=0.01, max_p95_ratio=1.5)
        kwargs.setdefault("initial", initial)
        super().__init__(*args, **kwargs)
        self.fields["version"].queryset = ModelVersion.objects.filter(  # type: ignore[attr-defined]
            status=VersionStatus.VALID).select_related("model").order_by(
            "model__slug", F("rolled_back_at").asc(nulls_first=True), "-created_at")
        self.fields["regions"].choices = [(r, r) for r in regions]  # type: ignore[attr-defined]
        self.fields["sites"].choices = sites  # type: ignore[attr-defined]

    def clean_labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        for part in (self.cleaned_data.get("labels") or "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise forms.ValidationError(f"{part.strip()!r} is not label=value")
            labels[key.strip()] = value.strip()
        return labels

    def clean_percentages(self) -> list[float]:
        try:
            return [float(p) for p in self.cleaned_data["percentages"].replace(";", ",").split(",") if p.strip()]
        except ValueError as exc:
            raise forms.ValidationError("numbers separated by commas, e.g. 25, 50, 100") from exc

    def target(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {"regions": data["regions"], "sites": data["sites"], "labels": data["labels"], "roles": data["roles"]}

    def strategy(self) -> dict[str, Any]:
        data = self.cleaned_data
        gate = {k: data[k] for k in ("min_requests", "max_error_rate", "max_error_rate_increase", "max_p95_ratio",
                                     "fail_on_cpu_fallback", "fail_on_partial")}
        return {
            "canary_nodes": data["canary_nodes"], "percentages": data["percentages"], "bake_s": data["bake_s"],
            "gate": gate if data["gate"] else None, "offline_timeout_s": data["offline_timeout_s"],
            "on_offline": data["on_offline"], "max_offline_fraction": data["max_offline_fraction"],
        }

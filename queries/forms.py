"""The query form: a dataset from the catalog, filters, group-by, time bucket, aggregates, an optional
scoring step, target sites and what to do about sites that are offline.

The form only builds the query document; validating it against the sites'
catalogs is :func:`queries.services.lifecycle.query_validate`'s, whose errors
name the document's field (``filters.0.value``). ``spec`` (a JSON document)
may be given instead of the fields, for what the fields do not offer
(``order_by``, rows mode).
"""

from __future__ import annotations

import json
from typing import Any

from django import forms

from edge_runtime.data.spec import AggregateOp, FilterOp, Interval
from queries.models import OfflineBehaviour
from queries.selectors import CatalogEntry
from queries.services.lifecycle import MAX_WAIT_S

AGGREGATE_SLOTS = 4
FILTER_SLOTS = 3
AGGREGATE_OPS: tuple[AggregateOp, ...] = ("count", "sum", "mean", "min", "max", "std", "var", "quantile")
FILTER_OPS: tuple[FilterOp, ...] = ("eq", "ne", "lt", "le", "gt", "ge", "in", "between", "is_null", "not_null")
INTERVALS: tuple[Interval, ...] = ("minute", "hour", "day", "week", "month")


class QueryForm(forms.Form):
    dataset = forms.ChoiceField(label="Dataset")
    sites = forms.MultipleChoiceField(label="Sites", widget=forms.CheckboxSelectMultiple,
                                      help_text="The sites whose nodes report the dataset and that you may query.")
    group_by = forms.MultipleChoiceField(label="Group by", required=False, widget=forms.CheckboxSelectMultiple)
    bucket_column = forms.ChoiceField(label="Time bucket column", required=False)
    bucket_interval = forms.ChoiceField(label="Time bucket", required=False,
                                        choices=[(i, i) for i in INTERVALS], initial="hour")
    score_model = forms.CharField(label="Score with model", required=False, max_length=100,
                                  help_text="Optional: a model the nodes serve; its output becomes a column.")
    score_inputs = forms.MultipleChoiceField(label="Model inputs", required=False,
                                             widget=forms.CheckboxSelectMultiple)
    score_output = forms.CharField(label="Model output", required=False, max_length=128)
    score_index = forms.IntegerField(label="Output index", required=False, min_value=0, max_value=4095,
                                     help_text="For an output with several values per row (class probabilities).")
    score_column = forms.CharField(label="Output column name", required=False, max_length=64, initial="score")
    limit = forms.IntegerField(label="Limit", required=False, min_value=1, max_value=100_000)
    spec = forms.CharField(label="Query document (JSON)", required=False, widget=forms.Textarea(attrs={"rows": 6}),
                           help_text="Advanced: a whole query document; when given, the fields above are ignored.")
    offline_behaviour = forms.ChoiceField(label="Offline sites", choices=OfflineBehaviour.choices,
                                          initial=OfflineBehaviour.WAIT, widget=forms.RadioSelect)
    deadline_s = forms.IntegerField(label="Answer within (seconds)", initial=60, min_value=1, max_value=86_400)
    wait_hours = forms.FloatField(label="Wait for offline and air-gapped sites (hours)", initial=24,
                                  min_value=0.001, max_value=MAX_WAIT_S / 3600,
                                  help_text="An air-gapped site answers when its bundle out comes back: up to 90 "
                                            "days.")

    def choice(self, name: str) -> forms.ChoiceField:
        """The choice field ``name``, typed as one (``self.fields`` holds plain Fields to the type checker)."""
        field = self.fields[name]
        assert isinstance(field, forms.ChoiceField), name
        return field

    def __init__(self, *args: Any, catalog: dict[str, CatalogEntry], dataset: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalog = catalog
        self.choice("dataset").choices = [(name, f"{name} ({len(e.sites)} site{'s' if len(e.sites) != 1 else ''})")
                                          for name, e in sorted(catalog.items())]
        self.entry = catalog.get(dataset or "") or (next(iter(sorted(catalog.items())))[1] if catalog else None)
        entry = self.entry
        columns = [(c, f"{c} ({t})") for c, t in entry.column_list if t != "mixed"] if entry else []
        self.choice("sites").choices = [(s, s) for s in entry.sites] if entry else []
        self.choice("group_by").choices = columns
        self.choice("bucket_column").choices = [("", "none")] + [(c, c) for c in (entry.timestamp_columns
                                                                                 if entry else [])]
        self.choice("score_inputs").choices = [(c, c) for c in (entry.numeric_columns if entry else [])]
        for i in range(1, AGGREGATE_SLOTS + 1):
            self.fields[f"agg_op_{i}"] = forms.ChoiceField(
                label=f"Aggregate {i}", required=False, choices=[("", "—")] + [(o, o) for o in AGGREGATE_OPS],
                initial="count" if i == 1 else "")
            self.fields[f"agg_column_{i}"] = forms.ChoiceField(
                label="of", required=False, choices=[("", "rows")] + columns)
            self.fields[f"agg_q_{i}"] = forms.FloatField(label="q", required=False, min_value=0, max_value=1,
                                                         help_text="quantile only (0.5: the median)")
        for i in range(1, FILTER_SLOTS + 1):
            self.fields[f"filter_column_{i}"] = forms.ChoiceField(label=f"Filter {i}", required=False,
                                                                  choices=[("", "—")] + columns)
            self.fields[f"filter_op_{i}"] = forms.ChoiceField(label="op", required=False,
                                                              choices=[(o, o) for o in FILTER_OPS])
            self.fields[f"filter_value_{i}"] = forms.CharField(
                label="value", required=False, max_length=2000,
                help_text="in: comma-separated; between: low, high; times as 2024-03-01T00:00:00Z")

    def clean_spec(self) -> dict[str, Any] | None:
        text = self.cleaned_data.get("spec", "").strip()
        if not text:
            return None
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"not valid JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise forms.ValidationError("a query document is a JSON object")
        return document

    def build_spec(self) -> dict[str, Any]:
        """The query document from the fields (or ``spec`` when given); call after ``is_valid``."""
        data = self.cleaned_data
        if data.get("spec") is not None:
            return dict(data["spec"])
        spec: dict[str, Any] = {"dataset": data["dataset"]}
        filters = self._spec_filters()
        if filters:
            spec["filters"] = filters
        if data.get("group_by"):
            spec["group_by"] = list(data["group_by"])
        if data.get("bucket_column"):
            spec["time_bucket"] = {"column": data["bucket_column"], "interval": data.get("bucket_interval") or "hour"}
        spec["aggregates"] = _spec_aggregates(data)
        if data.get("score_model"):
            output: dict[str, Any] = {"output": data.get("score_output") or "", "column":
                                      data.get("score_column") or "score"}
            if data.get("score_index") is not None:
                output["index"] = data["score_index"]
            spec["score"] = {"model": data["score_model"], "inputs": list(data.get("score_inputs") or []),
                             "outputs": [output]}
        if data.get("limit"):
            spec["limit"] = data["limit"]
        return spec

    def _spec_filters(self) -> list[dict[str, Any]]:
        """The filled filter slots; a value that does not fit its column's type is a field error, left out."""
        data = self.cleaned_data
        types = dict(self.entry.columns) if self.entry else {}
        filters = []
        for i in range(1, FILTER_SLOTS + 1):
            column = data.get(f"filter_column_{i}")
            if not column:
                continue
            op = data.get(f"filter_op_{i}") or "eq"
            text = data.get(f"filter_value_{i}", "")
            entry: dict[str, Any] = {"column": column, "op": op}
            if op not in ("is_null", "not_null"):
                try:
                    entry["value"] = _filter_value(text, types.get(column, "string"), op)
                except ValueError as exc:
                    self.add_error(f"filter_value_{i}", str(exc))
                    continue
            filters.append(entry)
        return filters


def _spec_aggregates(data: dict[str, Any]) -> list[dict[str, Any]]:
    aggregates = []
    for i in range(1, AGGREGATE_SLOTS + 1):
        op = data.get(f"agg_op_{i}")
        if not op:
            continue
        aggregate: dict[str, Any] = {"op": op}
        if data.get(f"agg_column_{i}"):
            aggregate["column"] = data[f"agg_column_{i}"]
        if op == "quantile":
            aggregate["q"] = data.get(f"agg_q_{i}") if data.get(f"agg_q_{i}") is not None else 0.5
        aggregates.append(aggregate)
    return aggregates


def _scalar(text: str, type_: str) -> Any:
    text = text.strip()
    if type_ == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if type_ == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if type_ == "bool":
        if text.lower() in ("true", "yes", "1"):
            return True
        if text.lower() in ("false", "no", "0"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    return text


def _filter_value(text: str, type_: str, op: str) -> Any:
    if op in ("in", "between"):
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"'{op}' needs values separated by commas")
        return [_scalar(p, type_) for p in parts]
    return _scalar(text, type_)

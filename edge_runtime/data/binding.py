"""A query bound to a dataset's schema: every name exists and has a type its use allows, every value converted.

:func:`bind` is the second of the two validations (the first is
:class:`~edge_runtime.data.spec.QuerySpec`): every column exists and has a
type the operator or aggregate can use, and every value has the column's
type (timestamps as ISO 8601 strings, taken as naive UTC). A
:class:`~edge_runtime.data.spec.SpecError` names the field that is wrong.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.data.catalog import NUMERIC_TYPES, QUERYABLE_TYPES, ColumnType, DatasetSchema
from edge_runtime.data.spec import ORDERED_OPS, Aggregate, Filter, QuerySpec, SpecError, show_value

FilterValue = Any


@dataclass(frozen=True)
class BoundFilter:
    column: str
    op: str
    # Converted to the column's type: int/float/bool/str, datetime (naive UTC), or a tuple of them.
    value: FilterValue
    type: ColumnType
    # True when the column is a scoring output: applied after scoring.
    after_score: bool
    field: str


@dataclass(frozen=True)
class BoundQuery:
    """A query checked against a dataset's schema, with its values converted to the columns' types."""

    spec: QuerySpec
    schema: DatasetSchema
    types: dict[str, ColumnType]
    filters: list[BoundFilter]
    # Columns to read from the source, in a stable order.
    source_columns: list[str]
    score_columns: list[str] = field(default_factory=list)

    @property
    def key_names(self) -> list[str]:
        return self.spec.key_names

    @property
    def key_types(self) -> list[ColumnType]:
        types = [self.types[c] for c in self.spec.group_by]
        return types + (["timestamp"] if self.spec.time_bucket else [])

    def columns_used(self) -> dict[str, set[str]]:
        """Source columns by use (filter, group, aggregate, score, rows), for the data policy."""
        spec = self.spec
        uses: dict[str, set[str]] = {k: set() for k in ("filter", "group", "aggregate", "score", "rows")}
        source = set(self.schema.column_names)
        for f in self.filters:
            if f.column in source:
                uses["filter"].add(f.column)
        uses["group"].update(spec.group_by)
        if spec.time_bucket:
            uses["group"].add(spec.time_bucket.column)
        for a in spec.aggregates:
            if a.column is not None and a.column in source:
                uses["aggregate"].add(a.column)
        if spec.score:
            uses["score"].update(spec.score.inputs)
        uses["rows"].update(c for c in spec.columns if c in source)
        return uses


def bind(spec: QuerySpec, schema: DatasetSchema) -> BoundQuery:
    """Check ``spec`` against ``schema``; :class:`SpecError` naming the field if a name or value does not fit."""
    columns = _Columns(spec, schema)
    filters = [_bind_filter(f, i, columns.any(f.column, f"filters.{i}.column"), f.column in columns.scored)
               for i, f in enumerate(spec.filters)]
    for i, name in enumerate(spec.group_by):
        columns.any(name, f"group_by.{i}")
    if spec.time_bucket is not None:
        if columns.source(spec.time_bucket.column, "time_bucket.column") != "timestamp":
            raise SpecError("time_bucket.column", f"column {spec.time_bucket.column!r} is "
                            f"{columns.types[spec.time_bucket.column]}, not a timestamp")
    for i, agg in enumerate(spec.aggregates):
        if agg.column is not None:
            _check_aggregate(agg, i, columns.any(agg.column, f"aggregates.{i}.column"))
    for i, name in enumerate(spec.columns):
        columns.any(name, f"columns.{i}")

    needed: list[str] = []
    for name in [*(f.column for f in filters), *spec.group_by,
                 *([spec.time_bucket.column] if spec.time_bucket else []),
                 *(a.column for a in spec.aggregates if a.column is not None),
                 *(spec.score.inputs if spec.score else []), *spec.columns]:
        if name in columns.types and name not in needed:
            needed.append(name)
    return BoundQuery(spec=spec, schema=schema, types=columns.all_types, filters=filters, source_columns=needed,
                      score_columns=columns.scored)


class _Columns:
    """The columns a query may name: the dataset's queryable ones, and its scoring step's outputs."""

    def __init__(self, spec: QuerySpec, schema: DatasetSchema) -> None:
        self.schema = schema
        self.types: dict[str, ColumnType] = {c.name: c.type for c in schema.columns if c.type in QUERYABLE_TYPES}
        self.known = ", ".join(sorted(self.types)) or "none"
        self.scored: list[str] = []
        if spec.score is not None:
            for i, name in enumerate(spec.score.inputs):
                if self.source(name, f"score.inputs.{i}") not in NUMERIC_TYPES:
                    raise SpecError(f"score.inputs.{i}",
                                    f"column {name!r} is {self.types[name]}; a model takes numbers")
            for i, out in enumerate(spec.score.outputs):
                if out.column in self.types:
                    raise SpecError(f"score.outputs.{i}.column",
                                    f"{out.column!r} is already a column of dataset {schema.name!r}")
                self.scored.append(out.column)
        self.all_types: dict[str, ColumnType] = dict(self.types)
        self.all_types.update({c: "float" for c in self.scored})

    def source(self, name: str, where: str) -> ColumnType:
        """The type of a column of the dataset itself."""
        if name not in self.types:
            other = self.schema.column_type(name)
            if other is not None:
                raise SpecError(where, f"column {name!r} of dataset {self.schema.name!r} has a type queries cannot use")
            raise SpecError(where, f"unknown column {name!r} in dataset {self.schema.name!r} (columns: {self.known})")
        return self.types[name]

    def any(self, name: str, where: str) -> ColumnType:
        """The type of a column of the dataset or of a scoring output."""
        return self.all_types[name] if name in self.scored else self.source(name, where)


def _check_aggregate(agg: Aggregate, i: int, type_: ColumnType) -> None:
    if agg.op in ("sum", "mean", "std", "var", "quantile") and type_ not in NUMERIC_TYPES:
        raise SpecError(f"aggregates.{i}.op", f"'{agg.op}' needs a numeric column; {agg.column!r} is {type_}")
    if agg.op in ("min", "max") and type_ not in (*NUMERIC_TYPES, "timestamp"):
        raise SpecError(f"aggregates.{i}.op", f"'{agg.op}' needs a numeric or timestamp column; "
                        f"{agg.column!r} is {type_}")


def _bind_filter(f: Filter, i: int, type_: ColumnType, after_score: bool) -> BoundFilter:
    where = f"filters.{i}"
    if f.op in ORDERED_OPS and type_ == "bool":
        raise SpecError(f"{where}.op", f"'{f.op}' does not apply to bool column {f.column!r}")
    value: FilterValue
    if f.value is None:
        value = None
    elif isinstance(f.value, list):
        value = tuple(_convert(v, type_, f.column, f"{where}.value.{j}") for j, v in enumerate(f.value))
        if f.op == "between" and value[0] > value[1]:
            raise SpecError(f"{where}.value", f"'between' needs low <= high, not {f.value!r}")
    else:
        value = _convert(f.value, type_, f.column, f"{where}.value")
    return BoundFilter(column=f.column, op=f.op, value=value, type=type_, after_score=after_score, field=where)


def _convert(value: Any, type_: ColumnType, column: str, where: str) -> Any:
    wrong = SpecError(where, f"{show_value(value)} is not a valid value for {type_} column {column!r}")
    if type_ in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(where, f"{value!r} is not a finite number")
        return value
    if type_ == "bool":
        if not isinstance(value, bool):
            raise wrong
        return value
    if type_ == "string":
        if not isinstance(value, str):
            raise wrong
        return value
    if type_ == "timestamp":
        if not isinstance(value, str):
            raise SpecError(where, f"{show_value(value)} is not a timestamp for column {column!r}; "
                            f"use an ISO 8601 string such as '2024-03-01T00:00:00Z'")
        return parse_timestamp(value, where)
    raise wrong


def parse_timestamp(value: str, where: str) -> dt.datetime:
    """An ISO 8601 string as a naive UTC datetime (zoned times converted, unzoned taken as UTC)."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(where, f"{show_value(value)} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed

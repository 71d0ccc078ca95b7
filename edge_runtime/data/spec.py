"""The federated query: a declarative JSON document, validated twice, never evaluated.

A query names a dataset, filters (column, operator from a closed set, value),
group-by columns and an optional time bucket, the aggregates to compute, an
optional scoring step, and a limit::

    {"dataset": "sensor_readings",
     "filters": [{"column": "line", "op": "in", "value": ["L1", "L2"]},
                 {"column": "ts", "op": "ge", "value": "2024-03-01T00:00:00Z"}],
     "group_by": ["line", "machine"],
     "time_bucket": {"column": "ts", "interval": "hour"},
     "aggregates": [{"op": "count"},
                    {"op": "mean", "column": "temperature"},
                    {"op": "quantile", "column": "vibration", "q": 0.95}],
     "order_by": [{"name": "count", "desc": true}],
     "limit": 100}

Validation happens in two steps, and both name the field that is wrong
(``filters.1.value``):

1. :class:`QuerySpec` checks the document's structure: unknown fields are
   refused, identifiers must match ``^[A-Za-z][A-Za-z0-9_]{0,63}$`` (so
   ``col) or 1=1 --``, backticks, ``@var`` and ``__import__('os')`` never get
   past it), operators, intervals and aggregates come from closed sets, and
   string values may not carry control characters.
2. :func:`bind` checks it against the dataset's schema: every column exists
   and has a type the operator or aggregate can use, and every value has the
   column's type (timestamps as ISO 8601 strings).

Nothing in a query is ever evaluated: the engine builds boolean masks from
the bound values with ordinary comparisons (never ``DataFrame.query`` or
``eval``), and SQLite sources get names checked against the schema and
values as bound parameters. A string value is only ever a literal: a filter
``name eq "x' or '1'='1"`` matches rows whose name is exactly that string.

Semantics worth knowing:

* comparisons never match a null (``ne`` included, as in SQL); ``is_null``
  and ``not_null`` test for it;
* ``count`` without a column counts rows, with a column its non-null values;
* ``sum`` of no values is 0; ``mean``, ``min``, ``max`` of none are null;
  ``std``/``var`` are sample statistics (``ddof`` 1) unless ``ddof`` is 0;
* ``quantile`` is approximate (see :mod:`edge_runtime.data.sketch`) and is
  marked so in every result;
* nulls in group-by columns form their own group;
* time buckets are in UTC; weeks start on Monday;
* ``limit`` caps the merged groups (after ``order_by``) or the rows per site
  and overall in ``rows`` mode. It never truncates a site's partial
  aggregates, which would make the merged result wrong.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from edge_runtime.data.catalog import IDENTIFIER_PATTERN, NUMERIC_TYPES, QUERYABLE_TYPES, ColumnType, DatasetSchema
from edge_runtime.protocol import MODEL_NAME_PATTERN

SPEC_VERSION: Literal[1] = 1
MAX_SPEC_BYTES = 64 * 1024
MAX_IN_VALUES = 1000
MAX_STRING_VALUE = 256

FilterOp = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "between", "is_null", "not_null"]
AggregateOp = Literal["count", "sum", "mean", "min", "max", "std", "var", "quantile"]
Interval = Literal["minute", "hour", "day", "week", "month"]
Mode = Literal["aggregate", "rows"]

COMPARISONS: frozenset[str] = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
ORDERED_OPS: frozenset[str] = frozenset({"lt", "le", "gt", "ge", "between"})
APPROXIMATE_OPS: frozenset[str] = frozenset({"quantile"})


class SpecError(Exception):
    """A query that cannot run as written; ``field`` is the dotted path of what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _no_control_characters(value: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("control characters are not allowed in a value")
    return value


Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]
SafeString = Annotated[StrictStr, Field(max_length=MAX_STRING_VALUE), AfterValidator(_no_control_characters)]
Scalar = StrictBool | StrictInt | StrictFloat | SafeString


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Filter(_Spec):
    column: Identifier
    op: FilterOp
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Filter:
        if self.op in ("is_null", "not_null"):
            if self.value is not None:
                raise ValueError(f"'{self.op}' takes no value")
        elif self.op == "in":
            if not isinstance(self.value, list) or not 1 <= len(self.value) <= MAX_IN_VALUES:
                raise ValueError(f"'in' takes a list of 1 to {MAX_IN_VALUES} values")
        elif self.op == "between":
            if not isinstance(self.value, list) or len(self.value) != 2:
                raise ValueError("'between' takes a list of two values [low, high]")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"'{self.op}' takes one value")
        return self


class TimeBucket(_Spec):
    column: Identifier
    interval: Interval
    # The name of the bucket in the result (a group key like any other).
    name: Identifier = "bucket"


class Aggregate(_Spec):
    op: AggregateOp
    column: Identifier | None = None
    # quantile only: which one (0.5 is the median), and the sketch's relative accuracy.
    q: float | None = Field(default=None, ge=0.0, le=1.0)
    accuracy: float = Field(default=0.01, ge=0.001, le=0.1)
    # std and var only: 1 for the sample statistic (pandas' default), 0 for the population one.
    ddof: Literal[0, 1] = 1
    name: Identifier | None = None

    @model_validator(mode="after")
    def _fits_op(self) -> Aggregate:
        if self.column is None and self.op != "count":
            raise ValueError(f"'{self.op}' needs a column")
        if (self.q is None) != (self.op != "quantile"):
            raise ValueError("'q' is required for quantile and only for quantile")
        return self

    @property
    def output_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.column is None:
            return "count"
        if self.op == "quantile":
            assert self.q is not None
            return f"p{_quantile_label(self.q)}_{self.column}"
        return f"{self.op}_{self.column}"

    @property
    def approximate(self) -> bool:
        return self.op in APPROXIMATE_OPS


def _quantile_label(q: float) -> str:
    return f"{q * 100:g}".replace(".", "_").replace("-", "")


class ScoreOutput(_Spec):
    # The model's output tensor, as the model names it.
    output: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
    # The column it becomes (one value per row).
    column: Identifier
    # For an output with several values per row (class probabilities): which one.
    index: int | None = Field(default=None, ge=0, le=4095)


class Score(_Spec):
    """Score the filtered rows with a model the node serves, then aggregate its outputs."""

    model: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")
    inputs: list[Identifier] = Field(min_length=1, max_length=64)
    outputs: list[ScoreOutput] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique(self) -> Score:
        _refuse_duplicates(self.inputs, "inputs")
        _refuse_duplicates([o.column for o in self.outputs], "outputs' columns")
        return self


class OrderBy(_Spec):
    name: Identifier
    desc: bool = False


class QuerySpec(_Spec):
    version: Literal[1] = SPEC_VERSION
    dataset: Identifier
    filters: list[Filter] = Field(default_factory=list, max_length=32)
    group_by: list[Identifier] = Field(default_factory=list, max_length=8)
    time_bucket: TimeBucket | None = None
    aggregates: list[Aggregate] = Field(default_factory=list, max_length=32)
    score: Score | None = None
    mode: Mode = "aggregate"
    # rows mode only: the columns to return.
    columns: list[Identifier] = Field(default_factory=list, max_length=64)
    order_by: list[OrderBy] = Field(default_factory=list, max_length=4)
    limit: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _consistent(self) -> QuerySpec:
        if self.mode == "aggregate":
            if not self.aggregates:
                raise ValueError("an aggregate query needs at least one aggregate")
            if self.columns:
                raise ValueError("'columns' is for rows mode; an aggregate query returns its aggregates")
            _refuse_duplicates(self.group_by, "group_by")
            outputs = self.key_names + [a.output_name for a in self.aggregates]
            _refuse_duplicates(outputs, "result columns (group keys, time bucket and aggregate names)")
        else:
            if self.aggregates or self.group_by or self.time_bucket is not None:
                raise ValueError("rows mode returns rows: no aggregates, group_by or time_bucket")
            if not self.columns:
                raise ValueError("rows mode needs 'columns'")
            _refuse_duplicates(self.columns, "columns")
        names = set(self.output_names)
        for order in self.order_by:
            if order.name not in names:
                raise ValueError(f"order_by names {order.name!r}, which is not a result column "
                                 f"({', '.join(self.output_names)})")
        return self

    @property
    def key_names(self) -> list[str]:
        return [*self.group_by, *([self.time_bucket.name] if self.time_bucket else [])]

    @property
    def output_names(self) -> list[str]:
        if self.mode == "rows":
            return list(self.columns)
        return self.key_names + [a.output_name for a in self.aggregates]


def _refuse_duplicates(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{name!r} appears twice in {what}")
        seen.add(name)


# -- parsing -----------------------------------------------------------------------------------------------------

_UNION_TAGS = re.compile(r"^(bool|int|float|str|none|list\[.*\]|function-after\[.*\]|constrained-str)$")


def parse_spec(document: Any) -> QuerySpec:
    """Validate a query document's structure; :class:`SpecError` naming the first wrong field."""
    if not isinstance(document, dict):
        raise SpecError("spec", f"a query must be a JSON object, not {type(document).__name__}")
    try:
        return QuerySpec.model_validate(document, strict=False)
    except ValidationError as exc:
        raise _spec_error(exc) from None


def _spec_error(exc: ValidationError) -> SpecError:
    errors = exc.errors(include_url=False)
    # A union of scalar types reports one error per member; the last one (str) is the most telling.
    first = errors[0]
    loc = [p for p in first["loc"] if isinstance(p, int) or not _UNION_TAGS.match(str(p))]
    if first["type"] == "extra_forbidden":
        return SpecError(_dotted(loc), "unknown field")
    same_field = [e for e in errors if [p for p in e["loc"] if isinstance(p, int) or not _UNION_TAGS.match(str(p))]
                  == loc]
    messages = []
    for error in same_field:
        if error["type"] == "string_pattern_mismatch":
            messages.append(f"{_show(error.get('input'))} is not a plain name (a letter, then letters, digits "
                            f"or _; at most 64)")
        elif error["type"] == "literal_error":
            messages.append(f"{_show(error.get('input'))} is not one of {error.get('ctx', {}).get('expected', '')}")
        else:
            messages.append(error["msg"].removeprefix("Value error, "))
    unique = list(dict.fromkeys(messages))
    return SpecError(_dotted(loc), "; ".join(unique[-2:]) if len(unique) > 1 else unique[0])


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "spec"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- binding to a schema -----------------------------------------------------------------------------------------

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
    types: dict[str, ColumnType] = {c.name: c.type for c in schema.columns if c.type in QUERYABLE_TYPES}
    known = ", ".join(sorted(types)) or "none"

    def source_column(name: str, where: str) -> ColumnType:
        if name not in types:
            other = schema.column_type(name)
            if other is not None:
                raise SpecError(where, f"column {name!r} of dataset {schema.name!r} has a type queries cannot use")
            raise SpecError(where, f"unknown column {name!r} in dataset {schema.name!r} (columns: {known})")
        return types[name]

    score_columns: list[str] = []
    if spec.score is not None:
        for i, name in enumerate(spec.score.inputs):
            if source_column(name, f"score.inputs.{i}") not in NUMERIC_TYPES:
                raise SpecError(f"score.inputs.{i}", f"column {name!r} is {types[name]}; a model takes numbers")
        for i, out in enumerate(spec.score.outputs):
            if out.column in types:
                raise SpecError(f"score.outputs.{i}.column",
                                f"{out.column!r} is already a column of dataset {schema.name!r}")
            score_columns.append(out.column)
    all_types: dict[str, ColumnType] = dict(types)
    all_types.update({c: "float" for c in score_columns})

    def any_column(name: str, where: str) -> ColumnType:
        return all_types[name] if name in score_columns else source_column(name, where)

    filters = [_bind_filter(f, i, any_column(f.column, f"filters.{i}.column"), f.column in score_columns)
               for i, f in enumerate(spec.filters)]
    for i, name in enumerate(spec.group_by):
        any_column(name, f"group_by.{i}")
    if spec.time_bucket is not None:
        if source_column(spec.time_bucket.column, "time_bucket.column") != "timestamp":
            raise SpecError("time_bucket.column", f"column {spec.time_bucket.column!r} is "
                            f"{types[spec.time_bucket.column]}, not a timestamp")
    for i, agg in enumerate(spec.aggregates):
        if agg.column is None:
            continue
        type_ = any_column(agg.column, f"aggregates.{i}.column")
        if agg.op in ("sum", "mean", "std", "var", "quantile") and type_ not in NUMERIC_TYPES:
            raise SpecError(f"aggregates.{i}.op", f"'{agg.op}' needs a numeric column; {agg.column!r} is {type_}")
        if agg.op in ("min", "max") and type_ not in (*NUMERIC_TYPES, "timestamp"):
            raise SpecError(f"aggregates.{i}.op", f"'{agg.op}' needs a numeric or timestamp column; "
                            f"{agg.column!r} is {type_}")
    for i, name in enumerate(spec.columns):
        any_column(name, f"columns.{i}")

    needed: list[str] = []
    for name in [*(f.column for f in filters), *spec.group_by,
                 *([spec.time_bucket.column] if spec.time_bucket else []),
                 *(a.column for a in spec.aggregates if a.column is not None),
                 *(spec.score.inputs if spec.score else []), *spec.columns]:
        if name in types and name not in needed:
            needed.append(name)
    return BoundQuery(spec=spec, schema=schema, types=all_types, filters=filters, source_columns=needed,
                      score_columns=score_columns)


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
    wrong = SpecError(where, f"{_show(value)} is not a valid value for {type_} column {column!r}")
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
            raise SpecError(where, f"{_show(value)} is not a timestamp for column {column!r}; "
                            f"use an ISO 8601 string such as '2024-03-01T00:00:00Z'")
        return parse_timestamp(value, where)
    raise wrong


def parse_timestamp(value: str, where: str) -> dt.datetime:
    """An ISO 8601 string as a naive UTC datetime (zoned times converted, unzoned taken as UTC)."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise SpecError(where, f"{_show(value)} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed

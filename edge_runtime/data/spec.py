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
2. :func:`~edge_runtime.data.binding.bind` checks it against the dataset's schema: every column exists
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

import re
from collections.abc import Sequence
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

from edge_runtime.data.catalog import IDENTIFIER_PATTERN
from edge_runtime.names import first_repeat
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
    repeat = first_repeat(names)
    if repeat is not None:
        raise ValueError(f"{repeat[1]!r} appears twice in {what}")


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
            messages.append(f"{show_value(error.get('input'))} is not a plain name (a letter, then letters, digits "
                            f"or _; at most 64)")
        elif error["type"] == "literal_error":
            expected = error.get("ctx", {}).get("expected", "")
            messages.append(f"{show_value(error.get('input'))} is not one of {expected}")
        else:
            messages.append(error["msg"].removeprefix("Value error, "))
    unique = list(dict.fromkeys(messages))
    return SpecError(_dotted(loc), "; ".join(unique[-2:]) if len(unique) > 1 else unique[0])


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "spec"


def show_value(value: Any) -> str:
    """``repr(value)`` cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

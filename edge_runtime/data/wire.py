"""Wire models of a federated query between the control plane and a node.

The control plane sends a :class:`QueryRequest`; the node answers with a
:class:`QueryResult`: ``answered`` with :class:`Partials` (aggregate mode)
or :class:`RowsOutput` (rows mode), ``refused`` naming the rule or the field
that stopped it, or ``error`` when it could not run (a file gone, a model
that failed). The spec travels as a plain JSON object and is validated at
the node, so that a bad spec is a refusal the operator can read rather than
a protocol error.

Partials are columnar: one list per group key and per state, aligned with
``rows`` (the cell sizes). They are everything the control plane needs to
merge sites exactly (:mod:`edge_runtime.data.merge`):

=========  ===========================================================
operator   state per group
=========  ===========================================================
count      ``n``
sum        ``n``, ``sum`` (int for int columns, so integer sums are exact)
mean       ``n``, ``sum``
std, var   ``n``, ``mean``, ``m2`` (sum of squared deviations from the
           group's own mean; combined across sites with Chan et al.'s
           parallel formula, which stays accurate where raw sums of
           squares cancel)
min, max   ``n``, ``min`` / ``max``
quantile   ``n``, ``sketch`` (:mod:`edge_runtime.data.sketch`)
=========  ===========================================================

Timestamps (group keys, min/max) travel as ISO 8601 strings in UTC without
an offset. Non-finite floats travel as the JSON constants ``NaN`` and
``Infinity`` that Python's ``json`` reads back.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from edge_runtime.data.catalog import ColumnType
from edge_runtime.protocol import INT32_MAX, INT64_MAX, MAX_FIGURE, NO_NUL, WireModel

# The request travels in the agent protocol's sync answer, so it is defined there; re-exported here.
from edge_runtime.protocol import QUERY_ID_PATTERN as QUERY_ID_PATTERN
from edge_runtime.protocol import QueryRequest as QueryRequest

QueryStatus = Literal["answered", "refused", "error"]


class DataWire(WireModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class SketchState(DataWire):
    positive: list[tuple[int, int]] = Field(default_factory=list)
    negative: list[tuple[int, int]] = Field(default_factory=list)
    zero: int = Field(default=0, ge=0)
    pos_inf: int = Field(default=0, ge=0)
    neg_inf: int = Field(default=0, ge=0)


class AggregatePartial(DataWire):
    name: str
    op: Literal["count", "sum", "mean", "min", "max", "std", "var", "quantile"]
    column: str | None = None
    # The type of ``column`` (decides how min/max values are read back).
    type: ColumnType = "int"
    n: list[int]
    sum: list[int | float] | None = None
    mean: list[float | None] | None = None
    m2: list[float | None] | None = None
    min: list[int | float | bool | str | None] | None = None
    max: list[int | float | bool | str | None] | None = None
    sketch: list[SketchState] | None = None


class Partials(DataWire):
    key_names: list[str]
    key_types: list[ColumnType]
    # One list per key name, aligned with ``rows``.
    keys: list[list[int | float | bool | str | None]]
    # Rows per group (cell): every one is at least the site's k.
    rows: list[int]
    aggregates: list[AggregatePartial]


class RowsOutput(DataWire):
    columns: list[str]
    types: list[ColumnType]
    # Row-major.
    values: list[list[int | float | bool | str | None]]
    # The site had more matching rows than the limit.
    truncated: bool = False


class Suppressed(DataWire):
    # Both are stored in integer columns (queries.models.QuerySite).
    cells: int = Field(default=0, ge=0, le=INT32_MAX)
    # None: the suppressed cells held fewer than k rows in total, so their count is withheld too.
    rows: int | None = Field(default=0, ge=0, le=INT32_MAX)


class QueryResult(DataWire):
    query_id: str = ""
    site: str = ""
    status: QueryStatus
    # These three are stored as text (which cannot hold NUL).
    reason: str = Field(default="", max_length=1000, pattern=NO_NUL)
    # refused: the policy rule that refused (None for a spec error) and the spec field concerned.
    rule: str | None = Field(default=None, pattern=NO_NUL)
    field: str | None = Field(default=None, pattern=NO_NUL)
    partials: Partials | None = None
    rows: RowsOutput | None = None
    suppressed: Suppressed = Field(default_factory=Suppressed)
    # Rows of the dataset the query ran over (before filters): filtered counts would reveal
    # what k-suppression hides.
    rows_scanned: int = Field(default=0, ge=0, le=INT64_MAX)
    elapsed_ms: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    # sha256 of the canonical spec JSON: ties the answer to the node's audit record.
    spec_digest: str = ""
    # The audit record of the decision on the node (its seq in the node's chain).
    audit_seq: int | None = Field(default=None, ge=0, le=INT64_MAX)

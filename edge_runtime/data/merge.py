"""Merging the partial results of many sites into one answer, exactly.

Pure functions over :class:`~edge_runtime.data.wire.QueryResult` values:
the control plane calls :func:`merge_results` with the spec it sent and
whatever the sites answered. Per group (the same key at several sites):

* ``count`` = sum of the counts; ``sum`` = sum of the sums (integers stay
  exact); ``mean`` = sum of sums / sum of counts;
* ``var``/``std`` combine each site's count, mean and M2 (sum of squared
  deviations from its own mean) with the parallel formula of Chan, Golub and
  LeVeque: ``M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)``, which never
  subtracts two large sums of squares;
* ``min``/``max`` = the min/max of the sites' values;
* ``quantile`` merges the sites' sketches (bucket counts add, so the merged
  sketch is the sketch of the union) and is marked approximate.

What the merged result cannot contain are the cells each site suppressed
(fewer than its ``k`` rows): a merged group lacks the rows of a site that
suppressed that group there. The result says so: ``complete`` is false as
soon as a site suppressed anything or did not answer, and ``sites`` carries
each site's status, refusal and suppression counts; ``contributors`` says
for each merged row how many sites it came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.data.catalog import ColumnType
from edge_runtime.data.compute import json_list
from edge_runtime.data.grouping import group_rows
from edge_runtime.data.sketch import QuantileSketch
from edge_runtime.data.spec import Aggregate, QuerySpec, parse_spec
from edge_runtime.data.wire import Partials, QueryResult, QueryStatus

# The column a merged rows-mode result names the site of each row in (not a valid identifier, so no clash).
SITE_COLUMN = "_site"


class SiteSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    status: QueryStatus
    reason: str = ""
    rule: str | None = None
    field: str | None = None
    rows_scanned: int = 0
    groups: int = 0
    suppressed_cells: int = 0
    # None: withheld by the site (its suppressed cells held fewer than k rows in all).
    suppressed_rows: int | None = 0
    elapsed_ms: float = 0.0


class MergedResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    query_id: str = ""
    mode: str = "aggregate"
    columns: list[str]
    types: list[str]
    rows: list[list[int | float | bool | str | None]]
    # Per row: how many sites contributed to it.
    contributors: list[int] = Field(default_factory=list)
    # Approximate columns and their relative accuracy (quantiles).
    approximate: dict[str, float] = Field(default_factory=dict)
    sites: list[SiteSummary]
    suppressed_cells: int = 0
    # Every site answered and none suppressed a cell: the merge covers all the data.
    complete: bool
    # Merged groups (or rows) before the limit.
    total: int = 0
    truncated: bool = False

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)


class MergeError(ValueError):
    """A site's partials do not fit the query (a different shape); that site is left out."""


def merge_results(spec: QuerySpec | Mapping[str, Any], results: Sequence[QueryResult], *,
                  query_id: str = "") -> MergedResult:
    """Merge what the sites answered to ``spec`` into one result (see the module doc)."""
    query = spec if isinstance(spec, QuerySpec) else parse_spec(dict(spec))
    summaries: list[SiteSummary] = []
    usable: list[QueryResult] = []
    seen: set[str] = set()
    for result in results:
        summary = _summary(result)
        if result.site and result.site in seen:
            summary = summary.model_copy(update={"status": "error", "reason": "a second answer from this site "
                                                 "was ignored"})
        elif result.status == "answered":
            try:
                _check_shape(query, result)
                usable.append(result)
            except MergeError as exc:
                summary = summary.model_copy(update={"status": "error", "reason": str(exc)})
        seen.add(result.site)
        summaries.append(summary)
    complete = all(s.status == "answered" and s.suppressed_cells == 0 for s in summaries) and bool(summaries)
    suppressed = sum(s.suppressed_cells for s in summaries)
    if query.mode == "rows":
        return _merge_rows(query, usable, summaries, complete=complete, query_id=query_id)
    frame, contributors, types = _merge_partials(query, [r.partials for r in usable if r.partials is not None])
    total = len(frame)
    frame, contributors = _order_and_limit(query, frame, contributors)
    columns = [_column_json(frame[name], t) for name, t in zip(frame.columns, types, strict=True)]
    rows = [list(row) for row in zip(*columns, strict=True)]
    approximate = {a.output_name: a.accuracy for a in query.aggregates if a.approximate}
    # Built from typed columns: validating every value again would cost more than the merge.
    return MergedResult.model_construct(
        query_id=query_id, mode="aggregate", columns=list(frame.columns), types=types, rows=rows,
        contributors=contributors.tolist(), approximate=approximate, sites=summaries, suppressed_cells=suppressed,
        complete=complete, total=total, truncated=len(frame) < total)


def _summary(result: QueryResult) -> SiteSummary:
    groups = len(result.partials.rows) if result.partials else len(result.rows.values) if result.rows else 0
    return SiteSummary(site=result.site, status=result.status, reason=result.reason, rule=result.rule,
                       field=result.field, rows_scanned=result.rows_scanned, groups=groups,
                       suppressed_cells=result.suppressed.cells, suppressed_rows=result.suppressed.rows,
                       elapsed_ms=result.elapsed_ms)


def _check_shape(query: QuerySpec, result: QueryResult) -> None:
    if query.mode == "rows":
        if result.rows is None or result.rows.columns != query.columns:
            raise MergeError("its rows do not have the query's columns")
        return
    partials = result.partials
    if partials is None:
        raise MergeError("it answered without partial aggregates")
    if partials.key_names != query.key_names or len(partials.keys) != len(query.key_names):
        raise MergeError("its group keys are not the query's")
    expected = [(a.output_name, a.op) for a in query.aggregates]
    if [(a.name, a.op) for a in partials.aggregates] != expected:
        raise MergeError("its aggregates are not the query's")
    g = len(partials.rows)
    if any(len(k) != g for k in partials.keys):
        raise MergeError("its group keys and row counts differ in length")
    for agg, part in zip(query.aggregates, partials.aggregates, strict=True):
        needed = _STATE_FIELDS[agg.op]
        for name in ("n", *needed):
            values = getattr(part, name)
            if values is None or len(values) != g:
                raise MergeError(f"aggregate {agg.output_name!r} lacks its {name!r} state for every group")


_STATE_FIELDS: dict[str, tuple[str, ...]] = {
    "count": (), "sum": ("sum",), "mean": ("sum",), "std": ("mean", "m2"), "var": ("mean", "m2"),
    "min": ("min",), "max": ("max",), "quantile": ("sketch",),
}


def _typed(values: Sequence[Any], type_: ColumnType) -> pd.Series:
    """Wire values (JSON) as a typed pandas column, nulls as the type's missing value."""
    if type_ == "timestamp":
        return pd.Series(pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601")).astype("datetime64[us]")
    if type_ == "int":
        if all(isinstance(v, int) for v in values):
            return pd.Series(values, dtype="int64")
        return pd.Series(values, dtype="Float64")
    if type_ == "float":
        return pd.Series([math.nan if v is None else v for v in values], dtype="float64")
    if type_ == "bool":
        return pd.Series(values, dtype="boolean")
    return pd.Series(values, dtype=object)


def _merge_partials(query: QuerySpec, partials: list[Partials]) -> tuple[pd.DataFrame, npt.NDArray[np.int64],
                                                                          list[str]]:
    key_types: list[ColumnType] = list(partials[0].key_types) if partials else ["string"] * len(query.key_names)
    keys = [pd.concat([_typed(p.keys[j], p.key_types[j]) for p in partials], ignore_index=True) if partials
            else pd.Series([], dtype=object) for j in range(len(query.key_names))]
    total_rows = sum(len(p.rows) for p in partials)
    groups = group_rows(keys, total_rows)
    ids, g = groups.ids, groups.count
    out: dict[str, Any] = {}
    for name, column in zip(query.key_names, groups.keys, strict=True):
        out[name] = column.reset_index(drop=True)
    types: list[str] = list(key_types)
    for i, agg in enumerate(query.aggregates):
        parts = [p.aggregates[i] for p in partials]
        value_type: ColumnType = parts[0].type if parts else "float"
        n = _concat_int([part.n for part in parts])
        total_n = np.bincount(ids, weights=n, minlength=g).astype(np.int64) if len(n) else np.zeros(g, np.int64)
        column, out_type = _merge_one(agg, parts, ids, g, n, total_n, value_type)
        out[agg.output_name] = column
        types.append(out_type)
    contributors = np.bincount(ids, minlength=g).astype(np.int64)
    return pd.DataFrame(out), contributors, types


def _merge_one(agg: Aggregate, parts: list[Any], ids: npt.NDArray[np.int64], g: int, n: npt.NDArray[np.int64],
               total_n: npt.NDArray[np.int64], value_type: ColumnType) -> tuple[pd.Series, str]:
    if agg.op == "count":
        return pd.Series(total_n, dtype="int64"), "int"
    if agg.op in ("sum", "mean"):
        raw = [v for part in parts for v in part.sum]
        sums: npt.NDArray[Any]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            sums_int = _exact_int_sums(raw, ids, g)
            if agg.op == "sum":
                return pd.Series(sums_int, dtype=sums_int.dtype), "int"
            sums = sums_int.astype(np.float64)
        else:
            sums = np.bincount(ids, weights=np.asarray(raw, dtype=np.float64), minlength=g)
            if agg.op == "sum":
                return pd.Series(sums, dtype="float64"), "float"
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(total_n > 0, sums / np.maximum(total_n, 1), np.nan)
        return pd.Series(mean, dtype="float64"), "float"
    if agg.op in ("std", "var"):
        means = np.asarray([np.nan if v is None else v for part in parts for v in part.mean], dtype=np.float64)
        m2s = np.asarray([np.nan if v is None else v for part in parts for v in part.m2], dtype=np.float64)
        has = n > 0
        weighted = np.where(has, n * np.where(has, means, 0.0), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            grand = np.bincount(ids, weights=weighted, minlength=g) / total_n
            deviation = np.where(has, means - grand[ids], 0.0)
            m2 = np.bincount(ids, weights=np.where(has, m2s, 0.0) + n * deviation * deviation, minlength=g)
            dof = total_n - agg.ddof
            var = np.where(dof > 0, np.maximum(m2, 0.0) / np.maximum(dof, 1), np.nan)
        return pd.Series(np.sqrt(var) if agg.op == "std" else var, dtype="float64"), "float"
    if agg.op in ("min", "max"):
        raw = [v for part in parts for v in getattr(part, agg.op)]
        values = _typed(raw, value_type)
        if value_type == "int":
            values = values.astype("Float64")
        grouped = values.groupby(ids)
        result = (grouped.min() if agg.op == "min" else grouped.max()).reindex(range(g))
        return result.reset_index(drop=True), value_type
    # quantile
    merged = [QuantileSketch(accuracy=agg.accuracy) for _ in range(g)]
    states = [s for part in parts for s in part.sketch]
    for group, state in zip(ids.tolist(), states, strict=True):
        merged[group].merge(QuantileSketch.from_state(state.model_dump(), agg.accuracy))
    assert agg.q is not None
    estimates = [s.quantile(agg.q) for s in merged]
    return pd.Series([math.nan if e is None else e for e in estimates], dtype="float64"), "float"


def _exact_int_sums(raw: list[int], ids: npt.NDArray[np.int64], g: int) -> npt.NDArray[Any]:
    """Per-group integer sums, exact: int64 when they cannot overflow, else Python ints (object)."""
    largest = max((abs(v) for v in raw), default=0)
    if largest * max(len(raw), 1) < 1 << 62:
        sums = np.zeros(g, dtype=np.int64)
        np.add.at(sums, ids, np.asarray(raw, dtype=np.int64))
        return sums
    exact = np.zeros(g, dtype=object)
    for group, value in zip(ids.tolist(), raw, strict=True):
        exact[group] += value
    return exact


def _concat_int(lists: Sequence[Sequence[int]]) -> npt.NDArray[np.int64]:
    return np.asarray([v for values in lists for v in values], dtype=np.int64)


def _plain(value: Any) -> Any:
    """A key value back to a plain Python value (None for any null)."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _order_and_limit(query: QuerySpec, frame: pd.DataFrame,
                     contributors: npt.NDArray[np.int64]) -> tuple[pd.DataFrame, npt.NDArray[np.int64]]:
    order = [(o.name, not o.desc) for o in query.order_by]
    order += [(k, True) for k in query.key_names if k not in {name for name, _ in order}]
    frame = frame.assign(__contributors=contributors)
    if order and len(frame):
        sortable = frame.copy()
        for name, _ in order:
            if sortable[name].dtype == object:
                # Mixed Python ints/None (integer sums) or strings: sort on a comparable view.
                sortable[name] = _sort_view(sortable[name])
        positions = sortable.sort_values([n for n, _ in order], ascending=[a for _, a in order],
                                         na_position="last", kind="stable").index
        frame = frame.loc[positions]
    if query.limit is not None:
        frame = frame.head(query.limit)
    contributors_out = frame.pop("__contributors").to_numpy(dtype=np.int64)
    return frame.reset_index(drop=True), contributors_out


def _sort_view(series: pd.Series) -> pd.Series:
    values = [v for v in series if v is not None]
    if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return pd.Series([math.nan if v is None else float(v) for v in series], index=series.index)
    return series.astype("string")


def _column_json(column: pd.Series, type_: str) -> list[Any]:
    if column.dtype == object and type_ != "string":
        return [_json(v, type_) for v in column]
    return json_list(column, type_)  # type: ignore[arg-type]


def _json(value: Any, type_: str) -> int | float | bool | str | None:
    value = _plain(value)
    if value is None:
        return None
    if type_ == "int":
        return int(value)
    if type_ == "float":
        return float(value)
    if type_ == "bool":
        return bool(value)
    return str(value) if not isinstance(value, str) else value


def _merge_rows(query: QuerySpec, results: list[QueryResult], summaries: list[SiteSummary], *, complete: bool,
                query_id: str) -> MergedResult:
    rows: list[list[int | float | bool | str | None]] = []
    types: list[str] = ["string"]
    for result in results:
        assert result.rows is not None
        types = ["string", *result.rows.types]
        rows.extend([result.site, *row] for row in result.rows.values)
    columns = [SITE_COLUMN, *query.columns]
    frame = pd.DataFrame(rows, columns=columns)
    total = len(frame)
    if query.order_by and total:
        frame = frame.sort_values([o.name for o in query.order_by], ascending=[not o.desc for o in query.order_by],
                                  na_position="last", kind="stable")
    if query.limit is not None:
        frame = frame.head(query.limit)
    out = [[_json(v, t) for v, t in zip(row, types, strict=True)] for row in frame.itertuples(index=False)]
    truncated = len(out) < total or any(r.rows is not None and r.rows.truncated for r in results)
    return MergedResult(query_id=query_id, mode="rows", columns=columns, types=types, rows=out,
                        contributors=[1] * len(out), sites=summaries, complete=complete, total=total,
                        truncated=truncated)

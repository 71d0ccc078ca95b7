"""Filtering, scoring and partial aggregates: the pandas and numpy part of a query.

Rows are grouped by :mod:`.grouping` into dense integer ids; counts, sums and
the two-pass sums of squared deviations are then ``numpy.bincount`` calls
and minima and maxima ``numpy.minimum.at``/``maximum.at``: one pass over the
rows each, no sort, no per-group Python. Results are turned into JSON values
column by column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from edge_runtime.data.binding import BoundFilter, BoundQuery
from edge_runtime.data.catalog import ColumnType
from edge_runtime.data.grouping import Groups, KeyCodes, bucket_codes, group_rows
from edge_runtime.data.sketch import sketch_groups
from edge_runtime.data.sources import ExecutionError, one_line
from edge_runtime.data.spec import ORDERED_OPS
from edge_runtime.data.wire import AggregatePartial, Partials, RowsOutput, SketchState

Array = npt.NDArray[Any]
# score(model, version, {input column: values}) -> {model output name: values, one row per input row}
Scorer = Callable[[str, str | None, dict[str, Array]], Mapping[str, Array]]

SCORE_BATCH_ROWS = 65_536
NAT_TICKS = np.iinfo(np.int64).min


# -- filtering and scoring -----------------------------------------------------------------------------------------


def filter_mask(frame: pd.DataFrame, filters: Sequence[BoundFilter]) -> npt.NDArray[np.bool_]:
    """Rows matching every filter. Plain comparisons on the typed values: nothing is parsed or evaluated."""
    mask = np.ones(len(frame), dtype=bool)
    for f in filters:
        s = frame[f.column]
        if isinstance(s.dtype, pd.CategoricalDtype) and f.op in ORDERED_OPS:
            # An unordered categorical cannot be compared with < or >: compare its values.
            s = s.astype("string")
        if f.op == "is_null":
            part = s.isna()
        elif f.op == "not_null":
            part = s.notna()
        else:
            v = f.value
            if f.op == "eq":
                part = s == v
            elif f.op == "ne":
                part = s != v
            elif f.op == "lt":
                part = s < v
            elif f.op == "le":
                part = s <= v
            elif f.op == "gt":
                part = s > v
            elif f.op == "ge":
                part = s >= v
            elif f.op == "in":
                part = s.isin(list(v))
            else:  # between
                part = (s >= v[0]) & (s <= v[1])
            # Comparisons never match a null, "ne" included.
            part = part & s.notna()
        mask &= np.asarray(part.to_numpy(dtype=bool, na_value=False), dtype=bool)
    return mask


def apply_score(frame: pd.DataFrame, bound: BoundQuery, scorer: Scorer | None) -> pd.DataFrame:
    """Add the score step's outputs as float columns (NaN where an input is null or the row was not scored)."""
    score = bound.spec.score
    if score is None:
        return frame
    if scorer is None:
        raise ExecutionError("this node cannot score data (no model server)", "score.model")
    n = len(frame)
    complete = np.ones(n, dtype=bool)
    for name in score.inputs:
        complete &= frame[name].notna().to_numpy()
    rows = np.flatnonzero(complete)
    outputs = {o.column: np.full(n, np.nan) for o in score.outputs}
    inputs_all = {name: frame[name].to_numpy(dtype=np.float64, na_value=np.nan) for name in score.inputs}
    for start in range(0, len(rows), SCORE_BATCH_ROWS):
        chunk = rows[start:start + SCORE_BATCH_ROWS]
        feeds = {name: values[chunk] for name, values in inputs_all.items()}
        try:
            answer = scorer(score.model, score.version, feeds)
        except Exception as exc:  # noqa: BLE001 - any failure of the model is this query's error, not the node's
            raise ExecutionError(f"scoring with model {score.model!r} failed: {one_line(exc)}",
                                 "score.model") from None
        for i, out in enumerate(score.outputs):
            where = f"score.outputs.{i}.output"
            if out.output not in answer:
                raise ExecutionError(f"model {score.model!r} has no output {out.output!r} "
                                     f"(outputs: {', '.join(sorted(answer)) or 'none'})", where)
            try:
                values = np.asarray(answer[out.output], dtype=np.float64)
            except (TypeError, ValueError):
                raise ExecutionError(f"output {out.output!r} is not numeric", where) from None
            if values.ndim == 2 and out.index is not None:
                if out.index >= values.shape[1]:
                    raise ExecutionError(f"output {out.output!r} has {values.shape[1]} values per row; "
                                         f"index {out.index} is out of range", f"score.outputs.{i}.index")
                values = values[:, out.index]
            elif values.ndim == 2 and values.shape[1] == 1:
                values = values[:, 0]
            if values.ndim != 1 or values.shape[0] != len(chunk):
                raise ExecutionError(f"output {out.output!r} has shape {values.shape}; expected one value per "
                                     f"row ({len(chunk)}; name an index for several values per row)", where)
            outputs[out.column][chunk] = values
    result = frame.copy(deep=False)
    for name, values in outputs.items():
        result[name] = values
    return result


# -- partial aggregates ------------------------------------------------------------------------------------------


def _column_values(series: pd.Series, type_: ColumnType) -> tuple[Array, npt.NDArray[np.bool_]]:
    """(values as float64, or int64 for integers and time ticks; a validity mask)."""
    valid = series.notna().to_numpy(dtype=bool)
    if type_ == "timestamp":
        return series.to_numpy(dtype="datetime64[us]").view(np.int64), valid
    if type_ == "int" and pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64), valid
    return series.to_numpy(dtype=np.float64, na_value=np.nan), valid


def compute_partials(frame: pd.DataFrame, bound: BoundQuery) -> tuple[Groups, list[dict[str, Any]]]:
    """Group the (filtered, scored) rows and compute every aggregate's partial state per group."""
    spec = bound.spec
    keys: list[KeyCodes | pd.Series | Array] = [frame[c] for c in spec.group_by]
    if spec.time_bucket is not None:
        times = frame[spec.time_bucket.column].to_numpy(dtype="datetime64[us]")
        keys.append(bucket_codes(times, spec.time_bucket.interval))
    groups = group_rows(keys, len(frame))
    ids, g = groups.ids, groups.count
    states: list[dict[str, Any]] = []
    columns: dict[str, _Column] = {}
    for agg in spec.aggregates:
        state: dict[str, Any] = {}
        if agg.column is None:
            state["n"] = groups.rows
            states.append(state)
            continue
        column = columns.get(agg.column)
        if column is None:
            column = columns[agg.column] = _Column(frame[agg.column], bound.types[agg.column], groups)
        state["n"] = column.n
        if agg.op in ("sum", "mean"):
            if column.values.dtype == np.int64 and agg.op == "sum":
                # Integer sums stay exact (bincount would round them through float64).
                sums = np.zeros(g, dtype=np.int64)
                np.add.at(sums, ids, column.zeroed())
                state["sum"] = sums
            else:
                state["sum"] = column.float_sums()
        elif agg.op in ("std", "var"):
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = column.float_sums() / column.n
            # Two passes: deviations from the group's own mean, the numerically careful M2.
            deviation = mean[ids]
            np.subtract(column.floats(), deviation, out=deviation)
            np.multiply(deviation, deviation, out=deviation)
            deviation[column.invalid] = 0.0
            state["mean"] = mean
            state["m2"] = np.bincount(ids, weights=deviation, minlength=g)
        elif agg.op in ("min", "max"):
            state[agg.op] = _group_extreme(column, g, agg.op)
        elif agg.op == "quantile":
            valid_ids, valid_values = column.compacted()
            state["sketch"] = sketch_groups(valid_values.astype(np.float64, copy=False), valid_ids, g, agg.accuracy)
        states.append(state)
    return groups, states


class _Column:
    """One aggregated column's values over all rows, and where they are missing.

    Missing values are rare in sensor data, so rather than copying every
    valid row out (two arrays of the full length), the few missing rows are
    listed by index and neutralised where a pass needs it: zero weights in
    sums, NaN-ignoring minima and maxima, counts less the missing ones.
    """

    def __init__(self, series: pd.Series, type_: ColumnType, groups: Groups) -> None:
        self.values, valid = _column_values(series, type_)
        self.groups = groups
        self.invalid = np.flatnonzero(~valid)
        if len(self.invalid):
            self.n = groups.rows - np.bincount(groups.ids[self.invalid], minlength=groups.count)
        else:
            self.n = groups.rows
        self._floats: Array | None = None
        self._zeroed: Array | None = None
        self._float_sums: Array | None = None

    def floats(self) -> Array:
        """The values as float64 (missing ones NaN or garbage: mask with ``invalid``)."""
        if self._floats is None:
            self._floats = self.values.astype(np.float64, copy=False)
        return self._floats

    def zeroed(self) -> Array:
        """The values with the missing ones set to 0 (a copy only if any is missing)."""
        if self._zeroed is None:
            if len(self.invalid):
                self._zeroed = self.values.copy()
                self._zeroed[self.invalid] = 0
            else:
                self._zeroed = self.values
        return self._zeroed

    def float_sums(self) -> Array:
        """Per-group float sums of the valid values: one pass, shared by sum, mean, std and var."""
        if self._float_sums is None:
            weights = self.zeroed().astype(np.float64, copy=False)
            self._float_sums = np.bincount(self.groups.ids, weights=weights, minlength=self.groups.count)
        return self._float_sums

    def compacted(self) -> tuple[npt.NDArray[np.int64], Array]:
        """(group ids, values) of the valid rows only."""
        if not len(self.invalid):
            return self.groups.ids, self.values
        keep = np.ones(len(self.values), dtype=bool)
        keep[self.invalid] = False
        return self.groups.ids[keep], self.values[keep]


def _group_extreme(column: _Column, g: int, op: str) -> Array:
    """Per-group min or max of the valid values; groups without one keep the filler (masked later by n == 0)."""
    values, ids = column.values, column.groups.ids
    if values.dtype == np.int64:
        if len(column.invalid):
            ids, values = column.compacted()
        info = np.iinfo(np.int64)
        out: Array = np.full(g, info.max if op == "min" else info.min, dtype=np.int64)
        (np.minimum if op == "min" else np.maximum).at(out, ids, values)
        return out
    out = np.full(g, np.inf if op == "min" else -np.inf)
    # fmin and fmax ignore NaN: the missing values (NaN as floats) need no copying out.
    (np.fmin if op == "min" else np.fmax).at(out, ids, values)
    return out


# -- JSON values -------------------------------------------------------------------------------------------------


def json_list(values: pd.Series | Array, type_: ColumnType,
              missing: npt.NDArray[np.bool_] | None = None) -> list[Any]:
    """A column as JSON values (None for nulls and where ``missing``), converted column-wise."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    null = series.isna().to_numpy(dtype=bool)
    if missing is not None:
        null = null | missing
    if type_ == "timestamp":
        ticks = series.to_numpy(dtype="datetime64[us]")
        whole = (ticks[~null].view(np.int64) % 1_000_000 == 0).all()
        out: list[Any] = np.datetime_as_string(ticks, unit="s" if whole else "us").tolist()
    elif type_ == "int" and pd.api.types.is_integer_dtype(series.dtype):
        out = series.to_numpy(dtype=np.int64).tolist()
    elif type_ in ("int", "float"):
        floats = series.to_numpy(dtype=np.float64, na_value=np.nan)
        if type_ == "int" and not null.all() and np.all(np.mod(floats[~null], 1) == 0):
            out = np.where(null, 0, floats).astype(np.int64).tolist()
        else:
            out = floats.tolist()
    elif type_ == "bool":
        out = series.to_numpy(dtype=bool, na_value=False).tolist()
    else:
        out = series.astype(object).tolist()
    if null.any():
        for i in np.flatnonzero(null).tolist():
            out[i] = None
    return out


def build_partials(bound: BoundQuery, groups: Groups, states: list[dict[str, Any]],
                   keep: npt.NDArray[np.bool_]) -> Partials:
    index = np.flatnonzero(keep)
    key_types = bound.key_types
    keys = [json_list(column.take(index), t) for column, t in zip(groups.keys, key_types, strict=True)]
    aggregates: list[AggregatePartial] = []
    for agg, state in zip(bound.spec.aggregates, states, strict=True):
        type_: ColumnType = bound.types[agg.column] if agg.column is not None else "int"
        n = state["n"][index]
        empty = n == 0
        fields: dict[str, Any] = {"n": n.tolist()}
        if "sum" in state:
            fields["sum"] = state["sum"][index].tolist()
        if "mean" in state:
            fields["mean"] = json_list(state["mean"][index], "float", empty)
            fields["m2"] = json_list(state["m2"][index], "float", empty)
        for extreme in ("min", "max"):
            if extreme in state:
                values = state[extreme][index]
                if type_ == "timestamp":
                    values = values.view("datetime64[us]")
                elif type_ == "bool":
                    values = values.astype(bool)
                fields[extreme] = json_list(values, type_, empty)
        if "sketch" in state:
            fields["sketch"] = [SketchState.model_validate(state["sketch"][i].to_state()) for i in index]
        # Built from typed arrays above, so validating tens of thousands of values again would only cost time.
        aggregates.append(AggregatePartial.model_construct(name=agg.output_name, op=agg.op, column=agg.column,
                                                           type=type_, **fields))
    return Partials.model_construct(key_names=bound.key_names, key_types=key_types, keys=keys,
                                    rows=groups.rows[index].tolist(), aggregates=aggregates)


def build_rows(frame: pd.DataFrame, bound: BoundQuery) -> RowsOutput:
    spec = bound.spec
    if spec.order_by:
        frame = frame.sort_values([o.name for o in spec.order_by], ascending=[not o.desc for o in spec.order_by],
                                  na_position="last", kind="stable")
    truncated = spec.limit is not None and len(frame) > spec.limit
    if spec.limit is not None:
        frame = frame.head(spec.limit)
    types = [bound.types[c] for c in spec.columns]
    columns = [json_list(frame[c].reset_index(drop=True), t) for c, t in zip(spec.columns, types, strict=True)]
    values = [list(row) for row in zip(*columns, strict=True)] if columns else []
    return RowsOutput(columns=list(spec.columns), types=types, values=values, truncated=truncated)

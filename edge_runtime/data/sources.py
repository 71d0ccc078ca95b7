"""Reading a dataset for a query: only the columns it uses, filters pushed down where the source can.

* Parquet through pyarrow, with column selection and the filters as a
  pyarrow expression (row groups skipped by their statistics, rows filtered
  in Arrow); string columns that are only group keys are read
  dictionary-encoded, so grouping on them costs nothing to factorise.
* CSV through pyarrow's multithreaded reader, only the columns used.
* SQLite through a read-only connection: names checked against the schema
  and quoted, values only ever as bound parameters.

Every filter is applied again in pandas afterwards (:func:`~edge_runtime.data.compute.filter_mask`),
so the answer never depends on what a source could push down; a pushed-down
filter only has to keep every row the pandas filter keeps. Columns come out
as their logical type: numbers as int64/float64, bools as bool (nullable
where needed), timestamps as naive UTC ``datetime64[us]``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from edge_runtime.data.binding import BoundFilter, BoundQuery
from edge_runtime.data.catalog import ColumnType, Dataset, quote_identifier, sqlite_connect


class ExecutionError(Exception):
    """The query could not run (a source unreadable, a model that failed); ``field`` when a spec part caused it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def load_frame(dataset: Dataset, bound: BoundQuery) -> pd.DataFrame:
    """The query's source columns, filters pushed down where the source can, types normalised."""
    columns = list(bound.source_columns)
    source_filters = [f for f in bound.filters if not f.after_score]
    try:
        if dataset.kind == "parquet":
            frame = _load_parquet(dataset, columns, source_filters, dictionary_columns(bound))
        elif dataset.kind == "csv":
            frame = _load_csv(dataset, columns)
        else:
            frame = _load_sqlite(dataset, columns, source_filters)
    except (pa.ArrowException, sqlite3.Error, OSError) as exc:
        raise ExecutionError(f"dataset {dataset.name!r} cannot be read: {one_line(exc)}") from None
    return normalise_frame(frame, {c: bound.types[c] for c in columns})


def dictionary_columns(bound: BoundQuery) -> list[str]:
    """String columns used only as group keys: read as categoricals, whose codes are the group codes."""
    spec = bound.spec
    other = {f.column for f in bound.filters} | set(spec.columns) | {a.column for a in spec.aggregates}
    return [c for c in spec.group_by if bound.types.get(c) == "string" and c not in other]


def _load_parquet(dataset: Dataset, columns: list[str], filters: Sequence[BoundFilter],
                  dictionary: list[str]) -> pd.DataFrame:
    expression = _arrow_expression(filters, dataset.schema().column_names)
    read = columns or dataset.schema().column_names[:1]
    try:
        table = pq.read_table(dataset.path, columns=read, filters=expression, read_dictionary=dictionary or None)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        if expression is None:
            raise
        # A filter the reader cannot push down (a type it will not cast): pandas applies it anyway.
        table = pq.read_table(dataset.path, columns=read, read_dictionary=dictionary or None)
    return arrow_to_pandas(table, columns)


def _load_csv(dataset: Dataset, columns: list[str]) -> pd.DataFrame:
    read = columns or dataset.schema().column_names[:1]
    types = {name: t for name, t in dataset.csv_column_types().items() if name in read}
    table = pacsv.read_csv(dataset.path, read_options=dataset.csv_read_options(),
                           convert_options=pacsv.ConvertOptions(include_columns=read, column_types=types))
    return arrow_to_pandas(table, columns)


def arrow_to_pandas(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    if not columns:
        return pd.DataFrame(index=pd.RangeIndex(table.num_rows))
    frame: pd.DataFrame = table.to_pandas(split_blocks=True, self_destruct=True)
    return frame


def _arrow_expression(filters: Sequence[BoundFilter], available: list[str]) -> pc.Expression | None:
    """The filters as a pyarrow expression, for those it can evaluate with the same meaning as pandas."""
    parts: list[pc.Expression] = []
    for f in filters:
        if f.column not in available or f.type == "timestamp":
            # Timestamps may be stored zoned or not; pandas compares them after normalising.
            continue
        field = pc.field(f.column)
        v = f.value
        if f.op == "is_null":
            parts.append(field.is_null())
        elif f.op == "not_null":
            parts.append(field.is_valid())
        elif f.op == "eq":
            parts.append(field == v)
        elif f.op == "ne":
            parts.append(field != v)
        elif f.op == "lt":
            parts.append(field < v)
        elif f.op == "le":
            parts.append(field <= v)
        elif f.op == "gt":
            parts.append(field > v)
        elif f.op == "ge":
            parts.append(field >= v)
        elif f.op == "in":
            parts.append(field.isin(list(v)))
        elif f.op == "between":
            parts.append((field >= v[0]) & (field <= v[1]))
    if not parts:
        return None
    expression = parts[0]
    for part in parts[1:]:
        expression = expression & part
    return expression


def _load_sqlite(dataset: Dataset, columns: list[str], filters: Sequence[BoundFilter]) -> pd.DataFrame:
    table = dataset.config.table
    assert table is not None
    # Names were checked against the pattern and the table's schema; values only ever travel as parameters.
    select = ", ".join(quote_identifier(c) for c in columns) or "1"
    where: list[str] = []
    params: list[Any] = []
    for f in filters:
        if f.type not in ("int", "float", "string"):
            continue
        name = quote_identifier(f.column)
        simple = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
        if f.op in simple:
            where.append(f"{name} {simple[f.op]} ?")
            params.append(f.value)
        elif f.op == "in" and len(f.value) <= 500:
            where.append(f"{name} IN ({', '.join('?' for _ in f.value)})")
            params.extend(f.value)
        elif f.op == "between":
            where.append(f"{name} BETWEEN ? AND ?")
            params.extend(f.value)
        elif f.op == "is_null":
            where.append(f"{name} IS NULL")
        elif f.op == "not_null":
            where.append(f"{name} IS NOT NULL")
    sql = f"SELECT {select} FROM {quote_identifier(table)}"  # noqa: S608 - checked names, values bound
    if where:
        sql += " WHERE " + " AND ".join(where)
    with sqlite_connect(dataset.path) as conn:
        cursor = conn.execute(sql, params)
        records = cursor.fetchall()
    if not columns:
        return pd.DataFrame(index=pd.RangeIndex(len(records)))
    return pd.DataFrame.from_records(records, columns=columns)


def normalise_frame(frame: pd.DataFrame, types: Mapping[str, ColumnType]) -> pd.DataFrame:
    """Each column as its logical type: numbers as numbers, timestamps as naive UTC datetime64[us]."""
    out: dict[str, Any] = {}
    # Only changed columns are replaced: rebuilding the frame would copy every column into new blocks.
    for name, type_ in types.items():
        original = s = frame[name]
        if type_ in ("int", "float"):
            if not pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
                s = pd.to_numeric(s, errors="coerce")
            target = "float64" if type_ == "float" or not pd.api.types.is_integer_dtype(s.dtype) else "int64"
            if s.dtype != target:
                s = s.astype(target)
        elif type_ == "bool":
            if not pd.api.types.is_bool_dtype(s.dtype):
                s = s.map(_to_bool, na_action="ignore").astype("boolean")
        elif type_ == "timestamp":
            s = _to_utc_naive(s)
        elif type_ == "string":
            # Categoricals (dictionary-read keys) stay categorical: filters and output handle them.
            if s.dtype == object:
                s = s.astype("string")
        if s is not original:
            out[name] = s
    return frame.assign(**out) if out else frame


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y"):
        return True
    if text in ("0", "false", "f", "no", "n"):
        return False
    return None


def _to_utc_naive(s: pd.Series) -> pd.Series:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_datetime64_dtype(s.dtype):
        pass
    elif pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        # Epoch seconds (how SQLite usually keeps times).
        s = pd.to_datetime(s, unit="s", errors="coerce")
    else:
        s = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601").dt.tz_localize(None)
    return s if s.dtype == "datetime64[us]" else s.astype("datetime64[us]")


def one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]

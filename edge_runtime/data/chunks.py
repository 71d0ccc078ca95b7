"""Large Parquet datasets in chunks: the next one decoded while this one is grouped, then merged exactly.

A query over a Parquet file of several row groups reads them a chunk at a
time (consecutive row groups, at least ``CHUNK_ROWS`` rows) in a background
thread, one chunk ahead: pyarrow decodes in C++ without the GIL while pandas
and numpy group the chunk before it, so on a node with two cores the two
overlap instead of adding up, and memory holds two chunks instead of the
whole file (docs/decisions/0007-parquet-read-in-chunks.md).

Each chunk gets its own groups and partial states
(:func:`~edge_runtime.data.compute.compute_partials`); the chunks' groups
are then matched by their key values and their states combined exactly,
with the same formulas the control plane uses to merge sites: counts and
sums add, minima and maxima take the extreme, and the sums of squared
deviations combine by Chan's rule, ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``.
Quantile sketches are not combined here: such a query reads the whole table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from edge_runtime.data.binding import BoundQuery
from edge_runtime.data.catalog import Dataset
from edge_runtime.data.grouping import Groups, group_rows
from edge_runtime.data.sources import (
    ExecutionError,
    arrow_to_pandas,
    dictionary_columns,
    normalise_frame,
    one_line,
)

CHUNK_ROWS = 1_000_000
State = dict[str, Any]


def chunked_row_groups(dataset: Dataset, bound: BoundQuery) -> list[list[int]] | None:
    """The row groups of the dataset in chunks of at least ``CHUNK_ROWS`` rows, if it is worth chunking.

    None when the query must see the whole table (rows, quantiles), the
    dataset is not Parquet, or the file holds a single chunk.
    """
    if dataset.kind != "parquet" or bound.spec.mode != "aggregate":
        return None
    if any(a.op == "quantile" for a in bound.spec.aggregates):
        return None
    try:
        metadata = pq.ParquetFile(dataset.path).metadata
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(dataset, exc) from None
    chunks: list[list[int]] = []
    rows = 0
    for i in range(metadata.num_row_groups):
        if not chunks or rows >= CHUNK_ROWS:
            chunks.append([])
            rows = 0
        chunks[-1].append(i)
        rows += metadata.row_group(i).num_rows
    return chunks if len(chunks) > 1 else None


def read_chunks(dataset: Dataset, bound: BoundQuery, chunks: list[list[int]]) -> Iterator[pd.DataFrame]:
    """Each chunk as a frame of the query's source columns, normalised; the next one read meanwhile."""
    columns = list(bound.source_columns)
    read = columns or dataset.schema().column_names[:1]
    dictionary = dictionary_columns(bound)
    types = {c: bound.types[c] for c in columns}
    try:
        parquet = pq.ParquetFile(dataset.path, read_dictionary=dictionary or None)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(dataset, exc) from None

    def read_one(groups: list[int]) -> pa.Table:
        return parquet.read_row_groups(groups, columns=read, use_threads=True)

    with ThreadPoolExecutor(1, thread_name_prefix="parquet-read") as reader:
        pending: Future[pa.Table] = reader.submit(read_one, chunks[0])
        for i in range(len(chunks)):
            try:
                table = pending.result()
            except (pa.ArrowException, OSError) as exc:
                raise _unreadable(dataset, exc) from None
            if i + 1 < len(chunks):
                pending = reader.submit(read_one, chunks[i + 1])
            frame = arrow_to_pandas(table, columns)
            del table
            yield normalise_frame(frame, types)


def _unreadable(dataset: Dataset, exc: BaseException) -> ExecutionError:
    return ExecutionError(f"dataset {dataset.name!r} cannot be read: {one_line(exc)}")


def merge_chunks(bound: BoundQuery, parts: list[tuple[Groups, list[State]]]) -> tuple[Groups, list[State]]:
    """One set of groups and states from the chunks': groups matched by key values, states combined exactly."""
    if len(parts) == 1:
        return parts[0]
    n_keys = len(bound.key_names)
    sizes = [g.count for g, _ in parts]
    total = sum(sizes)
    if n_keys:
        keys = [pd.concat([g.keys[k] for g, _ in parts], ignore_index=True) for k in range(n_keys)]
        merged = group_rows(keys, total)
        ids = merged.ids
    else:
        # No keys: every chunk's one group (if it had rows) is the one group.
        ids = np.zeros(total, dtype=np.int64)
        merged = Groups(ids=ids, count=1 if total else 0, keys=[], rows=np.zeros(0, dtype=np.int64))
    g = merged.count
    rows = _add(ids, [p[0].rows for p in parts], g)
    states = [_merge_state([p[1][i] for p in parts], ids, g) for i in range(len(bound.spec.aggregates))]
    return Groups(ids=np.zeros(0, dtype=np.int64), count=g, keys=merged.keys, rows=rows), states


def _add(ids: npt.NDArray[np.int64], values: list[npt.NDArray[Any]], g: int) -> npt.NDArray[Any]:
    """Per merged group, the sum of the chunks' values: exact for integers, float64 sums otherwise."""
    flat = np.concatenate(values)
    if flat.dtype.kind not in "iub":
        return np.bincount(ids, weights=flat.astype(np.float64, copy=False), minlength=g)
    flat = flat.astype(np.int64, copy=False)
    if len(flat) == 0 or int(np.abs(flat).max()) * len(flat) < 1 << 53:
        # Every partial sum is an integer float64 holds exactly: bincount's sums are exact, and fast.
        return np.bincount(ids, weights=flat, minlength=g).astype(np.int64)
    out = np.zeros(g, dtype=np.int64)
    np.add.at(out, ids, flat)
    return out


def _extreme(ids: npt.NDArray[np.int64], values: list[npt.NDArray[Any]], g: int, op: str) -> npt.NDArray[Any]:
    flat = np.concatenate(values)
    ufunc: Callable[..., Any]
    if flat.dtype.kind in "iu":
        # Integer and time extremes: a chunk's empty groups hold the opposite extreme, which never wins.
        info = np.iinfo(np.int64)
        out: npt.NDArray[Any] = np.full(g, info.max if op == "min" else info.min, dtype=np.int64)
        ufunc = np.minimum if op == "min" else np.maximum
    else:
        out = np.full(g, np.inf if op == "min" else -np.inf)
        ufunc = np.fmin if op == "min" else np.fmax
    ufunc.at(out, ids, flat)
    return out


def _merge_state(states: list[State], ids: npt.NDArray[np.int64], g: int) -> State:
    n = _add(ids, [s["n"] for s in states], g)
    merged: State = {"n": n}
    if "sum" in states[0]:
        merged["sum"] = _add(ids, [s["sum"] for s in states], g)
    if "m2" in states[0]:
        n_i = np.concatenate([s["n"] for s in states]).astype(np.float64)
        mean_i = np.concatenate([s["mean"] for s in states])
        has = n_i > 0
        # A chunk's group without values has no mean (NaN): it weighs nothing.
        mean_i = np.where(has, mean_i, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(ids, weights=n_i * mean_i, minlength=g) / n
        spread = mean_i - mean[ids]
        m2_i = np.where(has, np.concatenate([s["m2"] for s in states]), 0.0)
        merged["mean"] = mean
        merged["m2"] = np.bincount(ids, weights=m2_i + n_i * spread * spread, minlength=g)
    for op in ("min", "max"):
        if op in states[0]:
            merged[op] = _extreme(ids, [s[op] for s in states], g, op)
    return merged

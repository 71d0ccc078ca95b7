"""Federated results merged from many sites equal the same query computed centrally over the union of their data.

Each generated site writes its rows to a real Parquet file, answers the
generated query through ``run_query`` (pandas, k = 1 so nothing is
suppressed), and the partials are merged; the reference is plain pandas over
the concatenated frames, written independently of the engine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.merge import merge_results
from edge_runtime.data.sketch import QuantileSketch
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts

SCHEMA = pa.schema([
    ("line", pa.string()),
    ("machine", pa.int64()),
    ("ts", pa.timestamp("us")),
    ("x", pa.float64()),
    ("c", pa.int64()),
])
START = pd.Timestamp("2024-02-26T00:00:00")  # a Monday, so weeks and months both get crossed
LINES = ["L1", "L2", "L3", None]

row = st.fixed_dictionaries({
    "line": st.sampled_from(LINES),
    "machine": st.integers(0, 3),
    "ts": st.one_of(st.none(), st.integers(0, 60 * 24 * 45).map(lambda m: START + pd.Timedelta(minutes=m))),
    "x": st.one_of(st.none(), st.floats(-1000, 1000, allow_nan=False, allow_subnormal=False)),
    "c": st.integers(-50, 1000),
})
site_rows = st.lists(row, min_size=0, max_size=30)
sites_strategy = st.lists(site_rows, min_size=1, max_size=4)

AGGREGATES: list[dict[str, Any]] = [
    {"op": "count"},
    {"op": "count", "column": "x"},
    {"op": "sum", "column": "x"},
    {"op": "sum", "column": "c"},
    {"op": "mean", "column": "x"},
    {"op": "mean", "column": "c"},
    {"op": "std", "column": "x"},
    {"op": "std", "column": "c", "ddof": 0},
    {"op": "var", "column": "x"},
    {"op": "var", "column": "x", "ddof": 0, "name": "pvar_x"},
    {"op": "min", "column": "x"},
    {"op": "max", "column": "x"},
    {"op": "min", "column": "c"},
    {"op": "max", "column": "ts"},
    {"op": "min", "column": "ts"},
    {"op": "quantile", "column": "x", "q": 0.5},
    {"op": "quantile", "column": "c", "q": 0.9, "accuracy": 0.02},
]

filters_strategy = st.lists(st.one_of(
    st.builds(lambda v: {"column": "x", "op": "gt", "value": v}, st.integers(-500, 500)),
    st.builds(lambda v: {"column": "c", "op": "le", "value": v}, st.integers(0, 1000)),
    st.builds(lambda v: {"column": "line", "op": "in", "value": v},
              st.lists(st.sampled_from(["L1", "L2", "L3"]), min_size=1, max_size=2, unique=True)),
    st.builds(lambda v: {"column": "line", "op": "ne", "value": v}, st.sampled_from(["L1", "L2"])),
    st.builds(lambda d: {"column": "ts", "op": "ge", "value": (START + pd.Timedelta(days=d)).isoformat() + "Z"},
              st.integers(0, 40)),
    st.builds(lambda lo, w: {"column": "machine", "op": "between", "value": [lo, lo + w]},
              st.integers(0, 3), st.integers(0, 2)),
    st.just({"column": "x", "op": "not_null"}),
    st.just({"column": "ts", "op": "is_null"}),
), max_size=2)

spec_strategy = st.fixed_dictionaries({
    "dataset": st.just("readings"),
    "group_by": st.lists(st.sampled_from(["line", "machine"]), unique=True, max_size=2),
    "aggregates": st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=6,
                           unique_by=lambda a: a.get("name") or (a["op"], a.get("column"), a.get("ddof"))),
    "filters": filters_strategy,
}, optional={
    "time_bucket": st.builds(lambda i: {"column": "ts", "interval": i},
                             st.sampled_from(["minute", "hour", "day", "week", "month"])),
})


def site_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.to_pandas()


def write_site(folder: Path, rows: list[dict[str, Any]]) -> Catalog:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "readings.parquet")
    return Catalog.from_config({"datasets": [{"name": "readings", "kind": "parquet", "path": "readings.parquet",
                                              "time_column": "ts"}]}, base_dir=folder)


OPEN_POLICY = DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=1)


# -- the reference: plain pandas over the union ------------------------------------------------------------------


def central_filter(df: pd.DataFrame, filters: list[dict[str, Any]]) -> pd.DataFrame:
    for f in filters:
        s = df[f["column"]]
        op, v = f["op"], f.get("value")
        if f["column"] == "ts" and isinstance(v, str):
            v = pd.Timestamp(v).tz_convert(None)
        if op == "gt":
            m = s > v
        elif op == "le":
            m = s <= v
        elif op == "in":
            m = s.isin(v)
        elif op == "ne":
            m = s.notna() & (s != v)
        elif op == "ge":
            m = s >= v
        elif op == "between":
            m = s.between(v[0], v[1])
        elif op == "not_null":
            m = s.notna()
        else:
            m = s.isna()
        df = df[m.fillna(False).astype(bool)]
    return df


def central_bucket(ts: pd.Series, interval: str) -> pd.Series:
    if interval == "minute":
        return ts.dt.floor("min")
    if interval == "hour":
        return ts.dt.floor("h")
    if interval == "day":
        return ts.dt.floor("D")
    if interval == "week":
        return (ts - pd.to_timedelta(ts.dt.day_of_week, unit="D")).dt.floor("D")
    return ts.dt.to_period("M").dt.start_time


def central(union: pd.DataFrame, spec: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    df = central_filter(union, spec.get("filters", []))
    keys = list(spec["group_by"])
    if "time_bucket" in spec:
        df = df.assign(bucket=central_bucket(df["ts"], spec["time_bucket"]["interval"]))
        keys.append("bucket")
    if keys:
        grouped = list(df.groupby(keys, dropna=False, sort=False))
    else:
        grouped = [((), df)] if len(df) else []
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for key, group in grouped:
        key = key if isinstance(key, tuple) else (key,)
        values: dict[str, Any] = {}
        for agg in spec["aggregates"]:
            values[output_name(agg)] = central_value(group, agg)
        out[tuple(normal_key(k) for k in key)] = values
    return out


def central_value(group: pd.DataFrame, agg: dict[str, Any]) -> Any:
    op, column = agg["op"], agg.get("column")
    if op == "count":
        return len(group) if column is None else int(group[column].count())
    s = group[column]
    if op == "sum":
        return s.sum()
    if op == "mean":
        return s.mean()
    if op == "std":
        return s.std(ddof=agg.get("ddof", 1))
    if op == "var":
        return s.var(ddof=agg.get("ddof", 1))
    if op in ("min", "max"):
        return getattr(s, op)()
    return s.dropna().to_numpy(dtype=float)  # quantile: the values, checked against the sketch's bound


def output_name(agg: dict[str, Any]) -> str:
    if "name" in agg:
        return str(agg["name"])
    if agg.get("column") is None:
        return "count"
    if agg["op"] == "quantile":
        return f"p{agg['q'] * 100:g}_{agg['column']}".replace(".", "_")
    return f"{agg['op']}_{agg['column']}"


def normal_key(value: Any) -> Any:
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def assert_matches(expected: Any, actual: Any, agg: dict[str, Any]) -> None:
    op = agg["op"]
    if op == "quantile":
        check_quantile(expected, actual, agg["q"], agg.get("accuracy", 0.01))
        return
    if expected is None or expected is pd.NaT or (isinstance(expected, float) and math.isnan(expected)):
        assert actual is None, (agg, expected, actual)
        return
    if isinstance(expected, pd.Timestamp):
        assert actual == expected.isoformat(), (agg, expected, actual)
        return
    if op in ("count",) or (op in ("sum", "min", "max") and agg.get("column") == "c"):
        assert actual == int(expected), (agg, expected, actual)
        assert isinstance(actual, int)
        return
    assert actual == pytest.approx(float(expected), rel=1e-9, abs=1e-7), (agg, expected, actual)


def check_quantile(values: np.ndarray, estimate: Any, q: float, accuracy: float) -> None:
    if len(values) == 0:
        assert estimate is None
        return
    ordered = np.sort(values)
    h = q * (len(ordered) - 1)
    lo, hi = ordered[math.floor(h)], ordered[math.ceil(h)]
    exact = float(np.quantile(values, q))
    bound = accuracy * max(abs(lo), abs(hi)) + 1e-9 * max(1.0, abs(exact))
    assert abs(estimate - exact) <= bound, (q, exact, estimate, bound)


def assert_central(merged: Any, union: pd.DataFrame, spec: dict[str, Any]) -> None:
    """The merged result has the central result's groups, each with every aggregate's central value."""
    expected = central(union, spec)
    n_keys = len(spec["group_by"]) + (1 if "time_bucket" in spec else 0)
    got = {tuple(r[:n_keys]): dict(zip(merged.columns[n_keys:], r[n_keys:], strict=True)) for r in merged.rows}
    assert set(got) == set(expected)
    for key, values in expected.items():
        for agg in spec["aggregates"]:
            assert_matches(values[output_name(agg)], got[key][output_name(agg)], agg)


# -- the properties ----------------------------------------------------------------------------------------------


def run_sites(tmp: Path, sites: list[list[dict[str, Any]]], spec: dict[str, Any],
              policy: DataPolicy = OPEN_POLICY) -> list[QueryResult]:
    results = []
    for i, rows in enumerate(sites):
        catalog = write_site(tmp / f"site{i}", rows)
        results.append(run_query(spec, catalog=catalog, policy=policy, site_facts=SiteFacts(site=f"site-{i}")))
    return results


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sites=sites_strategy, spec=spec_strategy)
def test_it_merges_every_aggregate_to_the_central_result(tmp_path_factory: pytest.TempPathFactory,
                                                         sites: list[list[dict[str, Any]]],
                                                         spec: dict[str, Any]) -> None:
    tmp = tmp_path_factory.mktemp("sites")
    results = run_sites(tmp, sites, spec)
    assert all(r.status == "answered" for r in results), [r.reason for r in results]
    merged = merge_results(spec, results)
    union = pd.concat([site_frame(rows) for rows in sites], ignore_index=True)
    assert_central(merged, union, spec)
    assert merged.complete
    assert set(merged.approximate) == {output_name(a) for a in spec["aggregates"] if a["op"] == "quantile"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sites=sites_strategy, k=st.integers(2, 6),
       group_by=st.lists(st.sampled_from(["line", "machine"]), unique=True, min_size=1, max_size=2))
def test_it_never_returns_a_cell_under_k_and_counts_what_it_suppressed(
        tmp_path_factory: pytest.TempPathFactory, sites: list[list[dict[str, Any]]], k: int,
        group_by: list[str]) -> None:
    tmp = tmp_path_factory.mktemp("ksites")
    spec = {"dataset": "readings", "group_by": group_by, "aggregates": [{"op": "count"}, {"op": "sum", "column": "c"}]}
    policy = DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=k)
    results = run_sites(tmp, sites, spec, policy)
    expected_merge: dict[tuple[Any, ...], int] = {}
    for rows, result in zip(sites, results, strict=True):
        assert result.status == "answered" and result.partials is not None
        assert all(n >= k for n in result.partials.rows)
        sizes = site_frame(rows).groupby(group_by, dropna=False).size()
        small = sizes[sizes < k]
        assert result.suppressed.cells == len(small)
        total_small = int(small.sum())
        assert result.suppressed.rows == (total_small if total_small >= k or total_small == 0 else None)
        for key, size in sizes[sizes >= k].items():
            key = key if isinstance(key, tuple) else (key,)
            normal = tuple(normal_key(v) for v in key)
            expected_merge[normal] = expected_merge.get(normal, 0) + int(size)
    merged = merge_results(spec, results)
    got = {tuple(r[:len(group_by)]): r[len(group_by)] for r in merged.rows}
    assert got == expected_merge
    assert merged.suppressed_cells == sum(r.suppressed.cells for r in results)
    assert merged.complete == (merged.suppressed_cells == 0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False), min_size=1, max_size=300),
       q=st.floats(0, 1), accuracy=st.sampled_from([0.001, 0.01, 0.05]), cut=st.integers(0, 300))
def test_it_keeps_quantile_sketches_within_their_documented_bound(values: list[float], q: float, accuracy: float,
                                                                  cut: int) -> None:
    whole = QuantileSketch.of(values, accuracy)
    merged = QuantileSketch.of(values[:cut], accuracy).merge(QuantileSketch.of(values[cut:], accuracy))
    # Merging is exact: the merged sketch is the sketch of the union.
    assert merged.to_state() == whole.to_state()
    check_quantile(np.asarray(values), merged.quantile(q), q, accuracy)


def test_it_merges_std_where_raw_sums_of_squares_would_cancel(tmp_path: Path) -> None:
    # Values near 1e9 with a spread of about 1: sum(x^2) - n*mean^2 loses every digit of the variance.
    base = 1e9
    sites = [[{"line": "L1", "machine": 0, "ts": START, "x": base + d, "c": 0} for d in offsets]
             for offsets in ([0.5, 1.5, 2.5], [3.5, 4.5], [0.25, 5.75, 1.0])]
    spec = {"dataset": "readings", "aggregates": [{"op": "std", "column": "x"}, {"op": "var", "column": "x"}]}
    merged = merge_results(spec, run_sites(tmp_path, sites, spec))
    union = np.array([r["x"] for rows in sites for r in rows]) - base
    assert merged.rows[0][0] == pytest.approx(float(np.std(union, ddof=1)), rel=1e-6)
    assert merged.rows[0][1] == pytest.approx(float(np.var(union, ddof=1)), rel=1e-6)


def test_it_orders_and_limits_the_merged_groups(tmp_path: Path) -> None:
    sites = [[{"line": line, "machine": m, "ts": START, "x": 1.0, "c": m * 10 + i}
              for line in ("L1", "L2") for m in range(4)] for i in range(3)]
    spec = {"dataset": "readings", "group_by": ["line", "machine"],
            "aggregates": [{"op": "sum", "column": "c", "name": "total"}],
            "order_by": [{"name": "total", "desc": True}], "limit": 3}
    merged = merge_results(spec, run_sites(tmp_path, sites, spec))
    assert merged.columns == ["line", "machine", "total"]
    assert merged.rows == [["L1", 3, 93], ["L2", 3, 93], ["L1", 2, 63]]
    assert merged.total == 8 and merged.truncated
    assert merged.contributors == [3, 3, 3]


def test_it_leaves_out_sites_that_refused_and_says_the_result_is_incomplete(tmp_path: Path) -> None:
    sites = [[{"line": "L1", "machine": 0, "ts": START, "x": 2.0, "c": 1}]] * 2
    spec = {"dataset": "readings", "aggregates": [{"op": "count"}]}
    answered = run_sites(tmp_path, sites, spec)
    refused = run_query(spec, catalog=write_site(tmp_path / "closed", sites[0]), policy=DataPolicy(),
                        site_facts=SiteFacts(site="closed"))
    merged = merge_results(spec, [*answered, refused])
    assert merged.rows == [[2]]
    assert not merged.complete
    closed = next(s for s in merged.sites if s.site == "closed")
    assert closed.status == "refused" and closed.rule == "datasets"


def test_it_ignores_a_second_answer_from_the_same_site(tmp_path: Path) -> None:
    rows = [{"line": "L1", "machine": 0, "ts": START, "x": 2.0, "c": 1}]
    spec = {"dataset": "readings", "aggregates": [{"op": "count"}]}
    [result] = run_sites(tmp_path, [rows], spec)
    merged = merge_results(spec, [result, result])
    assert merged.rows == [[1]]
    assert [s.status for s in merged.sites] == ["answered", "error"]


def test_it_refuses_to_merge_partials_shaped_for_another_query(tmp_path: Path) -> None:
    rows = [{"line": "L1", "machine": 0, "ts": START, "x": 2.0, "c": 1}]
    asked = {"dataset": "readings", "aggregates": [{"op": "count"}]}
    other = {"dataset": "readings", "aggregates": [{"op": "sum", "column": "c"}]}
    [result] = run_sites(tmp_path, [rows], other)
    merged = merge_results(asked, [result])
    assert merged.rows == []
    assert merged.sites[0].status == "error" and "aggregates" in merged.sites[0].reason

"""Query specs that do not fit are refused with a message naming the field; nothing in a spec is ever evaluated."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.spec import SpecError, parse_spec
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts

INJECTIONS = ["col) or 1=1 --", "__import__('os')", "`line`", "@var", "line; DROP TABLE readings",
              "x\" OR \"1\"=\"1", "line\n", "a b", "ts.dt.hour", "line[0]", "", "é", "1line"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    folder = tmp_path_factory.mktemp("spec")
    frame = pd.DataFrame({
        "line": ["L1", "L2", "L1", "x' or '1'='1"],
        "machine": [1, 2, 3, 4],
        "ts": pd.to_datetime(["2024-03-01T00:00", "2024-03-01T01:00", "2024-03-02T00:00", "2024-03-02T05:00"]),
        "temp": [60.0, 61.5, 59.0, 70.0],
        "ok": [True, False, True, True],
    })
    frame.to_parquet(folder / "r.parquet")
    with sqlite3.connect(folder / "r.sqlite3") as conn:
        frame.assign(ts=frame["ts"].astype(str)).to_sql("readings", conn, index=False)
    return Catalog.from_config({"datasets": [
        {"name": "readings", "kind": "parquet", "path": "r.parquet", "time_column": "ts"},
        {"name": "sqlreadings", "kind": "sqlite", "path": "r.sqlite3", "table": "readings", "time_column": "ts",
         "columns": {"ok": "bool"}},
    ]}, base_dir=folder)


POLICY = DataPolicy(datasets={"readings": DatasetRule(), "sqlreadings": DatasetRule()}, min_group_size=1)


def run(catalog: Catalog, spec: Any) -> QueryResult:
    return run_query(spec, catalog=catalog, policy=POLICY, site_facts=SiteFacts(site="s"))


def refused(catalog: Catalog, spec: Any, field: str) -> QueryResult:
    result = run(catalog, spec)
    assert result.status == "refused", result
    assert result.field == field, result
    assert result.reason.startswith(f"{field}:"), result.reason
    return result


BASE: dict[str, Any] = {"dataset": "readings", "aggregates": [{"op": "count"}]}


def test_it_refuses_an_unknown_dataset(catalog: Catalog) -> None:
    result = refused(catalog, {**BASE, "dataset": "payroll"}, "dataset")
    assert "payroll" in result.reason and "readings" in result.reason


@pytest.mark.parametrize(("spec", "field"), [
    ({**BASE, "group_by": ["shift"]}, "group_by.0"),
    ({**BASE, "filters": [{"column": "pressure", "op": "gt", "value": 1}]}, "filters.0.column"),
    ({**BASE, "aggregates": [{"op": "mean", "column": "humidity"}]}, "aggregates.0.column"),
    ({**BASE, "time_bucket": {"column": "when", "interval": "hour"}}, "time_bucket.column"),
    ({"dataset": "readings", "mode": "rows", "columns": ["line", "secret"]}, "columns.1"),
])
def test_it_refuses_unknown_columns_naming_the_field(catalog: Catalog, spec: dict[str, Any], field: str) -> None:
    result = refused(catalog, spec, field)
    assert "unknown column" in result.reason


@pytest.mark.parametrize(("filter_", "field"), [
    ({"column": "temp", "op": "gt", "value": "hot"}, "filters.0.value"),
    ({"column": "temp", "op": "gt", "value": True}, "filters.0.value"),
    ({"column": "machine", "op": "in", "value": [1, "2"]}, "filters.0.value.1"),
    ({"column": "line", "op": "eq", "value": 3}, "filters.0.value"),
    ({"column": "ok", "op": "eq", "value": "yes"}, "filters.0.value"),
    ({"column": "ok", "op": "lt", "value": True}, "filters.0.op"),
    ({"column": "ts", "op": "ge", "value": 1709251200}, "filters.0.value"),
    ({"column": "ts", "op": "ge", "value": "yesterday"}, "filters.0.value"),
    ({"column": "temp", "op": "between", "value": [70, 60]}, "filters.0.value"),
    ({"column": "temp", "op": "between", "value": [1]}, "filters.0"),
    ({"column": "temp", "op": "is_null", "value": 1}, "filters.0"),
    ({"column": "temp", "op": "in", "value": []}, "filters.0"),
])
def test_it_refuses_values_of_the_wrong_type(catalog: Catalog, filter_: dict[str, Any], field: str) -> None:
    refused(catalog, {**BASE, "filters": [filter_]}, field)


@pytest.mark.parametrize(("spec", "field"), [
    ({**BASE, "aggregates": [{"op": "mean", "column": "line"}]}, "aggregates.0.op"),
    ({**BASE, "aggregates": [{"op": "max", "column": "line"}]}, "aggregates.0.op"),
    ({**BASE, "time_bucket": {"column": "temp", "interval": "hour"}}, "time_bucket.column"),
    ({**BASE, "time_bucket": {"column": "ts", "interval": "fortnight"}}, "time_bucket.interval"),
    ({**BASE, "aggregates": [{"op": "median", "column": "temp"}]}, "aggregates.0.op"),
    ({**BASE, "aggregates": [{"op": "quantile", "column": "temp"}]}, "aggregates.0"),
    ({**BASE, "aggregates": [{"op": "quantile", "column": "temp", "q": 1.5}]}, "aggregates.0.q"),
    ({**BASE, "aggregates": []}, "spec"),
    ({**BASE, "limit": 0}, "limit"),
    ({**BASE, "order_by": [{"name": "temp"}]}, "spec"),
    ({**BASE, "having": "count > 1"}, "having"),
    ({**BASE, "filters": [{"column": "temp", "op": "gt", "value": 1, "expr": "temp > 1"}]}, "filters.0.expr"),
])
def test_it_refuses_malformed_specs_naming_the_field(catalog: Catalog, spec: dict[str, Any], field: str) -> None:
    refused(catalog, spec, field)


@pytest.mark.parametrize("op", ["like", "regex", "query", "eval", "==", "contains"])
def test_it_refuses_an_operator_outside_the_closed_set(catalog: Catalog, op: str) -> None:
    result = refused(catalog, {**BASE, "filters": [{"column": "temp", "op": op, "value": 1}]}, "filters.0.op")
    assert repr(op) in result.reason


@pytest.mark.parametrize("name", INJECTIONS)
@pytest.mark.parametrize("where", ["filter", "group_by", "aggregate", "bucket", "dataset", "name", "order_by"])
def test_it_refuses_injection_attempts_in_names(catalog: Catalog, name: str, where: str) -> None:
    spec: dict[str, Any] = json.loads(json.dumps(BASE))
    field = {
        "filter": "filters.0.column", "group_by": "group_by.0", "aggregate": "aggregates.0.column",
        "bucket": "time_bucket.column", "dataset": "dataset", "name": "aggregates.0.name",
        "order_by": "order_by.0.name",
    }[where]
    if where == "filter":
        spec["filters"] = [{"column": name, "op": "eq", "value": 1}]
    elif where == "group_by":
        spec["group_by"] = [name]
    elif where == "aggregate":
        spec["aggregates"] = [{"op": "sum", "column": name}]
    elif where == "bucket":
        spec["time_bucket"] = {"column": name, "interval": "hour"}
    elif where == "dataset":
        spec["dataset"] = name
    elif where == "name":
        spec["aggregates"] = [{"op": "count", "name": name}]
    else:
        spec["order_by"] = [{"name": name}]
    result = refused(catalog, spec, field)
    assert "plain name" in result.reason


@pytest.mark.parametrize("value", ["x\x00", "line\n--", "a\x1b[2J"])
def test_it_refuses_control_characters_in_values(catalog: Catalog, value: str) -> None:
    refused(catalog, {**BASE, "filters": [{"column": "line", "op": "eq", "value": value}]}, "filters.0.value")


@pytest.mark.parametrize("dataset", ["readings", "sqlreadings"])
@pytest.mark.parametrize("value", ["x' or '1'='1", "L1' OR 1=1 --", "__import__('os').system('id')", "@var", "`line`"])
def test_it_treats_string_values_as_literals_never_as_code(catalog: Catalog, dataset: str, value: str) -> None:
    result = run(catalog, {**BASE, "dataset": dataset, "filters": [{"column": "line", "op": "eq", "value": value}]})
    assert result.status == "answered", result.reason
    assert result.partials is not None
    # Only the row whose value is exactly this string matches; an injected condition would match them all.
    expected = 1 if value == "x' or '1'='1" else 0
    assert sum(result.partials.rows) == expected


def test_it_refuses_a_spec_that_is_not_an_object(catalog: Catalog) -> None:
    refused(catalog, ["dataset", "readings"], "spec")


def test_it_refuses_an_oversized_spec(catalog: Catalog) -> None:
    spec = {**BASE, "filters": [{"column": "line", "op": "in", "value": ["L" * 200] * 400}]}
    refused(catalog, spec, "spec")


def test_it_names_a_score_output_that_shadows_a_column(catalog: Catalog) -> None:
    spec = {**BASE, "score": {"model": "anomaly", "inputs": ["temp"], "outputs": [{"output": "y", "column": "line"}]}}
    refused(catalog, spec, "score.outputs.0.column")


def test_it_refuses_string_columns_as_model_inputs(catalog: Catalog) -> None:
    spec = {**BASE, "score": {"model": "anomaly", "inputs": ["line"], "outputs": [{"output": "y", "column": "s"}]}}
    refused(catalog, spec, "score.inputs.0")


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=30).filter(lambda s: not s.isidentifier() or not s.isascii()))
def test_it_never_lets_a_non_identifier_through_as_a_column(name: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({"dataset": "readings", "aggregates": [{"op": "sum", "column": name}]})
    assert caught.value.field == "aggregates.0.column"


def test_it_converts_zoned_timestamps_to_utc(catalog: Catalog) -> None:
    spec = {**BASE, "filters": [{"column": "ts", "op": "lt", "value": "2024-03-01T02:30:00+02:00"}]}
    result = run(catalog, spec)
    assert result.partials is not None and result.partials.rows == [1]  # only 00:00 UTC is before 00:30 UTC

"""Datasets on a node: CSV, Parquet and SQLite sources, their catalog (schemas, never rows), and the score step."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from edge_runtime.data.catalog import Catalog, CatalogError
from edge_runtime.data.engine import run_query
from edge_runtime.data.merge import merge_results
from edge_runtime.data.node import model_scorer
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts
from edge_runtime.serving.loader import load_model
from tests.edge_runtime import onnx_models as om

SITE = SiteFacts(site="plant-osaka")


def plant_frame(seed: int = 3, n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "line": rng.choice(["L1", "L2"], n),
        "machine": rng.choice(["press", "lathe", "mill"], n),
        "ts": pd.date_range("2024-03-01T00:00:00", periods=n, freq="5min"),
        "temperature": rng.normal(65, 3, n),
        "vibration": rng.gamma(2.0, 0.5, n),
        "parts": rng.integers(0, 20, n),
        "defect": rng.random(n) < 0.05,
    })
    frame.loc[frame.index % 23 == 0, "temperature"] = np.nan
    return frame


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, pd.DataFrame, Path]:
    folder = tmp_path_factory.mktemp("sources")
    frame = plant_frame()
    frame.to_parquet(folder / "readings.parquet")
    # CSV with zoned times and the booleans as 0/1, as exports often have them.
    frame.assign(ts=frame["ts"].dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin"),
                 defect=frame["defect"].astype(int)).to_csv(folder / "readings.csv", index=False)
    with sqlite3.connect(folder / "mes.sqlite3") as conn:
        conn.execute("CREATE TABLE readings (line TEXT, machine TEXT, ts INTEGER, temperature REAL, vibration REAL, "
                     "parts INTEGER, defect BOOLEAN, \"odd name\" TEXT)")
        conn.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, 'x')", [
            (r.line, r.machine, int(r.ts.timestamp()), None if np.isnan(r.temperature) else r.temperature,
             r.vibration, int(r.parts), int(r.defect)) for r in frame.itertuples()])
    config = {"datasets": [
        {"name": "pq", "kind": "parquet", "path": "readings.parquet", "time_column": "ts"},
        {"name": "csv", "kind": "csv", "path": "readings.csv", "time_column": "ts", "columns": {"defect": "bool"}},
        {"name": "sql", "kind": "sqlite", "path": "mes.sqlite3", "table": "readings", "time_column": "ts"},
    ]}
    (folder / "datasets.json").write_text(json.dumps(config))
    return Catalog.from_state_dir(folder), frame, folder


POLICY = DataPolicy(datasets={n: DatasetRule() for n in ("pq", "csv", "sql")}, min_group_size=1)
SPEC: dict[str, Any] = {
    "group_by": ["line", "machine"],
    "time_bucket": {"column": "ts", "interval": "hour"},
    "filters": [{"column": "vibration", "op": "lt", "value": 2.5}, {"column": "machine", "op": "ne", "value": "mill"}],
    "aggregates": [{"op": "count"}, {"op": "mean", "column": "temperature"}, {"op": "std", "column": "temperature"},
                   {"op": "sum", "column": "parts"}, {"op": "sum", "column": "defect"},
                   {"op": "max", "column": "ts"}],
}


def test_it_reports_schemas_and_row_counts_but_never_rows(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    catalog, frame, _ = sources
    report = catalog.report()
    assert report["errors"] == {}
    by_name = {d["name"]: d for d in report["datasets"]}
    for name in ("pq", "csv", "sql"):
        types = {c["name"]: c["type"] for c in by_name[name]["columns"]}
        assert types == {"line": "string", "machine": "string", "ts": "timestamp", "temperature": "float",
                         "vibration": "float", "parts": "int", "defect": "bool"}
        assert by_name[name]["row_count"] == len(frame)
    assert by_name["sql"]["ignored_columns"] == ["odd name"]
    text = json.dumps(report)
    # No value of the data is in the report.
    assert "press" not in text and "L1" not in text and f"{frame['vibration'].iloc[0]:.6f}"[:6] not in text


def test_it_answers_the_same_from_csv_parquet_and_sqlite(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    catalog, frame, _ = sources
    merged = {}
    for name in ("pq", "csv", "sql"):
        result = run_query({**SPEC, "dataset": name}, catalog=catalog, policy=POLICY, site_facts=SITE)
        assert result.status == "answered", result.reason
        merged[name] = merge_results({**SPEC, "dataset": name}, [result]).to_frame()
    for name in ("csv", "sql"):
        pd.testing.assert_frame_equal(merged[name], merged["pq"], check_exact=False, rtol=1e-12)
    reference = frame[(frame.vibration < 2.5) & (frame.machine != "mill")]
    assert merged["pq"]["count"].sum() == len(reference)
    assert merged["pq"]["sum_parts"].sum() == reference["parts"].sum()
    assert merged["pq"]["sum_defect"].sum() == reference["defect"].sum()


def test_it_names_a_missing_file(tmp_path: Path) -> None:
    catalog = Catalog.from_config({"datasets": [{"name": "gone", "kind": "csv", "path": "nowhere.csv"}]},
                                  base_dir=tmp_path)
    report = catalog.report()
    assert "gone" in report["errors"] and "does not exist" in report["errors"]["gone"]
    result = run_query({"dataset": "gone", "aggregates": [{"op": "count"}]}, catalog=catalog,
                       policy=DataPolicy(datasets={"gone": DatasetRule()}), site_facts=SITE)
    assert result.status == "error" and "nowhere.csv" in result.reason and result.field == "dataset"


def test_it_names_an_unknown_sqlite_table(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    _, _, folder = sources
    catalog = Catalog.from_config({"datasets": [{"name": "t", "kind": "sqlite", "path": "mes.sqlite3",
                                                 "table": "shifts"}]}, base_dir=folder)
    with pytest.raises(CatalogError, match=r"dataset 't': table 'shifts' is not in .*\(tables: readings\)"):
        catalog.check()


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "a", "kind": "excel", "path": "x.xlsx"}, "dataset 'a' field 'kind'"),
    ({"name": "b", "kind": "sqlite", "path": "x.db"}, "dataset 'b': .*needs 'table'"),
    ({"name": "c", "kind": "csv", "path": "x.csv", "table": "t"}, "dataset 'c': .*only for sqlite"),
    ({"name": "d", "kind": "csv", "path": "x.csv", "columns": {"a b": "int"}}, "dataset 'd' field 'columns'"),
    ({"name": "bad name!", "kind": "csv", "path": "x.csv"}, "dataset 'bad name!' field 'name'"),
    ({"kind": "csv", "path": "x.csv"}, "datasets entry 0 field 'name'"),
    ({"name": "e", "kind": "csv", "path": "x.csv", "rows": 3}, "dataset 'e' field 'rows'"),
])
def test_it_names_the_entry_of_a_bad_config(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = tmp_path / "datasets.json"
    path.write_text(json.dumps({"datasets": [entry]}))
    with pytest.raises(CatalogError, match=message):
        Catalog.from_file(path)


def test_it_names_a_config_column_that_the_source_lacks(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    _, _, folder = sources
    catalog = Catalog.from_config({"datasets": [{"name": "p", "kind": "parquet", "path": "readings.parquet",
                                                 "time_column": "when"}]}, base_dir=folder)
    with pytest.raises(CatalogError, match=r"dataset 'p': column 'when' named in its config is not in"):
        catalog.check()


def test_it_refuses_duplicate_names_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "datasets.json"
    entry = {"name": "a", "kind": "csv", "path": "a.csv"}
    path.write_text(json.dumps({"datasets": [entry, entry]}))
    with pytest.raises(CatalogError, match="registered twice"):
        Catalog.from_file(path)
    path.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        Catalog.from_file(path)


def test_it_rereads_a_schema_when_the_file_changes(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "a.csv", index=False)
    catalog = Catalog.from_config({"datasets": [{"name": "a", "kind": "csv", "path": "a.csv"}]}, base_dir=tmp_path)
    assert catalog.check()[0].row_count == 2
    pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]}).to_csv(tmp_path / "a.csv", index=False)
    schema = catalog.check()[0]
    assert schema.row_count == 3 and schema.column_names == ["a", "b"]


def test_it_scores_rows_with_a_served_model_then_aggregates_its_outputs(
        sources: tuple[Catalog, pd.DataFrame, Path], tmp_path: Path) -> None:
    catalog, frame, _ = sources
    model = load_model(om.mlp(tmp_path / "mlp.onnx", features=2, outputs=3))
    calls: list[tuple[str, str | None]] = []

    def resolve(name: str, version: str | None) -> Any:
        calls.append((name, version))
        return model

    spec = {"dataset": "pq", "group_by": ["line"],
            "filters": [{"column": "s1", "op": "gt", "value": 0.0}],
            "score": {"model": "wear", "version": "2", "inputs": ["temperature", "vibration"],
                      "outputs": [{"output": "y", "column": "s1", "index": 1}]},
            "aggregates": [{"op": "count"}, {"op": "mean", "column": "s1"}, {"op": "max", "column": "s1"}]}
    result = run_query(spec, catalog=catalog, policy=POLICY, site_facts=SITE, scorer=model_scorer(resolve))
    assert result.status == "answered", result.reason
    assert calls and calls[0] == ("wear", "2")
    got = merge_results(spec, [result]).to_frame().set_index("line")

    usable = frame.dropna(subset=["temperature"])
    x = usable[["temperature", "vibration"]].to_numpy(dtype=np.float32)
    scores = om.mlp_expected(x, features=2, outputs=3)[:, 1]
    expected = pd.DataFrame({"line": usable["line"].to_numpy(), "s1": scores})
    expected = expected[expected.s1 > 0].groupby("line")["s1"].agg(["count", "mean", "max"])
    assert got["count"].to_dict() == expected["count"].to_dict()
    np.testing.assert_allclose(got["mean_s1"].to_numpy(), expected["mean"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["max_s1"].to_numpy(), expected["max"].to_numpy(), rtol=1e-5)


def test_it_reports_a_scoring_failure_naming_the_output(sources: tuple[Catalog, pd.DataFrame, Path],
                                                        tmp_path: Path) -> None:
    catalog, _, _ = sources
    model = load_model(om.mlp(tmp_path / "mlp.onnx", features=2, outputs=3))
    spec = {"dataset": "pq", "aggregates": [{"op": "mean", "column": "s"}],
            "score": {"model": "wear", "inputs": ["temperature", "vibration"],
                      "outputs": [{"output": "y", "column": "s"}]}}
    result = run_query(spec, catalog=catalog, policy=POLICY, site_facts=SITE,
                       scorer=model_scorer(lambda name, version: model))
    assert result.status == "error" and result.field == "score.outputs.0.output" and "index" in result.reason
    wrong_inputs = {**spec, "score": {**spec["score"], "inputs": ["temperature"]}}
    result = run_query(wrong_inputs, catalog=catalog, policy=POLICY, site_facts=SITE,
                       scorer=model_scorer(lambda name, version: model))
    assert result.status == "error" and result.field == "score.model" and "takes inputs" in result.reason
    assert run_query(spec, catalog=catalog, policy=POLICY, site_facts=SITE).status == "error"


def test_it_returns_rows_in_rows_mode_with_types_kept(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    catalog, frame, _ = sources
    policy = DataPolicy(datasets={"sql": DatasetRule(allow_rows=True)}, allow_rows=True)
    spec = {"dataset": "sql", "mode": "rows", "columns": ["ts", "machine", "parts", "defect"],
            "filters": [{"column": "parts", "op": "ge", "value": 18}], "order_by": [{"name": "ts", "desc": True}],
            "limit": 3}
    result = run_query(spec, catalog=catalog, policy=policy, site_facts=SITE)
    assert result.status == "answered" and result.rows is not None
    top = frame[frame.parts >= 18].sort_values("ts", ascending=False).head(3)
    assert result.rows.values == [[t.isoformat(), m, int(p), bool(d)] for t, m, p, d in
                                  zip(top.ts, top.machine, top.parts, top.defect, strict=True)]
    merged = merge_results(spec, [result])
    assert merged.columns == ["_site", "ts", "machine", "parts", "defect"]
    assert all(row[0] == "plant-osaka" for row in merged.rows)


def test_it_stops_at_a_deadline_that_has_passed(sources: tuple[Catalog, pd.DataFrame, Path]) -> None:
    import datetime as dt

    catalog, _, _ = sources
    result = run_query({**SPEC, "dataset": "pq"}, catalog=catalog, policy=POLICY, site_facts=SITE,
                       deadline=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert result.status == "error" and "deadline" in result.reason

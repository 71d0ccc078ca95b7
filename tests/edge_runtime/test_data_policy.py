"""Each rule of the data policy refuses or suppresses what it should, and names itself when it does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.audit import NodeAudit
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts, suppression_mask


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    folder = tmp_path_factory.mktemp("policy")
    rng = np.random.default_rng(7)
    n = 200
    pd.DataFrame({
        "line": rng.choice(["L1", "L2", "L3"], n),
        "machine": rng.integers(0, 4, n),
        "operator_id": rng.integers(1000, 1010, n),
        "ts": pd.date_range("2024-03-01", periods=n, freq="13min"),
        "temp": rng.normal(60, 4, n),
    }).to_parquet(folder / "readings.parquet")
    pd.DataFrame({"x": [1, 2]}).to_csv(folder / "other.csv", index=False)
    return Catalog.from_config({"datasets": [
        {"name": "readings", "kind": "parquet", "path": "readings.parquet", "time_column": "ts"},
        {"name": "hr", "kind": "csv", "path": "other.csv"},
    ]}, base_dir=folder)


CONNECTED = SiteFacts(site="plant-berlin", connectivity="connected")
ROWS_SPEC: dict[str, Any] = {"dataset": "readings", "mode": "rows", "columns": ["line", "temp"], "limit": 5}
AGG_SPEC: dict[str, Any] = {"dataset": "readings", "group_by": ["line"], "aggregates": [{"op": "count"}]}


def run(catalog: Catalog, spec: dict[str, Any], policy: DataPolicy, facts: SiteFacts = CONNECTED,
        audit: NodeAudit | None = None) -> QueryResult:
    return run_query(spec, catalog=catalog, policy=policy, site_facts=facts, audit=audit)


def assert_refused(result: QueryResult, rule: str) -> None:
    assert result.status == "refused", result
    assert result.rule == rule, result
    assert result.partials is None and result.rows is None


def test_it_refuses_by_default(catalog: Catalog) -> None:
    assert_refused(run(catalog, AGG_SPEC, DataPolicy()), "datasets")


def test_it_refuses_a_dataset_the_policy_does_not_list(catalog: Catalog) -> None:
    result = run(catalog, {"dataset": "hr", "aggregates": [{"op": "count"}]},
                 DataPolicy(datasets={"readings": DatasetRule()}))
    assert_refused(result, "datasets")
    assert result.field == "dataset"


@pytest.mark.parametrize(("spec", "field"), [
    ({**AGG_SPEC, "filters": [{"column": "operator_id", "op": "eq", "value": 1001}]}, "filters"),
    ({**AGG_SPEC, "group_by": ["operator_id"]}, "group_by"),
    ({**AGG_SPEC, "aggregates": [{"op": "max", "column": "operator_id"}]}, "aggregates"),
])
def test_it_refuses_columns_the_policy_does_not_allow(catalog: Catalog, spec: dict[str, Any], field: str) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule(columns=["line", "machine", "ts", "temp"])})
    result = run(catalog, spec, policy)
    assert_refused(result, "columns")
    assert result.field == field and "operator_id" in result.reason


def test_it_refuses_group_keys_the_policy_keeps_out_of_results(catalog: Catalog) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule(group_columns=["line"])})
    assert run(catalog, AGG_SPEC, policy).status == "answered"
    assert_refused(run(catalog, {**AGG_SPEC, "group_by": ["machine"]}, policy), "group_columns")


def test_it_refuses_aggregates_the_policy_does_not_allow(catalog: Catalog) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule()}, aggregates=["count", "mean"])
    spec = {**AGG_SPEC, "aggregates": [{"op": "mean", "column": "temp"}, {"op": "max", "column": "temp"}]}
    result = run(catalog, spec, policy)
    assert_refused(result, "aggregates")
    assert result.field == "aggregates.1.op"


def test_it_refuses_models_the_policy_does_not_allow(catalog: Catalog) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule()}, models=["vibration-anomaly"])
    spec = {**AGG_SPEC, "score": {"model": "face-id", "inputs": ["temp"], "outputs": [{"output": "y", "column": "s"}]}}
    assert_refused(run(catalog, spec, policy), "models")


ROWS_POLICY = DataPolicy(datasets={"readings": DatasetRule(allow_rows=True)}, allow_rows=True)


def test_it_returns_rows_only_where_the_policy_allows(catalog: Catalog) -> None:
    result = run(catalog, ROWS_SPEC, ROWS_POLICY)
    assert result.status == "answered" and result.rows is not None
    assert len(result.rows.values) == 5 and result.rows.truncated
    assert_refused(run(catalog, ROWS_SPEC, DataPolicy(datasets={"readings": DatasetRule(allow_rows=True)})), "rows")
    assert_refused(run(catalog, ROWS_SPEC, DataPolicy(datasets={"readings": DatasetRule()}, allow_rows=True)), "rows")


@pytest.mark.parametrize("facts", [SiteFacts(site="base-7", connectivity="air_gapped"),
                                   SiteFacts(site="clinic", sovereign=True),
                                   SiteFacts(site="clinic", sovereign=True, connectivity="intermittent")])
def test_it_never_releases_rows_at_a_sovereign_or_air_gapped_site(catalog: Catalog, facts: SiteFacts) -> None:
    result = run(catalog, ROWS_SPEC, ROWS_POLICY, facts)
    assert_refused(result, "rows.site")
    # Aggregates still work there.
    assert run(catalog, AGG_SPEC, ROWS_POLICY, facts).status == "answered"


@settings(max_examples=60, deadline=None)
@given(sovereign=st.booleans(), connectivity=st.sampled_from(["connected", "intermittent", "air_gapped"]),
       policy_rows=st.booleans(), dataset_rows=st.booleans(), columns=st.lists(
           st.sampled_from(["line", "machine", "temp", "ts"]), min_size=1, max_size=4, unique=True))
def test_it_releases_rows_only_when_every_rule_allows(catalog: Catalog, sovereign: bool, connectivity: Any,
                                                      policy_rows: bool, dataset_rows: bool,
                                                      columns: list[str]) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule(allow_rows=dataset_rows)}, allow_rows=policy_rows)
    facts = SiteFacts(site="s", sovereign=sovereign, connectivity=connectivity)
    result = run(catalog, {"dataset": "readings", "mode": "rows", "columns": columns, "limit": 3}, policy, facts)
    may = policy_rows and dataset_rows and not sovereign and connectivity != "air_gapped"
    assert (result.rows is not None) == may
    assert result.status == ("answered" if may else "refused")


def test_it_refuses_row_columns_outside_the_allowed_ones(catalog: Catalog) -> None:
    policy = DataPolicy(datasets={"readings": DatasetRule(allow_rows=True, row_columns=["line"])}, allow_rows=True)
    assert_refused(run(catalog, ROWS_SPEC, policy), "row_columns")


def test_it_refuses_results_larger_than_the_output_limits(catalog: Catalog) -> None:
    spec = {**AGG_SPEC, "group_by": ["line", "machine"], "time_bucket": {"column": "ts", "interval": "hour"}}
    big = run(catalog, spec, DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=1))
    assert big.status == "answered" and big.partials is not None
    cells = len(big.partials.rows) * 4
    assert_refused(run(catalog, spec, DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=1,
                                                 max_output_cells=cells - 1)), "max_output_cells")
    assert_refused(run(catalog, spec, DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=1,
                                                 max_output_bytes=200)), "max_output_bytes")
    assert_refused(run(catalog, ROWS_SPEC, ROWS_POLICY.model_copy(update={"max_output_cells": 9})),
                   "max_output_cells")


def test_it_suppresses_small_cells_and_withholds_a_count_that_would_reveal_one(catalog: Catalog) -> None:
    spec = {**AGG_SPEC, "filters": [{"column": "line", "op": "eq", "value": "L1"}], "group_by": ["machine"],
            "time_bucket": {"column": "ts", "interval": "day"}}
    policy = DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=10)
    result = run(catalog, spec, policy)
    assert result.status == "answered" and result.partials is not None
    assert all(n >= 10 for n in result.partials.rows)
    assert result.suppressed.cells > 0
    one_cell = run(catalog, {**AGG_SPEC, "filters": [{"column": "machine", "op": "eq", "value": 0},
                                                     {"column": "ts", "op": "lt", "value": "2024-03-01T01:00:00"}]},
                   policy)
    assert one_cell.partials is not None and one_cell.partials.rows == []
    assert one_cell.suppressed.cells == 1 and one_cell.suppressed.rows is None
    # Rows scanned is the dataset's size, not the filtered count (which would give the hidden cell away).
    assert one_cell.rows_scanned == 200


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), max_size=30), k=st.integers(1, 20))
def test_it_keeps_exactly_the_cells_of_at_least_k(sizes: list[int], k: int) -> None:
    keep, suppressed = suppression_mask(sizes, k)
    assert [s for s, kept in zip(sizes, keep, strict=True) if kept] == [s for s in sizes if s >= k]
    small = [s for s in sizes if s < k]
    assert suppressed.cells == len(small)
    assert suppressed.rows == (sum(small) if sum(small) >= k or not small else None)


def test_it_audits_each_query_and_decision(catalog: Catalog, tmp_path: Path) -> None:
    audit = NodeAudit(tmp_path / "audit.sqlite3")
    answered = run(catalog, AGG_SPEC, DataPolicy(datasets={"readings": DatasetRule()}), audit=audit)
    refused = run(catalog, AGG_SPEC, DataPolicy(), audit=audit)
    bad = run(catalog, {"dataset": "readings", "aggregates": [{"op": "count", "column": "nope"}]},
              DataPolicy(datasets={"readings": DatasetRule()}), audit=audit)
    events = audit.events_after(0)
    assert [e.action for e in events] == ["query.received", "query.answered", "query.received", "query.refused",
                                          "query.received", "query.refused"]
    assert events[1].seq == answered.audit_seq and events[1].detail["spec_digest"] == answered.spec_digest
    assert events[3].detail["rule"] == "datasets" and refused.audit_seq == events[3].seq
    assert events[5].detail["field"] == "aggregates.0.column" and bad.audit_seq == events[5].seq
    assert events[0].detail["spec"] == AGG_SPEC
    assert audit.verify() == (6, None)

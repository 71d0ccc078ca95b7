"""A Parquet file of many row groups is aggregated a chunk at a time and merged: the answer is the central one.

The same generated rows and specs as the federated merge properties
(``test_data_merge``), written as one site's file with row groups of a few
rows and a chunk size of a few rows, so every query runs through the chunked
path: per-chunk groups and states, groups matched by key values across
chunks, states combined by the merge formulas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.data import chunks
from edge_runtime.data.binding import bind
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.merge import merge_results
from edge_runtime.data.spec import parse_spec
from edge_runtime.policy.data import SiteFacts
from tests.edge_runtime.test_data_merge import (
    OPEN_POLICY,
    SCHEMA,
    assert_central,
    site_frame,
    site_rows,
    spec_strategy,
)


def write_chunked(folder: Path, rows: list[dict[str, Any]], row_group_size: int) -> Catalog:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "readings.parquet",
                   row_group_size=row_group_size)
    return Catalog.from_config({"datasets": [{"name": "readings", "kind": "parquet", "path": "readings.parquet",
                                              "time_column": "ts"}]}, base_dir=folder)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "CHUNK_ROWS", 5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(site_rows, min_size=1, max_size=3).map(lambda parts: [r for p in parts for r in p]),
       spec=spec_strategy, row_group_size=st.integers(1, 7))
def test_a_file_read_in_chunks_answers_what_pandas_computes_over_it(
        tmp_path_factory: pytest.TempPathFactory, small_chunks: None, rows: list[dict[str, Any]],
        spec: dict[str, Any], row_group_size: int) -> None:
    catalog = write_chunked(tmp_path_factory.mktemp("site"), rows, row_group_size)
    dataset = catalog.get("readings")
    assert dataset is not None
    plan = chunks.chunked_row_groups(dataset, bind(parse_spec(spec), dataset.schema()))
    if len(rows) > 2 * max(row_group_size, 5) and not any(a["op"] == "quantile" for a in spec["aggregates"]):
        assert plan is not None and len(plan) > 1  # the chunked path is the one under test
    result = run_query(spec, catalog=catalog, policy=OPEN_POLICY, site_facts=SiteFacts(site="one"))
    assert result.status == "answered", result.reason
    assert_central(merge_results(spec, [result]), site_frame(rows), spec)


def test_it_reads_in_chunks_only_what_it_can_merge(tmp_path: Path, small_chunks: None) -> None:
    rows = [{"line": "L1", "machine": i % 3, "ts": pd.Timestamp("2024-03-01") + pd.Timedelta(hours=i),
             "x": float(i), "c": i} for i in range(40)]
    dataset = write_chunked(tmp_path / "many", rows, 4).get("readings")
    single = write_chunked(tmp_path / "one", rows, 100).get("readings")
    assert dataset is not None and single is not None
    aggregate = {"dataset": "readings", "group_by": ["machine"], "aggregates": [{"op": "mean", "column": "x"}]}
    plan = chunks.chunked_row_groups(dataset, bind(parse_spec(aggregate), dataset.schema()))
    # Row groups of 4 rows gathered into chunks of at least 5.
    assert plan == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert chunks.chunked_row_groups(single, bind(parse_spec(aggregate), single.schema())) is None
    quantile = {**aggregate, "aggregates": [{"op": "quantile", "column": "x", "q": 0.5}]}
    assert chunks.chunked_row_groups(dataset, bind(parse_spec(quantile), dataset.schema())) is None
    listing = {"dataset": "readings", "mode": "rows", "columns": ["x"]}
    assert chunks.chunked_row_groups(dataset, bind(parse_spec(listing), dataset.schema())) is None

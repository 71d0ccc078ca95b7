"""The federated-query benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.query.run import main


def test_it_measures_the_engine_against_duckdb_and_a_federation(tmp_path: Path) -> None:
    report_path = tmp_path / "query.json"
    assert main(["--rows", "30000", "--repeat", "1", "--sites", "3", "--site-rows", "3000", "--workers", "2",
                 "--e2e-sites", "0", "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    [node] = report["node"]
    assert node["rows"] == 30000 and node["engine_s"] > 0 and node["duckdb_s"] > 0
    assert report["ratios"]["engine_over_duckdb_30000"] == node["engine_over_duckdb"]
    federation = report["federation"]
    assert federation["sites"] == 3 and federation["merged_groups"] > 0
    # The merged result was checked against DuckDB over the union of the sites' files.
    assert federation["check"]["groups_compared"] == federation["merged_groups"]
    assert federation["check"]["max_relative_difference"] < 1e-9

"""The rollout benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def test_it_plans_and_publishes_a_wave_against_the_load_baseline(tmp_path: Path) -> None:
    report_path = tmp_path / "rollout.json"
    db_name = os.environ.get("EDGEWISE_BENCH_DB_NAME", f"edgewise_bench_rollout_smoke_{os.getpid()}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.rollout", "--nodes", "60", "--sites", "6", "--wave", "5",
         "--db-name", db_name, "--output", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    measured = report["measure"]
    assert measured["nodes_loaded"] == 60
    # Site 3 of the six is in the jurisdiction the placement rule keeps the model out of.
    assert measured["excluded_nodes"] == 10 and measured["planned_nodes"] == 50
    assert measured["waves"][0] == 5 and measured["wave_published_nodes"] == 5
    assert measured["wave_carries_new_version"] is True
    assert report["ratios"]["plan_and_publish_over_load"] > 0
    assert "plan+publish / load" in result.stdout

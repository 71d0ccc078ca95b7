"""The telemetry benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def test_it_measures_telemetry_latency_against_an_echo_baseline(tmp_path: Path) -> None:
    report_path = tmp_path / "telemetry.json"
    db_name = os.environ.get("EDGEWISE_BENCH_DB_NAME", f"edgewise_bench_tsmoke_{os.getpid()}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.telemetry", "--nodes", "20", "--sites", "3", "--operators", "2",
         "--duration", "3", "--warmup", "1", "--workers", "1", "--db-name", db_name, "--output", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"

    report = json.loads(report_path.read_text())
    echo, live = report["phases"]["echo"], report["phases"]["telemetry"]
    assert echo["messages"] > 0 and live["messages"] > 0
    # Every message sent was acknowledged and committed, and every operator saw every measured one.
    assert live["points_acked"] == live["points_sent"] == report["server_check"]["points_committed"]
    assert live["operator_missing"] == [0, 0]
    assert report["server_check"]["points_lost"] == 0
    assert live["latency_ms"]["p99"] > 0 and report["ratios"]["telemetry_over_echo_p99"] > 0
    assert "telemetry p99 / echo p99" in result.stdout

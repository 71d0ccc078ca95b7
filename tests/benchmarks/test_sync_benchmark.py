"""The sync benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


@pytest.mark.parametrize("clients", [1, 2], ids=["one-load-generator", "two-load-generator-processes"])
def test_it_measures_sync_and_baseline_without_errors(tmp_path: Path, clients: int) -> None:
    report_path = tmp_path / "sync.json"
    # A database of its own, created and dropped by the benchmark.
    db_name = os.environ.get("EDGEWISE_BENCH_DB_NAME", f"edgewise_bench_smoke_{os.getpid()}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.sync", "--nodes", "20", "--concurrency", "8", "--duration", "3",
         "--warmup", "1", "--workers", "1", "--clients", str(clients), "--db-name", db_name,
         "--output", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"

    report = json.loads(report_path.read_text())
    for name in ("health", "sync"):
        phase = report["phases"][name]
        assert phase["throughput_rps"] > 0, phase
        assert phase["requests"] > 0, phase
        assert phase["errors_total"] == 0, phase
    for phase in report["setup_phases"].values():
        assert phase["requests"] == 20 and phase["errors_total"] == 0, phase
    # Every node verified its desired state once; steady-state syncs carried none.
    assert report["fleet"]["desired_states_received"] == 20
    assert report["fleet"]["desired_states_in_steady_state"] == 0
    assert report["fleet"]["steady_state_syncs"] >= report["phases"]["sync"]["requests"]
    assert report["phases"]["sync"]["concurrency"] == 8
    assert report["server_check"]["nodes_applied"] == 20
    assert report["ratios"]["sync_over_health_throughput"] > 0
    # Settled nodes sync briefly and are answered from Redis; PostgreSQL sees far fewer commits than syncs.
    assert report["quiet_share"] >= 0.9  # a node whose snapshot write timed out under load syncs in full once more
    assert report["postgresql_per_steady_sync"]["commits"] < 0.5
    assert report["ratios"]["sync_cpu_ms"] > 0 and report["ratios"]["health_cpu_ms"] > 0
    assert report["redis_cpu_ms_per_steady_sync"] > 0
    assert "sync/health throughput" in result.stdout

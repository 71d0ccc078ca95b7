"""The node audit ingest benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def test_it_measures_node_entries_ingested_against_plain_syncs_and_inserts(tmp_path: Path) -> None:
    report_path = tmp_path / "audit-nodes.json"
    # A database of its own, created and dropped by the benchmark.
    db_name = os.environ.get("EDGEWISE_BENCH_DB_NAME", f"edgewise_bench_audit_nodes_smoke_{os.getpid()}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.audit.nodes", "--nodes", "12", "--entries", "4", "--concurrency", "4",
         "--duration", "2", "--warmup", "1", "--workers", "1", "--db-name", db_name, "--output", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    for name in ("sync", "audit"):
        phase = report["phases"][name]
        assert phase["requests"] > 0 and phase["errors_total"] == 0, phase
    # Every audited sync carried its entries and came back cosigned (the benchmark's nodes check each answer).
    entries = report["entries"]
    assert entries["per_sync"] == 4 and entries["ingested"] >= 4 * report["phases"]["audit"]["requests"]
    assert report["ratios"]["audit_over_sync_throughput"] > 0 and report["ratios"]["ingest_over_plain_insert"] > 0
    assert "node entries ingested" in result.stdout

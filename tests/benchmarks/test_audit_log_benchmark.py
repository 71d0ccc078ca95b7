"""The audit log benchmark still runs end to end (tiny numbers), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def test_it_measures_writes_appends_and_verification_against_their_baselines(tmp_path: Path) -> None:
    report_path = tmp_path / "audit-log.json"
    db_name = os.environ.get("EDGEWISE_BENCH_DB_NAME", f"edgewise_bench_audit_log_smoke_{os.getpid()}")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.audit.log", "--threads", "1,2", "--seconds", "0.5", "--entries", "200",
         "--verify-entries", "500", "--db-name", db_name, "--output", str(report_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert [row["threads"] for row in report["writes"]["rows"]] == [1, 2]
    assert all(row["old_chain_per_s"] > 0 and row["merkle_log_per_s"] > 0 for row in report["writes"]["rows"])
    assert report["appends"]["entries"] == 200 and report["appends"]["append_over_plain"] > 0
    assert report["verify"]["entries"] >= 500 and report["verify"]["verify_over_read"] > 0
    assert "audited writes/s, 2 threads" in result.stdout

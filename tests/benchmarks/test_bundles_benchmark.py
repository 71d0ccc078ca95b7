"""The bundles benchmark still runs end to end (small models), so it cannot rot unnoticed. No database."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.process


def _bench(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    report_path = tmp_path / "bundles.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bundles", "--repeat", "1", "--dir", str(tmp_path),
         "--output", str(report_path), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    # Its scratch directory is gone: only the report is left.
    assert [p.name for p in tmp_path.iterdir()] == ["bundles.json"]
    return json.loads(report_path.read_text()), result.stdout


def _sane(measured: dict[str, Any], repeat: int = 1) -> None:
    assert measured["median_s"] > 0 and measured["mb_per_s"] > 0 and len(measured["runs_s"]) == repeat
    assert 0 < measured["peak_rss_mib"] < 1024


def test_it_times_export_and_import_against_sha256sum_and_tar_with_flat_memory(tmp_path: Path) -> None:
    report, stdout = _bench(tmp_path, "--model-mb", "64")
    assert report["model"]["bytes"] == 64 * 1024 * 1024 and report["model"]["parts"] == 0
    # The bundle holds the model, three node entries, their headers and the signed metadata: a little more.
    assert 64 * 1024 * 1024 < report["model"]["bundle_bytes"] < 65 * 1024 * 1024
    for phase, arms in (("export", ("arm", "arm_unhashed")), ("import", ("arm",))):
        for key in ("baseline", *arms):
            _sane(report[phase][key])
        for arm in arms:
            assert math.isfinite(report[phase]["ratios"][f"{arm}_over_baseline"])
            assert report[phase]["ratios"][f"{arm}_over_baseline"] > 0
            # The bundle streams: what the arm holds does not grow with a 64 MB model.
            assert 0 <= report[phase][arm]["growth_mib"] < 32
    checks = report["checks"]
    assert checks["imported_sha256_matches"] is True and checks["imported_members"] == 4
    memory = report["memory"]
    assert memory["small_model_mb"] == 16 and memory["flat"] is True
    target = report["target"]
    assert target["export_ratio"] == report["export"]["ratios"]["arm_over_baseline"]
    assert target["met"] == (target["export_within"] and target["import_within"] and target["memory_flat"])
    assert "bundle, sha unknown" in stdout and "target (bundle / sha256sum+tar <= 1.5" in stdout


def test_it_splits_the_bundle_and_the_baselines_tar_into_parts(tmp_path: Path) -> None:
    report, stdout = _bench(tmp_path, "--model-mb", "5", "--part-size", "2", "--json")
    assert json.loads(stdout)["model"] == report["model"]  # --json prints the report instead of the table
    # 5 MiB and a few KiB of headers and metadata, in parts of 2 MiB.
    assert report["model"]["parts"] == 3
    assert report["checks"]["imported_sha256_matches"] is True
    _sane(report["import"]["arm"])
    _sane(report["import"]["baseline"])

"""The bundles benchmark's report: medians, throughput, ratios against the baselines, memory, the verdict; its table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from benchmarks import cli
from benchmarks.bundles.measure import MIB, Run

TARGET_RATIO = 1.5
# Memory is flat when the RSS growth at the full model size exceeds that at a quarter of it by no more than this.
FLAT_SLACK_MIB = 16.0

WHAT = {
    "export": {
        "baseline": "sha256sum MODEL; tar -cf OUT MODEL; sync OUT",
        "strict_baseline": "openssl dgst -sha256 MODEL; tar -cf OUT MODEL; sync OUT",
        "arm": "write_bundle, the model's sha256 and size given (as sites/bundles.py): one pass, checked while copied",
        "arm_unhashed": "write_bundle, sha256 and size not given: the model is hashed first, then copied",
    },
    "import": {
        "baseline": "tar -xf OUT -C DIR; sha256sum DIR/MODEL; sync DIR/MODEL DIR",
        "strict_baseline": "tar -xf OUT -C DIR; openssl dgst -sha256 DIR/MODEL; sync DIR/MODEL DIR",
        "arm": "read_bundle (signature checked, every member hashed into staging); fsync, os.replace, fsync dir",
    },
}
LABELS = {"baseline": "sha256sum + tar", "strict_baseline": "openssl + tar", "arm": "bundle",
          "arm_unhashed": "bundle, sha unknown"}


def summary(runs: list[Run], size: int) -> dict[str, Any]:
    """Median seconds and MB/s (MB = MiB) of ``runs``, each run's seconds, the largest peak RSS and growth."""
    median = statistics.median(r.s for r in runs)
    growths = [r.growth_mib for r in runs if r.growth_mib is not None]
    return {
        "median_s": round(median, 4),
        "mb_per_s": round(size / MIB / median, 1),
        "runs_s": [round(r.s, 4) for r in runs],
        "process_median_s": round(statistics.median(r.process_s for r in runs), 4),
        "peak_rss_mib": round(max(r.peak_rss_mib for r in runs), 1),
        "growth_mib": round(max(growths), 1) if growths else None,
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else math.inf


def phase(name: str, runs: dict[str, list[Run]], size: int) -> dict[str, Any]:
    """One phase (export or import): each measured thing's summary and what it does, and the arms' ratios."""
    measured = {key: {"what": WHAT[name][key], **summary(rs, size)} for key, rs in runs.items()}
    ratios: dict[str, float] = {}
    for arm in (k for k in measured if k.startswith("arm")):
        for base in (k for k in measured if k.endswith("baseline")):
            ratios[f"{arm}_over_{base}"] = ratio(measured[arm]["median_s"], measured[base]["median_s"])
    return {**measured, "ratios": ratios}


def memory(full: dict[str, Any], small: dict[str, Any], model_mb: int, small_mb: int) -> dict[str, Any]:
    """RSS growth of the arms at the full model size and at a quarter of it; flat if they differ by little."""
    rows: dict[str, Any] = {"model_mb": model_mb, "small_model_mb": small_mb, "slack_mib": FLAT_SLACK_MIB}
    flat = True
    for name in ("export", "import"):
        grown, grown_small = full[name]["arm"]["growth_mib"], round(small[name]["growth_mib"], 1)
        rows[name] = {"growth_mib": grown, "small_growth_mib": grown_small,
                      "growth_over_model": round(grown / model_mb, 4)}
        flat = flat and grown <= grown_small + FLAT_SLACK_MIB
    rows["flat"] = flat
    return rows


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The target: export and import each within 1.5x of sha256sum + tar, and memory flat."""
    export = report["export"]["ratios"]["arm_over_baseline"]
    imported = report["import"]["ratios"]["arm_over_baseline"]
    within = {"export": export <= TARGET_RATIO, "import": imported <= TARGET_RATIO}
    return {"max_ratio": TARGET_RATIO, "export_ratio": export, "import_ratio": imported,
            "export_within": within["export"], "import_within": within["import"],
            "memory_flat": report["memory"]["flat"],
            "met": within["export"] and within["import"] and report["memory"]["flat"]}


def _cell(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("phase", "measured", "median s", "MB/s", "peak RSS MiB", "growth MiB",
                                    "/ sha256sum+tar", "/ openssl+tar")]
    for name in ("export", "import"):
        section = report[name]
        for key, label in LABELS.items():
            if key not in section:
                continue
            m, ratios = section[key], section["ratios"]
            rows.append((name, label, f"{m['median_s']:.3f}", f"{m['mb_per_s']:.0f}", _cell(m["peak_rss_mib"], 1),
                         _cell(m["growth_mib"], 1), _cell(ratios.get(f"{key}_over_baseline")),
                         _cell(ratios.get(f"{key}_over_strict_baseline"))))
    v, mem, model = report["target"], report["memory"], report["model"]
    return cli.table_text(
        rows,
        f"model {model['mb']} MB ({model['parts'] or 'no'} parts), median of {report['config']['repeat']}; "
        "growth = peak RSS while working minus RSS before",
        f"memory: growth at {mem['model_mb']} MB export {mem['export']['growth_mib']} / import "
        f"{mem['import']['growth_mib']} MiB, at {mem['small_model_mb']} MB export "
        f"{mem['export']['small_growth_mib']} / import {mem['import']['small_growth_mib']} MiB: "
        f"{'flat' if mem['flat'] else 'NOT flat'}",
        f"target (bundle / sha256sum+tar <= {v['max_ratio']}, memory flat): export {v['export_ratio']}, "
        f"import {v['import_ratio']}: {'met' if v['met'] else 'NOT met'}")

"""The node's model server against its baselines, all measured in one run.

For a small MLP and a small CNN (``models.py``):

(a) raw onnxruntime in this process at its best batch size (rows/s): one
    call at a time with the session options the server uses for one
    instance (``raw``) or onnxruntime's defaults (``raw_ort_defaults``), and
    a single-threaded session driven by one thread per CPU (``raw_threads``);
    the CNN target is held to the fastest of them in each cycle;
(b) the node's model server over HTTP at concurrency 1 and 32, with JSON
    bodies and with the binary tensor extension that standard clients send
    (``batched_json``, ``batched_binary``);
(c) a naive server on the same HTTP stack: one ``session.run`` per request
    (``naive_json``, ``naive_binary``);
(d) a no-op endpoint on the node's server: what HTTP itself costs (``noop``).

The servers run in their own processes (``server.py``); the load generator
runs in this one (``load.py``), so client and server never share a GIL.
Before measuring, every server's answers are checked against onnxruntime's,
one at a time and as 32 concurrent requests that the batcher stacks.

The arms that a ratio compares are measured interleaved, ``--slice``
seconds each per cycle, and each ratio is the median of its per-cycle values
(why: docs/decisions/0003-benchmark-arms-interleaved.md).

Usage::

    .venv/bin/python -m benchmarks.inference.run [--cycles 8] [--slice 0.5] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import onnxruntime as ort

from benchmarks.harness import machine, write_report
from benchmarks.inference import models as bench_models
from benchmarks.inference.arms import (
    BODIES,
    Arm,
    Server,
    check_answers,
    http_arm,
    interleave,
    payloads,
    raw_arm,
    raw_variants,
)
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS

# At concurrency 1 the batcher must add no waiting: its median latency may
# exceed the naive server's by this factor at most (measurement noise).
C1_LATENCY_TOLERANCE = 1.10

# (ratio, numerator arm, denominator arm, minimum): the targets at concurrency 32.
TARGETS: list[tuple[str, str, str, float]] = [
    ("cnn_binary_c32_over_raw", "cnn/batched_binary_c32", "cnn/raw_best_c32", 0.75),
    ("mlp_json_c32_over_noop", "mlp/batched_json_c32", "mlp/noop_c32", 0.50),
    ("mlp_binary_c32_over_noop", "mlp/batched_binary_c32", "mlp/noop_c32", 0.50),
    ("mlp_json_c32_over_naive", "mlp/batched_json_c32", "mlp/naive_json_c32", 1.30),
    ("mlp_binary_c32_over_naive", "mlp/batched_binary_c32", "mlp/naive_binary_c32", 1.30),
]
# Not targets of the issue; shown for what they tell.
INFO: list[tuple[str, str, str]] = [
    ("cnn_binary_c32_over_raw_ort_defaults", "cnn/batched_binary_c32", "cnn/raw_ort_defaults_c32"),
    ("cnn_json_c32_over_raw", "cnn/batched_json_c32", "cnn/raw_c32"),
    ("cnn_binary_c32_over_naive", "cnn/batched_binary_c32", "cnn/naive_binary_c32"),
    ("cnn_json_c32_over_naive", "cnn/batched_json_c32", "cnn/naive_json_c32"),
    ("mlp_json_c32_over_raw", "mlp/batched_json_c32", "mlp/raw_c32"),
]


# Report ------------------------------------------------------------------------

def group_of(arm: str) -> str:
    """``cnn/batched_json_c32`` -> ``cnn_c32``: the arms measured interleaved with it."""
    model, rest = arm.split("/")
    return f"{model}_{rest.rsplit('_', 1)[1]}"


RAW_BEST = "raw_best"


def _is_raw(arm: str) -> bool:
    return arm.split("/")[1].startswith("raw")


def _rate(cycle: dict[str, float], arm: str) -> float:
    """An arm's rate in one cycle; ``<model>/raw_best_c32`` is the best raw arm of that cycle."""
    if RAW_BEST not in arm:
        return cycle.get(arm, 0.0)
    model = arm.split("/")[0]
    return max((rate for name, rate in cycle.items() if name.startswith(f"{model}/") and _is_raw(name)), default=0.0)


def ratio_stats(per_cycle: list[dict[str, float]], numerator: str, denominator: str) -> dict[str, float]:
    values = [c[numerator] / _rate(c, denominator) for c in per_cycle if _rate(c, denominator)]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def cpu_ratio(arms: dict[str, Arm], numerator: str, denominator: str) -> float:
    """CPU per unit of the denominator over the numerator's: the throughput ratio when both saturate the CPU."""
    ours = arms[numerator].summary()["cpu_us_each"]
    if RAW_BEST in denominator:
        model = denominator.split("/")[0]
        raws = [a for name, a in arms.items() if name.startswith(f"{model}/") and _is_raw(name)]
        denominator = max(raws, key=lambda a: a.summary()["rate"]).name
    return round(arms[denominator].summary()["cpu_us_each"] / ours, 3) if ours else 0.0


def verdicts(per_cycle: dict[str, list[dict[str, float]]], arms: dict[str, Arm]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, num, den, minimum in TARGETS:
        if group_of(num) not in per_cycle:
            continue
        stats = ratio_stats(per_cycle[group_of(num)], num, den)
        rows.append({"kind": "target", "name": name, **stats, "cpu_ratio": cpu_ratio(arms, num, den),
                     "wanted": f">= {minimum}", "met": stats["median"] >= minimum})
    for model in sorted({k.split("/")[0] for k in arms}):
        for body in BODIES:
            ours, naive = arms.get(f"{model}/batched_{body}_c1"), arms.get(f"{model}/naive_{body}_c1")
            if ours is None or naive is None:
                continue
            p50 = statistics.median(ours.latencies) / statistics.median(naive.latencies)
            rows.append({"kind": "target", "name": f"{model}_{body}_c1_p50_over_naive", "median": round(p50, 3),
                         "min": None, "max": None, "cpu_ratio": None, "wanted": f"<= {C1_LATENCY_TOLERANCE}",
                         "met": p50 <= C1_LATENCY_TOLERANCE})
    for name, num, den in INFO:
        if group_of(num) in per_cycle:
            rows.append({"kind": "info", "name": name, **ratio_stats(per_cycle[group_of(num)], num, den),
                         "cpu_ratio": cpu_ratio(arms, num, den), "wanted": "", "met": None})
    return rows


def print_report(arms: dict[str, Arm], raws: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    print(f"\n{'arm':28} {'rate':>10} {'unit':6} {'slices min-max':>17} {'cpu us':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'client cpu':>10} {'server cpu':>10} {'loop us':>8}")
    for name, arm in arms.items():
        s = arm.summary()
        lat = s.get("latency_ms", {})
        if lat:
            extra = (f"{lat['p50']:>8.3f} {lat['p99']:>8.3f} {s['client_cpu']:>10.2f} {s['server_cpu']:>10.2f} "
                     f"{s['loop_cpu_us_each']:>8.1f}")
        else:
            extra = f"  batch {raws[name]['best_batch']}; {raws[name]['batch1_call_us']} us a call at batch 1"
        print(f"{name:28} {s['rate']:>10.0f} {s['unit']:6} {s['slice_min']:>8.0f}-{s['slice_max']:<8.0f} "
              f"{s['cpu_us_each']:>7.1f} {extra}")
    print(f"\n{'':6} {'ratio':38} {'median':>7} {'cycles min-max':>14} {'cpu ratio':>9} {'wanted':>8}  verdict")
    for row in rows:
        spread = f"{row['min']:.2f}-{row['max']:.2f}" if row["min"] is not None else ""
        cpu = f"{row['cpu_ratio']:.3f}" if row["cpu_ratio"] is not None else ""
        verdict = "" if row["met"] is None else ("met" if row["met"] else "NOT MET")
        print(f"{row['kind']:6} {row['name']:38} {row['median']:>7.3f} {spread:>14} {cpu:>9} {row['wanted']:>8}  "
              f"{verdict}")
    print("\nmedian: of the per-cycle throughput ratios (the verdict); cpu ratio: CPU time per request or row of\n"
          "the denominator over the numerator's, client and server together, which the throughput ratio\n"
          "approaches when both saturate the machine and moves far less with others' load.")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=8, help="cycles through every arm of a group")
    parser.add_argument("--slice", type=float, default=0.5, help="measured seconds of one arm per cycle")
    parser.add_argument("--warmup", type=float, default=0.15, help="warm-up seconds before each HTTP slice")
    parser.add_argument("--scan-seconds", type=float, default=0.2,
                        help="seconds per batch size when looking for raw onnxruntime's best batch")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--inline-below-ms", type=float, default=DEFAULT_INLINE_BELOW_MS,
                        help="the batched server runs batches cheaper than this on its event loop")
    parser.add_argument("--processes", type=int, default=0,
                        help="serving processes of both servers (default 0: as many as the node would choose)")
    parser.add_argument("--output", default="")
    return parser, parser.parse_args()


def measure_model(args: argparse.Namespace, name: str, model: bench_models.BenchModel, servers: dict[str, Server],
                  arms: dict[str, Arm], raws: dict[str, dict[str, Any]],
                  per_cycle: dict[str, list[dict[str, float]]]) -> None:
    """Every arm of ``model`` at concurrency 1 and 32, each group interleaved; fills the three dicts."""
    p = payloads(name, model.x)
    for conc in (1, 32):
        group: list[Arm] = []
        if conc == 32:
            for key, options, threads in raw_variants():
                arm, raws[f"{name}/{key}_c32"] = raw_arm(f"{name}/{key}_c32", model.path, model.x, options,
                                                         args.scan_seconds, threads)
                group.append(arm)
        group.append(http_arm(f"{name}/noop_c{conc}", servers["batched"], p["noop"], conc, args.warmup))
        for body in BODIES:
            for mode in ("batched", "naive"):
                group.append(http_arm(f"{name}/{mode}_{body}_c{conc}", servers[mode], p[body], conc,
                                      args.warmup))
        load_before = os.getloadavg()[0]
        per_cycle[f"{name}_c{conc}"] = interleave(group, args.cycles, args.slice)
        arms.update({arm.name: arm for arm in group})
        print(f"  {name} c={conc}: {len(group)} arms x {args.cycles} cycles, load average "
              f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)


def main() -> int:
    parser, args = parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="edgewise-inference-bench-"))
    servers: dict[str, Server] = {}
    try:
        built = bench_models.build(model_dir)
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        if not wanted or any(m not in built for m in wanted):
            parser.error(f"--models: choose from {', '.join(built)}")
        report: dict[str, Any] = {"machine": machine(), "settings": vars(args), "checks": {}}
        for mode in ("batched", "naive"):
            servers[mode] = Server(mode, model_dir, args.max_batch_size, args.inline_below_ms, args.processes)
            report.setdefault("servers", {})[mode] = {"processes": servers[mode].processes}
        for name in wanted:
            reference = ort.InferenceSession(str(built[name].path), providers=["CPUExecutionProvider"])
            for mode, server in servers.items():
                report["checks"][f"{mode}_{name}_answers_checked"] = check_answers(server, built[name], reference)
        print(f"answers checked against onnxruntime: {report['checks']}", flush=True)
        arms: dict[str, Arm] = {}
        raws: dict[str, dict[str, Any]] = {}
        per_cycle: dict[str, list[dict[str, float]]] = {}
        for name in wanted:
            measure_model(args, name, built[name], servers, arms, raws, per_cycle)
        rows = verdicts(per_cycle, arms)
        report.update({"arms": {n: {**a.summary(), **raws.get(n, {})} for n, a in arms.items()},
                       "cycles": per_cycle, "verdicts": rows,
                       "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]})
        print_report(arms, raws, rows)
        print(f"\nload average at start {report['machine']['loadavg_at_start']}, at end {report['loadavg_at_end']}; "
              f"{args.cycles} cycles of {args.slice:g} s per arm")
        print(f"written to {write_report('inference', report, args.output)}")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

The machine may be shared, and what the others on it do changes by the
second. So the arms that a ratio compares are measured interleaved: each
cycle runs every arm of a (model, concurrency) once for ``--slice`` seconds,
back to back, starting with a different arm each cycle; an arm's figure
pools its slices, and each ratio is computed per cycle, reported as the
median over the cycles with its range, and checked against its target.
Usage::

    .venv/bin/python -m benchmarks.inference.run [--cycles 8] [--slice 0.5] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from benchmarks.harness import REPO, free_port, machine, write_report
from benchmarks.inference import models as bench_models
from benchmarks.inference.load import closed_loop, request_bytes
from benchmarks.loadgen import latency_summary_ms
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS
from edge_runtime.serving.loader import session_options, usable_cpus

RAW_BATCHES = (1, 4, 8, 16, 32, 64)
BODIES = ("json", "binary")
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


class Server:
    def __init__(self, mode: str, model_dir: Path, max_batch_size: int, inline_below_ms: float,
                 processes: int) -> None:
        self.mode = mode
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.inference.server", mode, str(model_dir), str(self.port),
             str(max_batch_size), str(inline_below_ms), str(processes)],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self.stop()
            raise RuntimeError(f"the {mode} server did not start")
        self.processes = int(ready[1])
        self.pids = [self.proc.pid, *children(self.proc.pid)]
        if len(self.pids) != self.processes:
            self.stop()
            raise RuntimeError(f"the {mode} server runs {len(self.pids)} processes, not {self.processes}")
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds so far of all its processes, and of their main threads (the event loops).

        From schedstat, in nanoseconds: /proc's stat counts clock ticks of
        10 ms, too coarse for slices of a fraction of a second.
        """
        total = loop = 0.0
        for pid in self.pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    ran = int((task / "schedstat").read_text().split()[0]) / 1e9
                except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
                    continue
                total += ran
                if task.name == str(pid):
                    loop += ran
        return total, loop

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its serving workers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def payloads(model: str, x: np.ndarray) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """(path, body, headers) of one request per body kind, as standard OIP clients send them."""
    path = f"/v2/models/{model}/infer"
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    js = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    return {
        "json": (path, js, {"Content-Type": "application/json"}),
        "binary": (path, header + x.astype("<f4").tobytes(),
                   {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}),
        # The no-op endpoint reads the binary request's body, the smallest
        # one the protocol allows for this input: the floor of HTTP alone.
        "noop": ("/noop", header + x.astype("<f4").tobytes(), {"Content-Type": "application/octet-stream"}),
    }


def decode(response: httpx.Response) -> np.ndarray:
    if response.status_code != 200:
        raise AssertionError(f"{response.status_code} {response.text[:300]}")
    length = response.headers.get("inference-header-content-length")
    if length is None:
        out = response.json()["outputs"][0]
        return np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    head = json.loads(response.content[:int(length)])
    out = head["outputs"][0]
    return np.frombuffer(response.content[int(length):], dtype="<f4").reshape(out["shape"])


def check_answers(server: Server, model: bench_models.BenchModel, session: ort.InferenceSession) -> int:
    """Every answer equals onnxruntime's for its own input, alone and in concurrent batches; the count checked."""
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=model.x.shape).astype(np.float32) for _ in range(32)]
    expected = [session.run(None, {"x": x})[0] for x in inputs]

    def one(i: int, client: httpx.Client) -> None:
        path, body, headers = payloads(model.name, inputs[i])[BODIES[i % 2]]
        got = decode(client.post(path, content=body, headers=headers))
        np.testing.assert_allclose(got, expected[i], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{server.mode} server, {model.name}, request {i}")

    with httpx.Client(base_url=server.url, timeout=60) as client:
        one(0, client)
        one(1, client)
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(len(inputs))]
    try:
        with ThreadPoolExecutor(len(inputs)) as pool:
            list(pool.map(lambda i: one(i, clients[i]), range(len(inputs))))
    finally:
        for c in clients:
            c.close()
    return len(inputs) + 2


# Arms ------------------------------------------------------------------------

@dataclass
class Arm:
    """One thing measured: slices of it are run in turn with the other arms of its group."""

    name: str
    # Runs one slice of that many seconds: (completed, latencies_s, client_cpu_s, server_cpu_s, loop_cpu_s).
    run_slice: Callable[[float], tuple[int, list[float], float, float, float]]
    unit: str = "req/s"
    rates: list[float] = field(default_factory=list)  # of each slice
    completed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    loop_cpu: float = 0.0

    def measure(self, seconds: float) -> float:
        done, latencies, client_cpu, server_cpu, loop_cpu = self.run_slice(seconds)
        self.completed += done
        self.seconds += seconds
        self.latencies += latencies
        self.client_cpu += client_cpu
        self.server_cpu += server_cpu
        self.loop_cpu += loop_cpu
        rate = done / seconds
        self.rates.append(rate)
        return rate

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rate": round(self.completed / self.seconds, 1), "unit": self.unit,
                               "slices": len(self.rates), "slice_min": round(min(self.rates), 1),
                               "slice_max": round(max(self.rates), 1)}
        if self.latencies:
            out["latency_ms"] = latency_summary_ms(self.latencies)
        if self.unit == "req/s":
            out["client_cpu"] = round(self.client_cpu / self.seconds, 3)
            out["server_cpu"] = round(self.server_cpu / self.seconds, 3)
            # The server's event loop thread alone: HTTP, parsing, batching, answers (and inline batches).
            out["loop_cpu_us_each"] = round(self.loop_cpu / max(self.completed, 1) * 1e6, 1)
        # CPU time (all threads, both processes) per request or row: how much
        # work one costs, which moves far less than throughput when others
        # share the machine.
        out["cpu_us_each"] = round((self.client_cpu + self.server_cpu) / max(self.completed, 1) * 1e6, 1)
        return out


def http_arm(name: str, server: Server, payload: tuple[str, bytes, dict[str, str]], concurrency: int,
             warmup: float) -> Arm:
    raw = request_bytes(*payload)

    def run_slice(seconds: float) -> tuple[int, list[float], float, float, float]:
        marks: list[tuple[float, float]] = []
        result = closed_loop(server.port, raw, concurrency=concurrency, warmup=warmup, seconds=seconds,
                             on_window=lambda: marks.append(server.cpu_seconds()))
        if result.errors or not result.requests:
            raise RuntimeError(f"{name}: {result.errors} errors, {result.requests} answers; "
                               f"first error: {result.first_error}")
        (total0, loop0), (total1, loop1) = marks
        return result.requests, result.latencies_s, result.client_cpu * seconds, total1 - total0, loop1 - loop0

    return Arm(name, run_slice)


def _rows_per_second(session: ort.InferenceSession, x: np.ndarray, threads: int, seconds: float
                     ) -> tuple[int, float, float]:
    """Rows done by ``threads`` threads each looping ``session.run`` on ``x`` for ``seconds``, elapsed, CPU."""
    done = [0] * threads
    started, cpu = time.perf_counter(), time.process_time()
    end = started + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < end:
            session.run(None, {"x": x})
            done[i] += len(x)

    if threads == 1:
        loop(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(loop, range(threads)))
    return sum(done), time.perf_counter() - started, time.process_time() - cpu


def best_batch(session: ort.InferenceSession, x1: np.ndarray, seconds: float, threads: int = 1
               ) -> tuple[int, dict[str, int]]:
    """The batch size at which bare ``session.run`` loops give most rows/s (best of two passes)."""
    rates: dict[str, int] = {}
    for _ in range(2):
        for batch in RAW_BATCHES:
            x = np.repeat(x1, batch, axis=0)
            session.run(None, {"x": x})
            rows, elapsed, _cpu = _rows_per_second(session, x, threads, seconds)
            rates[str(batch)] = max(rates.get(str(batch), 0), round(rows / elapsed))
    best = max(rates, key=lambda b: rates[b])
    return int(best), rates


def raw_arm(name: str, path: Path, x1: np.ndarray, options: ort.SessionOptions, scan_seconds: float,
            threads: int = 1) -> tuple[Arm, dict[str, Any]]:
    """``threads`` threads each running one session's ``run`` in a loop, at the best batch size for that."""
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    batch, rates = best_batch(session, x1, scan_seconds, threads)
    x = np.repeat(x1, batch, axis=0)
    one = x1.copy()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < scan_seconds:
        session.run(None, {"x": one})
        calls += 1
    call_us = (time.perf_counter() - started) / calls * 1e6

    def run_slice(seconds: float) -> tuple[int, list[float], float, float, float]:
        rows, elapsed, cpu = _rows_per_second(session, x, threads, seconds)
        # onnxruntime's threads are this process's: its CPU time is what the rows cost.
        scale = seconds / elapsed
        return round(rows * scale), [], cpu * scale, 0.0, 0.0

    return Arm(name, run_slice, unit="rows/s"), {"best_batch": batch, "threads": threads, "scan_rows_per_s": rates,
                                                  "batch1_call_us": round(call_us)}


def raw_variants() -> list[tuple[str, ort.SessionOptions, int]]:
    """(arm, session options, threads): the ways to drive raw onnxruntime that the baseline takes the best of."""
    cpus = usable_cpus()
    variants = [("raw", session_options(), 1), ("raw_ort_defaults", ort.SessionOptions(), 1)]
    if cpus > 1:
        variants.append(("raw_threads", session_options(1), cpus))
    return variants


def interleave(arms: list[Arm], cycles: int, seconds: float) -> list[dict[str, float]]:
    """Every arm once per cycle, back to back, rotating which goes first; each cycle's rates."""
    per_cycle: list[dict[str, float]] = []
    for cycle in range(cycles):
        start = cycle % len(arms)
        rates: dict[str, float] = {}
        for arm in arms[start:] + arms[:start]:
            rates[arm.name] = arm.measure(seconds)
        per_cycle.append(rates)
    return per_cycle


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


def main() -> int:
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
    args = parser.parse_args()
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
            model = built[name]
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

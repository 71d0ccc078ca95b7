"""What the inference benchmark measures: the servers it starts, and its arms (HTTP and raw onnxruntime).

Each server runs in its own process (``server.py``) and is stopped with
SIGTERM (SIGKILL after 10 s); its CPU time is read from /proc, per thread.
An arm runs one slice at a time, so that the arms of a group can be
interleaved; every server's answers are checked against onnxruntime's
before any is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from benchmarks.harness import REPO, free_port
from benchmarks.inference import models as bench_models
from benchmarks.inference.load import closed_loop, request_bytes
from benchmarks.loadgen import latency_summary_ms
from edge_runtime.serving.loader import session_options, usable_cpus

RAW_BATCHES = (1, 4, 8, 16, 32, 64)
BODIES = ("json", "binary")


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

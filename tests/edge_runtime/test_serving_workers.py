"""Serving one node's models from several processes on one port: same versions, one /metrics, lifetimes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_runtime.serving.metrics import Metrics, read_series
from edge_runtime.serving.server import ServerError
from edge_runtime.serving.workers import WorkerPool, cpu_share, resolve_processes
from tests.edge_runtime import onnx_models as om

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
X = [[1.0, 2.0, 3.0, 4.0]]
REQUEST = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]}


@pytest.fixture()
def server() -> Iterator[om.ServerUnderTest]:
    srv = om.ServerUnderTest(processes=2)
    yield srv
    srv.close()


def pool_of(server: om.ServerUnderTest) -> WorkerPool:
    pool = server.handle.pool
    assert pool is not None
    return pool


def fresh_answer(url: str, path: str = "/v2/models/m/infer") -> tuple[int, dict[str, object]]:
    """One request on a connection of its own (the kernel picks the process per connection)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post(path, json=REQUEST)
        return response.status_code, response.json()


def test_every_process_serves_the_same_versions_and_metrics_add_up(server: om.ServerUnderTest,
                                                                  tmp_path: Path) -> None:
    pool = pool_of(server)
    # Nothing serves yet: no worker process is started for nothing.
    time.sleep(0.5)
    assert pool.workers[0].process is None

    assert server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0)).state == "serving"
    server.thread.run(pool.wait_serving())
    answers = [fresh_answer(server.url) for _ in range(40)]
    assert all(status == 200 and body["model_version"] == "1" and body["outputs"][0]["data"][0] == 2.0  # type: ignore[index]
               for status, body in answers), answers

    # Both processes took some of the 40 connections (the kernel hashes each one).
    server.thread.run(pool.refresh_metrics())
    own = server.registry.metrics.export()
    peer = server.registry.metrics.peers[1]
    assert own[0][2][0] > 0 and peer[0][2][0] > 0, (own, peer)
    assert own[0][2][0] + peer[0][2][0] == 40

    # Whichever process a scrape reaches, it counts the whole node.
    for _ in range(6):
        with httpx.Client(base_url=server.url, timeout=30) as client:
            page = client.get("/metrics").text
        assert server.metric(page, "edgewise_inference_requests_total", model="m", version="1") == 40
        assert server.metric(page, "edgewise_inference_request_duration_seconds_count", model="m", version="1") == 40

    # A new version: once the load returns, every process answers with it.
    assert server.load("m", "2", om.add_constant(tmp_path / "v2.onnx", 10.0)).state == "serving"
    answers = [fresh_answer(server.url) for _ in range(30)]
    assert {(body["model_version"], body["outputs"][0]["data"][0]) for _, body in answers} == {("2", 11.0)}  # type: ignore[index]

    # An unload reaches every process too.
    server.thread.run(server.registry.unload("m"))
    assert {fresh_answer(server.url)[0] for _ in range(30)} == {404}


def test_a_swap_under_load_fails_no_request_in_any_process(server: om.ServerUnderTest, tmp_path: Path) -> None:
    pool = pool_of(server)
    assert server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0)).state == "serving"
    server.thread.run(pool.wait_serving())
    # A new connection every 5 requests, so that both processes keep getting some.
    load = om.Hammer(server.url, "/v2/models/m/infer", REQUEST, offset=X[0][0], per_connection=5)
    try:
        time.sleep(0.5)
        assert server.load("m", "2", om.add_constant(tmp_path / "v2.onnx", 2.0)).state == "serving"
        returned = time.monotonic()
        time.sleep(0.5)
    finally:
        load.join()
    assert not load.failures, load.failures[:3]
    # Every answer is one version's own; a request sent once the load returned gets the new one.
    assert set(load.seen) <= {("1", 1.0), ("2", 2.0)}
    after = {(version, value) for at, version, value in load.answers if at > returned}
    assert after == {("2", 2.0)}


def test_a_worker_that_dies_is_started_again_and_counters_never_go_back(server: om.ServerUnderTest,
                                                                        tmp_path: Path) -> None:
    pool = pool_of(server)
    assert server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0)).state == "serving"
    server.thread.run(pool.wait_serving())
    for _ in range(30):
        assert fresh_answer(server.url)[0] == 200
    server.thread.run(pool.refresh_metrics())
    worker = pool.workers[0]
    assert worker.process is not None
    first_pid = worker.process.pid
    os.kill(first_pid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (pool.serving < 1 or worker.process is None
                                           or worker.process.pid == first_pid):
        time.sleep(0.05)
    assert pool.serving == 1 and worker.process is not None and worker.process.pid != first_pid
    # The new worker loaded what serves before it listened: every connection gets an answer.
    assert {fresh_answer(server.url)[0] for _ in range(30)} == {200}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        page = client.get("/metrics").text
    # The dead worker's requests still count (those it served after the last refresh aside: none here).
    assert server.metric(page, "edgewise_inference_requests_total", model="m", version="1") == 60


def start_serve(model_dir: Path, port: int, processes: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", "serve", "--model-dir", str(model_dir), "--port", str(port),
         "--serving-processes", str(processes)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 60) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting {prefix!r}: {lines}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def standalone(model_dir: Path, processes: int) -> Iterator[tuple[subprocess.Popen[str], int, list[int]]]:
    """``edge-runtime serve`` with ``processes``, once every one is up: (process, port, worker pids)."""
    om.mlp(model_dir / "classifier.onnx")
    port = free_port()
    proc = start_serve(model_dir, port, processes)
    try:
        read_until(proc, f"all {processes} serving processes are up")
        workers = children(proc.pid)
        assert len(workers) == processes - 1
        yield proc, port, workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_standalone_workers_end_with_the_first_process_even_one_killed_outright(tmp_path: Path) -> None:
    with standalone(tmp_path, 3) as (proc, port, workers):
        x = np.array([[1, 2, 3, 4]], dtype=np.float32)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]}
        for _ in range(12):
            out = httpx.post(f"http://127.0.0.1:{port}/v2/models/classifier/infer", json=body, timeout=30).json()
            np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(1, 3), om.mlp_expected(x),
                                       rtol=1e-5)
        # A second server cannot take the port, even though these sockets share it among themselves.
        other = start_serve(tmp_path, port, 2)
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out, out

        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(w) for w in workers):
            time.sleep(0.05)
        assert not any(alive(w) for w in workers)


def test_sigterm_stops_every_worker_and_the_server_exits_cleanly(tmp_path: Path) -> None:
    with standalone(tmp_path, 2) as (proc, _, workers):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not any(alive(w) for w in workers)


def test_the_cli_names_a_bad_process_count() -> None:
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "serve", "--model-dir", ".",
                             "--serving-processes", "many"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "serving processes is a whole number, not 'many'" in result.stderr
    with pytest.raises(ValueError, match="must not be negative"):
        resolve_processes(-1)
    assert resolve_processes(3) == 3


def test_each_process_plans_for_its_share_of_the_cpus() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert cpu_share(1) == 0  # one process: every usable CPU
    assert cpu_share(2) == max(1, cpus // 2)
    assert cpu_share(cpus * 2) == 1


def test_a_port_held_by_another_program_is_refused_before_any_worker_starts() -> None:
    from edge_runtime.serving import ModelRegistry, run_server

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        thread = om.LoopThread()
        registry = ModelRegistry()
        try:
            with pytest.raises(ServerError, match=f"cannot listen on 127.0.0.1:{port}"):
                thread.run(run_server(registry, "127.0.0.1", port, processes=2))
        finally:
            thread.run(registry.close())
            thread.close()


def test_peer_figures_add_up_and_an_ended_peer_keeps_its_counts() -> None:
    metrics = Metrics()
    own = metrics.of("m", "1")
    own.requests, own.errors = 3, 1
    own.latency.observe(0.002)
    peer = Metrics()
    theirs = peer.of("m", "1")
    theirs.requests = 5
    theirs.latency.observe(0.002)
    theirs.latency.observe(0.2)
    peer.of("m", "2").requests = 7
    metrics.set_peer(1, peer.export())

    assert metrics.snapshot("m", "1") is not None
    requests, errors, _, counts, total = metrics.snapshot("m", "1")  # type: ignore[misc]
    assert (requests, errors, sum(counts)) == (8, 1, 3) and total == pytest.approx(0.204)
    assert {(r.model, r.version, r.requests) for r in read_series(metrics)} == {("m", "1", 8), ("m", "2", 7)}
    assert 'edgewise_inference_requests_total{model="m",version="2"} 7' in metrics.render()

    metrics.retire_peer(1)
    own.requests += 1
    assert metrics.snapshot("m", "1")[0] == 9  # type: ignore[index]
    assert metrics.snapshot("m", "2")[0] == 7  # type: ignore[index]
    # A worker started again counts from zero; the sum goes on from what the ended one left.
    metrics.set_peer(1, [["m", "2", [2, 0, 2, 1, 0, [0] * 15, 0.0, [0] * 12, 0.0]]])
    assert metrics.snapshot("m", "2")[0] == 9  # type: ignore[index]


def test_a_worker_refuses_an_artifact_changed_on_disk_and_the_node_keeps_serving(server: om.ServerUnderTest,
                                                                                  tmp_path: Path) -> None:
    import hashlib

    path = om.add_constant(tmp_path / "v1.onnx", 1.0)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    pool = pool_of(server)
    assert server.load("m", "1", path, sha256=sha).state == "serving"
    server.thread.run(pool.wait_serving())
    # The file changes after the first process checked and loaded it; then the worker has to load it again.
    om.add_constant(path, 99.0)
    worker = pool.workers[0]
    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pool.serving:
        time.sleep(0.05)
    time.sleep(2.5)  # the restart comes after a second, and fails on the changed file
    assert pool.serving == 0
    # Every connection reaches the first process, which serves what it checked.
    answers = [fresh_answer(server.url) for _ in range(20)]
    assert {(status, body["outputs"][0]["data"][0]) for status, body in answers} == {(200, 2.0)}  # type: ignore[index]


def test_an_app_class_workers_cannot_import_is_refused_before_listening() -> None:
    from edge_runtime.serving import ModelRegistry, OIPApp, run_server

    local = type("Local", (OIPApp,), {"__module__": "__main__"})
    thread = om.LoopThread()
    registry = ModelRegistry()
    port = free_port()
    try:
        with pytest.raises(ValueError, match="workers import the app class by module name"):
            thread.run(run_server(registry, "127.0.0.1", port, app=local(registry), processes=2))
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing was left listening
    finally:
        thread.run(registry.close())
        thread.close()

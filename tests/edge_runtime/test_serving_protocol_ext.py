"""The protocol extensions Triton's and KServe's clients read: health bodies, readiness with reasons, the model
repository (index, load, unload) under explicit model control, statistics, model configuration, and answers that
a strict JSON parser reads. Real HTTP on loopback, real onnxruntime, tritonclient where it has a call for it."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from edge_runtime.serving.metrics import Metrics
from tests.edge_runtime import onnx_models as om

X = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32)


def strict_json(content: bytes) -> Any:
    """JSON as a strict parser reads it: a bare NaN or Infinity token is an error."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(content, parse_constant=refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[om.ServerUnderTest]:
    """Served with explicit model control: mlp, add, fixed, and broken (its load failed)."""
    srv = om.ServerUnderTest(model_control="explicit")
    assert srv.load("mlp", "1", om.mlp(models / "mlp.onnx")).state == "serving"
    assert srv.load("add", "1", om.add_constant(models / "add.onnx", 0.5)).state == "serving"
    assert srv.load("fixed", "1", om.fixed_batch(models / "fixed.onnx")).state == "serving"
    assert srv.load("broken", "1", om.fails_smoke_test(models / "broken.onnx")).state == "failed"
    yield srv
    srv.close()


@pytest.fixture()
def client(server: om.ServerUnderTest) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


def infer_mlp(client: triton.InferenceServerClient, x: np.ndarray = X, model: str = "mlp") -> np.ndarray:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    out = result.as_numpy("y")
    assert out is not None
    return out


# health and readiness -------------------------------------------------------------------------------


def test_it_answers_health_with_json_bodies(server: om.ServerUnderTest, client: triton.InferenceServerClient) -> None:
    live = httpx.get(f"{server.url}/v2/health/live")
    ready = httpx.get(f"{server.url}/v2/health/ready")
    assert (live.status_code, strict_json(live.content)) == (200, {"live": True})
    assert (ready.status_code, strict_json(ready.content)) == (200, {"ready": True})
    assert live.headers["content-type"] == "application/json"
    assert client.is_server_live() and client.is_server_ready()


def test_it_answers_not_live_and_not_ready_with_400_and_false() -> None:
    srv = om.ServerUnderTest()
    try:
        # What stopping the server does first: it stops being live, so stops being ready.
        srv.handle.app.live = False
        for kind in ("live", "ready"):
            response = httpx.get(f"{srv.url}/v2/health/{kind}")
            assert (response.status_code, strict_json(response.content)) == (400, {kind: False})
        c = triton.InferenceServerClient(url=srv.url.removeprefix("http://"))
        assert not c.is_server_live() and not c.is_server_ready()
        c.close()
    finally:
        srv.handle.app.live = True
        srv.close()


def test_it_shows_a_model_whose_load_failed_as_not_ready_with_its_reason(server: om.ServerUnderTest,
                                                                        client: triton.InferenceServerClient) -> None:
    error = server.registry.status("broken").error
    assert error
    for path in ("/v2/models/broken/ready", "/v2/models/broken/versions/1/ready"):
        response = httpx.get(server.url + path)
        assert response.status_code == 400
        body = strict_json(response.content)
        assert body == {"name": "broken", "version": "1", "ready": False, "reason": f"failed: {error}"}
    assert not client.is_model_ready("broken")
    ready = httpx.get(f"{server.url}/v2/models/mlp/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "mlp", "version": "1", "ready": True})
    assert client.is_model_ready("mlp", "1")
    # A model or version the node was never asked for is not "not ready": it does not exist.
    assert httpx.get(f"{server.url}/v2/models/nope/ready").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/broken/versions/7/ready").status_code == 404


def test_the_index_lists_every_model_asked_for_with_its_state_and_reason(server: om.ServerUnderTest,
                                                                        client: triton.InferenceServerClient) -> None:
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["mlp"] == {"name": "mlp", "version": "1", "state": "READY", "reason": ""}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert index["broken"]["reason"] == f"failed: {server.registry.status('broken').error}"
    ready_only = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}).json()
    assert {row["name"] for row in ready_only} >= {"mlp", "add", "fixed"}
    assert "broken" not in {row["name"] for row in ready_only}
    assert httpx.post(f"{server.url}/v2/repository/index", content=b"[1]").status_code == 400
    assert httpx.get(f"{server.url}/v2/repository/index").status_code == 405
    meta = client.get_server_metadata()
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta["extensions"])


# the repository: load and unload ---------------------------------------------------------------------


def test_it_unloads_and_loads_again_a_model_it_was_asked_to_serve(server: om.ServerUnderTest,
                                                                 client: triton.InferenceServerClient) -> None:
    client.unload_model("add")
    assert not client.is_model_ready("add")
    ready = httpx.get(f"{server.url}/v2/models/add/ready")
    assert ready.status_code == 400 and ready.json()["reason"] == "unloaded"
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["add"] == {"name": "add", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    client.load_model("add")
    assert client.is_model_ready("add")
    np.testing.assert_allclose(infer_mlp(client, X, "add"), X + 0.5)


def test_it_retries_a_failed_load_from_the_path_it_was_asked_to_load(server: om.ServerUnderTest, models: Path,
                                                                    client: triton.InferenceServerClient) -> None:
    path = om.fails_smoke_test(models / "flaky.onnx")
    assert server.load("flaky", "1", path).state == "failed"
    before = server.registry.metrics.load_failures.get("flaky", 0)
    with pytest.raises(triton.InferenceServerException, match="failed to load 'flaky' version 1 \\(failed\\)"):
        client.load_model("flaky")
    assert server.registry.metrics.load_failures["flaky"] == before + 1
    # The file at the recorded path is fixed (what a re-download would do): the retry serves it.
    om.add_constant(path, 2.0)
    client.load_model("flaky")
    assert client.is_model_ready("flaky")
    np.testing.assert_allclose(infer_mlp(client, X, "flaky"), X + 2.0)


def test_it_never_loads_what_it_was_not_asked_to_serve(server: om.ServerUnderTest, models: Path,
                                                      client: triton.InferenceServerClient) -> None:
    with pytest.raises(triton.InferenceServerException, match="'other' is not one this node was asked to serve"):
        client.load_model("other")
    with pytest.raises(triton.InferenceServerException, match="config not accepted"):
        client.load_model("add", config=json.dumps({"backend": "onnxruntime"}))
    with pytest.raises(triton.InferenceServerException, match="file:1/model.onnx not accepted"):
        client.load_model("add", config="{}", files={"file:1/model.onnx": b"not a model"})
    assert httpx.post(f"{server.url}/v2/repository/models/other/load").status_code == 404
    assert client.is_model_ready("add")


def test_it_refuses_to_load_a_file_changed_since_it_was_asked_for(server: om.ServerUnderTest, models: Path,
                                                                 client: triton.InferenceServerClient) -> None:
    path = om.add_constant(models / "pinned.onnx", 1.0)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert server.load("pinned", "1", path, sha256=sha256).state == "serving"
    client.unload_model("pinned")
    shutil.copy(models / "mlp.onnx", path)
    with pytest.raises(triton.InferenceServerException, match=f"not {sha256} as this node was asked"):
        client.load_model("pinned")
    assert not client.is_model_ready("pinned")


def test_without_explicit_model_control_load_and_unload_are_refused_with_503(tmp_path: Path) -> None:
    srv = om.ServerUnderTest()
    try:
        assert srv.load("mlp", "1", om.mlp(tmp_path / "mlp.onnx")).state == "serving"
        for action in ("load", "unload"):
            response = httpx.post(f"{srv.url}/v2/repository/models/mlp/{action}")
            assert response.status_code == 503
            assert "explicit model load / unload is not allowed" in response.json()["error"]
            assert "--model-control explicit" in response.json()["error"]
        c = triton.InferenceServerClient(url=srv.url.removeprefix("http://"))
        with pytest.raises(triton.InferenceServerException, match="explicit model load / unload is not allowed"):
            c.unload_model("mlp")
        # Still serving, and the index is still answered.
        assert c.is_model_ready("mlp")
        assert c.get_model_repository_index() == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]
        c.close()
    finally:
        srv.close()


# statistics and metrics --------------------------------------------------------------------------------


def test_it_reports_triton_statistics_that_count_each_inference(server: om.ServerUnderTest,
                                                               client: triton.InferenceServerClient) -> None:
    def mlp_stats() -> dict[str, Any]:
        [stats] = client.get_inference_statistics("mlp", "1")["model_stats"]
        return stats

    before = mlp_stats()
    for _ in range(3):
        infer_mlp(client)
    with pytest.raises(triton.InferenceServerException):
        bad = triton.InferInput("x", [1, 5], "FP32")
        bad.set_data_from_numpy(np.ones((1, 5), dtype=np.float32))
        client.infer("mlp", [bad])
    after = mlp_stats()
    assert after["name"] == "mlp" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 6  # 3 requests of 2 rows
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    stats, was = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - was["success"]["count"] == 3
    assert stats["fail"]["count"] - was["fail"]["count"] == 1
    assert stats["fail"]["ns"] > was["fail"]["ns"]
    assert stats["queue"]["count"] - was["queue"]["count"] == 3
    assert stats["compute_infer"]["count"] - was["compute_infer"]["count"] == 3
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"]
    # A request's compute time is within its whole time.
    assert stats["compute_infer"]["ns"] + stats["queue"]["ns"] <= stats["success"]["ns"] + stats["fail"]["ns"]
    assert abs(after["last_inference"] - time.time() * 1000) < 10_000
    assert any(b["batch_size"] == 2 and b["compute_infer"]["count"] >= 3 for b in after["batch_stats"])
    every = {s["name"] for s in client.get_inference_statistics()["model_stats"]}
    assert {"mlp", "add", "fixed"} <= every
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")


def test_metrics_show_queue_and_compute_time_failed_loads_and_the_provider(server: om.ServerUnderTest,
                                                                          client: triton.InferenceServerClient
                                                                          ) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    queued = server.metric(before, "edgewise_inference_queue_duration_seconds_count", model="mlp", version="1")
    computed = server.metric(before, "edgewise_inference_compute_duration_seconds_count", model="mlp", version="1")
    infer_mlp(client)
    text = httpx.get(f"{server.url}/metrics").text
    assert server.metric(text, "edgewise_inference_queue_duration_seconds_count",
                         model="mlp", version="1") == queued + 1
    assert server.metric(text, "edgewise_inference_compute_duration_seconds_count",
                         model="mlp", version="1") == computed + 1
    assert server.metric(text, "edgewise_inference_compute_duration_seconds_sum", model="mlp", version="1") > 0
    assert "# TYPE edgewise_inference_queue_duration_seconds histogram" in text
    failures = server.registry.metrics.load_failures.get("broken", 0)
    with pytest.raises(triton.InferenceServerException, match="failed to load 'broken'"):
        client.load_model("broken")
    text = httpx.get(f"{server.url}/metrics").text
    assert "# TYPE edgewise_model_load_failures_total counter" in text
    assert server.metric(text, "edgewise_model_load_failures_total", model="broken") == failures + 1
    assert server.metric(text, "edgewise_model_info", model="mlp", version="1", provider="CPUExecutionProvider") == 1


def test_the_new_figures_add_up_across_processes_and_old_peers_still_add() -> None:
    own, peer = Metrics(), Metrics()
    for metrics, rows in ((own, 2), (peer, 4)):
        m = metrics.of("m", "1")
        m.requests += 1
        m.observe_batch(rows, 1, 0.001, 0.002, time.monotonic())
    own.set_peer(1, peer.export())
    # A process of the previous release exports nine figures only.
    own.set_peer(2, [["m", "1", [1, 0, 1, 1, 0, [0] * 15, 0.0, [0] * 12, 0.0]]])
    total = own.combined()[("m", "1")]
    assert total.requests == 3
    assert total.queue.count == 2 and total.queue.total == pytest.approx(0.002)
    assert total.compute.count == 2 and total.compute_per_request == pytest.approx(0.004)
    assert total.batch_compute == {2: [1, pytest.approx(0.002)], 4: [1, pytest.approx(0.002)]}
    assert abs(total.last_inference_ms() - time.time() * 1000) < 5_000


# configuration -----------------------------------------------------------------------------------------


def test_it_describes_the_model_configuration_triton_tools_read(server: om.ServerUnderTest,
                                                               client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("mlp")
    assert config == client.get_model_config("mlp", "1")
    assert config["name"] == "mlp" and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [3]}]
    served = server.registry.get("mlp")
    assert config["instance_group"] == [{"name": "mlp_0", "kind": "KIND_CPU", "count": served.batcher.instances}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    # A model with a fixed first dimension is not batched: its dims are whole, max_batch_size 0.
    fixed = client.get_model_config("fixed")
    assert fixed["max_batch_size"] == 0 and "dynamic_batching" not in fixed
    assert fixed["input"][0]["dims"] == [2, 3]
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.get_model_config("nope")


# JSON a strict parser reads --------------------------------------------------------------------------


def test_it_answers_nan_and_infinity_as_json_a_strict_parser_reads(server: om.ServerUnderTest,
                                                                  client: triton.InferenceServerClient) -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [float("nan"), float("inf"), float("-inf"), 0.1]}]})
    response = httpx.post(f"{server.url}/v2/models/add/infer", content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    data = strict_json(response.content)["outputs"][0]["data"]
    # The finite element keeps its shortest float32 form.
    assert data == ["NaN", "Infinity", "-Infinity", 0.6]
    # tritonclient reads the JSON output back as the floats they were.
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32), binary_data=False)
    result = client.infer("add", [tensor], outputs=[triton.InferRequestedOutput("y", binary_data=False)])
    out = result.as_numpy("y")
    assert out is not None and out.dtype == np.float32
    assert np.isnan(out[0, 0]) and out[0, 1:].tolist() == [np.inf, -np.inf, 1.5]


# several serving processes ---------------------------------------------------------------------------


def test_every_process_answers_the_repository_and_statistics_of_the_whole_node(tmp_path: Path) -> None:
    srv = om.ServerUnderTest(processes=2, model_control="explicit")
    try:
        assert srv.load("mlp", "1", om.mlp(tmp_path / "mlp.onnx")).state == "serving"
        assert srv.load("broken", "1", om.fails_smoke_test(tmp_path / "broken.onnx")).state == "failed"
        pool = srv.handle.pool
        assert pool is not None
        srv.thread.run(pool.wait_serving())
        answers = []
        # A connection each: the kernel shares them out among both processes.
        for _ in range(16):
            c = triton.InferenceServerClient(url=srv.url.removeprefix("http://"))
            infer_mlp(c)
            answers.append((c.is_model_ready("broken"), c.get_model_repository_index(),
                            httpx.get(f"{srv.url}/v2/models/broken/ready").json()["reason"]))
            c.close()
        srv.thread.run(pool.refresh_metrics())
        peer = srv.registry.metrics.peers[1]
        assert peer and peer[0][2][0] > 0, "no request reached the worker process"
        reason = f"failed: {srv.registry.status('broken').error}"
        index = [{"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": reason},
                 {"name": "mlp", "version": "1", "state": "READY", "reason": ""}]
        assert all(a == (False, index, reason) for a in answers), answers
        for _ in range(4):
            with httpx.Client(base_url=srv.url) as h:
                [stats] = h.get("/v2/models/mlp/stats").json()["model_stats"]
                assert stats["inference_count"] == 32 and stats["inference_stats"]["success"]["count"] == 16
    finally:
        srv.close()

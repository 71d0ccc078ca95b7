"""Dynamic batching under real concurrent HTTP load."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.edge_runtime import onnx_models as om


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[om.ServerUnderTest]:
    models = tmp_path_factory.mktemp("models")
    srv = om.ServerUnderTest()
    # A CNN run in the thread pool: requests pile up while a batch runs there.
    srv.load("cnn", "1", om.cnn(models / "cnn.onnx", size=64, filters=32), max_batch_size=16, inline_below_ms=0)
    srv.load("mlp", "1", om.mlp(models / "mlp.onnx"), max_batch_size=8)
    srv.load("waits", "1", om.mlp(models / "waits.onnx"), max_batch_size=8, max_queue_delay_ms=300)
    yield srv
    srv.close()


def infer(client: httpx.Client, model: str, x: np.ndarray) -> np.ndarray:
    request = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = client.post(f"/v2/models/{model}/infer", json=request)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_it_batches_concurrent_requests_and_gives_each_its_own_rows(server: om.ServerUnderTest,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    import onnxruntime as ort

    path = om.cnn(tmp_path_factory.mktemp("ref") / "cnn.onnx", size=64, filters=32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(1, 3, 64, 64)).astype(np.float32) for _ in range(96)]
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(24)]
    try:
        with ThreadPoolExecutor(24) as pool:
            outputs = list(pool.map(lambda i: infer(clients[i % 24], "cnn", inputs[i]), range(96)))
    finally:
        for c in clients:
            c.close()
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(y, reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = server.metric(metrics, "edgewise_inference_batch_size_count", model="cnn", version="1")
    requests = server.metric(metrics, "edgewise_inference_batch_size_sum", model="cnn", version="1")
    singles = server.metric(metrics, "edgewise_inference_batch_size_bucket", model="cnn", version="1", le="1")
    assert requests == 96
    assert batches < 96, "no two requests were ever run together"
    assert singles < batches, "every batch held one request"


def test_it_batches_concurrent_requests_to_a_model_it_runs_on_the_loop(server: om.ServerUnderTest) -> None:
    assert server.registry.get("mlp").batcher.runs_inline
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(160)]
    metrics = httpx.get(f"{server.url}/metrics").text
    before = server.metric(metrics, "edgewise_inference_batch_size_count", model="mlp", version="1")
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(16)]
    try:
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda i: infer(clients[i % 16], "mlp", inputs[i]), range(160)))
    finally:
        for c in clients:
            c.close()
    for x, y in zip(inputs, outputs, strict=True):
        # Stacked rows go through another matmul kernel: rounding differs in the last bits.
        np.testing.assert_allclose(y, om.mlp_expected(x), rtol=1e-5, atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = server.metric(metrics, "edgewise_inference_batch_size_count", model="mlp", version="1") - before
    assert batches < 160, "no two requests that arrived together were run together"


def test_it_runs_a_lone_request_at_once(server: om.ServerUnderTest) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        infer(client, "mlp", x)  # warm the connection
        started = time.perf_counter()
        for _ in range(5):
            np.testing.assert_allclose(infer(client, "mlp", x), om.mlp_expected(x), rtol=1e-5)
        no_wait = (time.perf_counter() - started) / 5
        started = time.perf_counter()
        infer(client, "waits", x)
        waited = time.perf_counter() - started
    # The model configured with max_queue_delay_ms=300 holds a lone request
    # for company; the default one does not wait at all.
    assert waited >= 0.29
    assert no_wait < 0.1


def test_it_fills_a_batch_within_the_queue_delay(server: om.ServerUnderTest) -> None:
    xs = [np.full((1, 4), i, dtype=np.float32) for i in range(4)]
    metrics = httpx.get(f"{server.url}/metrics").text
    before = server.metric(metrics, "edgewise_inference_batch_size_count", model="waits", version="1")

    def send(i: int) -> np.ndarray:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            return infer(client, "waits", xs[i])

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(send, range(4)))
    for x, y in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(y, om.mlp_expected(x), rtol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    # Four requests within 300 ms of each other: at most two batches (one if all arrived in time).
    assert server.metric(metrics, "edgewise_inference_batch_size_count", model="waits", version="1") - before <= 2

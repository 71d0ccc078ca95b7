"""Hot swap, last known good, and explicit versions, under real concurrent requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.edge_runtime import onnx_models as om

X = [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture()
def server() -> Iterator[om.ServerUnderTest]:
    srv = om.ServerUnderTest()
    yield srv
    srv.close()


def request() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def answer(client: httpx.Client, path: str = "/v2/models/m/infer") -> tuple[str, float]:
    """(model_version, the constant it added) of one inference."""
    response = client.post(path, json=request())
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model_version"], body["outputs"][0]["data"][0] - X[0][0]


def test_it_swaps_versions_under_load_without_failing_a_request(server: om.ServerUnderTest, tmp_path: Path) -> None:
    assert server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0)).state == "serving"
    load = om.Hammer(server.url, "/v2/models/m/infer", request(), offset=X[0][0])
    try:
        # Swap while requests are in flight, and let each version answer a while.
        load.wait_for(30)
        for i, version in enumerate(("2", "3")):
            status = server.load("m", version, om.add_constant(tmp_path / f"v{version}.onnx", float(version)))
            assert status.state == "serving", status
            load.wait_for(30 * (i + 2))
    finally:
        load.join()
    seen, failures = load.seen, load.failures
    assert failures == []
    assert len(seen) >= 90
    # Every answer came whole from one version, and each version answered.
    assert {(v, c) for v, c in seen} == {("1", 1.0), ("2", 2.0), ("3", 3.0)}
    with httpx.Client(base_url=server.url) as client:
        assert answer(client) == ("3", 3.0)
        # The old versions were retired once their requests had finished.
        assert client.get("/v2/models/m/versions/1/ready").status_code == 404
        assert client.get("/v2/models/m").json()["versions"] == ["3"]


def test_it_keeps_serving_the_last_good_version_when_the_new_one_fails(server: om.ServerUnderTest,
                                                                        tmp_path: Path) -> None:
    server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0))
    failed = server.load("m", "2", om.fails_smoke_test(tmp_path / "v2.onnx"))
    assert failed.state == "failed"
    assert failed.version == "2"
    assert failed.serving_version == "1"
    assert "smoke test of v2.onnx failed" in failed.error
    garbage = tmp_path / "v3.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    broken = server.load("m", "3", garbage)
    assert broken.state == "failed" and broken.serving_version == "1"
    assert "onnxruntime cannot load v3.onnx" in broken.error
    assert server.registry.status("m") == broken
    with httpx.Client(base_url=server.url) as client:
        assert answer(client) == ("1", 1.0)
        assert client.get("/v2/models/m/versions/2/ready").status_code == 404


def test_it_serves_an_explicitly_requested_version_while_it_is_loaded(server: om.ServerUnderTest,
                                                                      tmp_path: Path) -> None:
    server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0))
    server.load("m", "2", om.add_constant(tmp_path / "v2.onnx", 2.0), retire_others=False)
    with httpx.Client(base_url=server.url) as client:
        assert answer(client) == ("2", 2.0)
        assert answer(client, "/v2/models/m/versions/1/infer") == ("1", 1.0)
        assert answer(client, "/v2/models/m/versions/2/infer") == ("2", 2.0)
        assert client.get("/v2/models/m").json()["versions"] == ["1", "2"]
        server.thread.run(server.registry.unload("m", "2"))
        assert answer(client) == ("1", 1.0)
        assert client.post("/v2/models/m/versions/2/infer", json=request()).status_code == 404


def test_it_counts_metrics_per_version(server: om.ServerUnderTest, tmp_path: Path) -> None:
    server.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0))
    server.load("m", "2", om.add_constant(tmp_path / "v2.onnx", 2.0), retire_others=False)
    with httpx.Client(base_url=server.url) as client:
        answer(client, "/v2/models/m/versions/1/infer")
        answer(client)
        answer(client)
        text = client.get("/metrics").text
    assert server.metric(text, "edgewise_inference_requests_total", model="m", version="1") == 1
    assert server.metric(text, "edgewise_inference_requests_total", model="m", version="2") == 2
    assert np.isfinite(server.metric(text, "edgewise_inference_request_duration_seconds_sum", model="m", version="2"))


def test_a_retired_version_is_freed_although_the_heap_was_frozen(tmp_path: Path) -> None:
    import gc
    import weakref

    from edge_runtime.serving import ModelRegistry
    from edge_runtime.serving.registry import settle_heap

    thread = om.LoopThread()
    registry = ModelRegistry()
    try:
        assert thread.run(registry.load("m", "1", om.add_constant(tmp_path / "v1.onnx", 1.0))).state == "serving"
        first = registry.get("m", "1")
        # A version in a reference cycle: reference counting alone never frees it, only the collector.
        first.request_plans["cycle"] = first
        old, old_model = weakref.ref(first), weakref.ref(first.model)
        del first
        settle_heap()  # as a server does when it starts: version 1 is frozen with the rest
        assert gc.get_freeze_count() > 0
        assert thread.run(registry.load("m", "2", om.add_constant(tmp_path / "v2.onnx", 2.0))).state == "serving"
        assert registry.versions("m") == ["2"]
        assert old() is None and old_model() is None
        assert gc.get_freeze_count() > 0  # frozen again after the collection
    finally:
        thread.run(registry.close())
        thread.close()
        gc.unfreeze()

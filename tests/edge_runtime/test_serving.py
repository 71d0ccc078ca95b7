"""The OIP v2 REST API of the model server, over real HTTP on loopback, with real onnxruntime."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.edge_runtime import onnx_models as om

X = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[om.ServerUnderTest]:
    models = tmp_path_factory.mktemp("models")
    srv = om.ServerUnderTest(max_body_bytes=256 * 1024)
    assert srv.load("mlp", "1", om.mlp(models / "mlp.onnx")).state == "serving"
    assert srv.load("gather", "1", om.gather(models / "gather.onnx"), max_queue_delay_ms=300).state == "serving"
    assert srv.load("strings", "1", om.strings(models / "strings.onnx")).state == "serving"
    assert srv.load("fixed", "1", om.fixed_batch(models / "fixed.onnx")).state == "serving"
    assert srv.load("add", "1", om.add_constant(models / "add.onnx", 0.5)).state == "serving"
    yield srv
    srv.close()


@pytest.fixture()
def client(server: om.ServerUnderTest) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def mlp_request(x: np.ndarray = X, **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}], **extra}


def test_it_answers_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "edgewise-edge-runtime"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("prefix", ["/v2/models/mlp", "/v2/models/mlp/versions/1"])
def test_it_describes_a_model_and_its_readiness(client: httpx.Client, prefix: str) -> None:
    meta = client.get(prefix).json()
    assert meta["name"] == "mlp"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert client.get(f"{prefix}/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"])
def test_it_infers_json_tensors(client: httpx.Client, path: str) -> None:
    response = client.post(path, json=mlp_request(id="req-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mlp"
    assert body["model_version"] == "1"
    assert body["id"] == "req-7"
    [out] = body["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [2, 3]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), om.mlp_expected(X), rtol=1e-5)


def test_it_accepts_flat_json_data(client: httpx.Client) -> None:
    request = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    body = client.post("/v2/models/mlp/infer", json=request).json()
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, 3), om.mlp_expected(X), rtol=1e-5)


def test_it_takes_nan_and_infinity_that_python_clients_send_and_answers_them_as_strings(client: httpx.Client
                                                                                        ) -> None:
    # Python's json writes these non-standard literals; the answer is JSON proper, the values as strings.
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [float("nan"), float("inf"), float("-inf"), 1.0]}]})
    response = client.post("/v2/models/add/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    data = json.loads(response.content)["outputs"][0]["data"]
    assert data == ["NaN", "Infinity", "-Infinity", 1.5]
    assert np.isnan(np.array(data, dtype=np.float32)[0])


def test_it_writes_float32_outputs_in_their_shortest_exact_form(client: httpx.Client) -> None:
    x = np.array([[0.1, 0.2, 1 / 3, 7.0]], dtype=np.float32)
    response = client.post("/v2/models/add/infer", json=mlp_request(x))
    data = response.json()["outputs"][0]["data"]
    # Each number reads back as exactly the float32 the model returned.
    np.testing.assert_array_equal(np.array(data, dtype=np.float32), (x + np.float32(0.5)).ravel())
    assert b"0.6," in response.content


def binary_request(tensors: list[tuple[str, np.ndarray, str]], **extra: object) -> tuple[bytes, dict[str, str]]:
    head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": dt,
                        "parameters": {"binary_data_size": a.nbytes}} for n, a, dt in tensors], **extra}
    header = json.dumps(head).encode()
    body = header + b"".join(a.astype(a.dtype.newbyteorder("<")).tobytes() for _, a, _ in tensors)
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def split_binary_response(response: httpx.Response) -> tuple[dict[str, object], bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"])
def test_it_infers_binary_tensors_both_ways(client: httpx.Client, path: str) -> None:
    body, headers = binary_request([("x", X, "FP32")], outputs=[{"name": "y", "parameters": {"binary_data": True}}])
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == 200, response.text
    head, raw = split_binary_response(response)
    [out] = head["outputs"]  # type: ignore[misc]
    assert out["parameters"]["binary_data_size"] == 2 * 3 * 4
    assert "data" not in out
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4").reshape(2, 3), om.mlp_expected(X), rtol=1e-5)


def test_it_reads_each_binary_request_anew_when_its_header_repeats(server: om.ServerUnderTest,
                                                                   client: httpx.Client) -> None:
    served = server.registry.get("mlp")
    served.request_plans.clear()
    served.answer_heads.clear()
    rng = np.random.default_rng(9)
    wanted = {"outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    for rows in (2, 2, 3, 2):
        for request_id in ("a", "a", "b"):
            x = rng.normal(size=(rows, 4)).astype(np.float32)
            body, headers = binary_request([("x", x, "FP32")], id=request_id, **wanted)
            response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
            assert response.status_code == 200, response.text
            head, raw = split_binary_response(response)
            assert head["id"] == request_id
            [out] = head["outputs"]  # type: ignore[misc]
            assert out["shape"] == [rows, 3] and out["parameters"]["binary_data_size"] == rows * 3 * 4
            np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4").reshape(rows, 3), om.mlp_expected(x),
                                       rtol=1e-5)
    # The repeated headers were parsed once each, and their answers' heads built once per shape and id.
    assert 0 < len(served.request_plans) <= 4 and 0 < len(served.answer_heads) <= 4
    # A known header whose tensor bytes are short is still refused for what it is.
    body, headers = binary_request([("x", X, "FP32")], id="a", **wanted)
    response = client.post("/v2/models/mlp/infer", content=body[:-4], headers=headers)
    assert response.status_code == 400
    assert "binary_data_size 32 runs past the end of the body" in response.json()["error"]


def test_it_answers_binary_input_with_json_output_unless_asked(client: httpx.Client) -> None:
    body, headers = binary_request([("x", X, "FP32")])
    response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert "Inference-Header-Content-Length" not in response.headers
    out = response.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 3), om.mlp_expected(X), rtol=1e-5)


def test_it_serves_bytes_tensors_in_json_and_binary(client: httpx.Client) -> None:
    request = {"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": ["héllo", "", "b"]}]}
    out = client.post("/v2/models/strings/infer", json=request).json()["outputs"][0]
    assert out == {"name": "y", "datatype": "BYTES", "shape": [3], "data": ["héllo", "", "b"]}
    items = [s.encode() for s in ["héllo", "", "b"]]
    raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
    header = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = client.post("/v2/models/strings/infer", content=header + raw,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    head, blob = split_binary_response(response)
    assert blob == raw
    assert head["outputs"][0]["parameters"] == {"binary_data_size": len(raw)}  # type: ignore[index]


def test_it_works_with_the_triton_http_client(server: om.ServerUnderTest) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("mlp")
        assert client.is_model_ready("mlp", "1")
        assert client.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 4]
        for binary in (True, False):
            tensor = triton.InferInput("x", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
            result = client.infer("mlp", [tensor], model_version="1", outputs=wanted, request_id="t1")
            np.testing.assert_allclose(result.as_numpy("y"), om.mlp_expected(X), rtol=1e-5)
            assert result.get_response()["id"] == "t1"
        # No outputs named: the client asks for every output in binary.
        strings = triton.InferInput("x", [2], "BYTES")
        strings.set_data_from_numpy(np.array([b"edge", b"wise"], dtype=object))
        result = client.infer("strings", [strings])
        assert result.as_numpy("y").tolist() == [b"edge", b"wise"]
        with pytest.raises(triton.InferenceServerException, match="no input named 'z'"):
            bad = triton.InferInput("z", list(X.shape), "FP32")
            bad.set_data_from_numpy(X)
            client.infer("mlp", [bad])
    finally:
        client.close()


BAD_REQUESTS = {
    "wrong_input_name": ({"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
                         "no input named 'z' (its inputs: x)"),
    "wrong_shape": ({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]},
                    "input 'x': shape [1, 5] does not match the model's [-1, 4]"),
    "data_not_fitting_shape": ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2]}]},
                               "input 'x': shape [2, 4] needs 8 elements, data has 2"),
    "wrong_datatype": ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]},
                       "input 'x': datatype 'INT64' does not match the model's FP32"),
    "non_numeric_data": ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "a", 4]}]},
                         "input 'x': data is not FP32"),
    "missing_inputs": ({"inputs": []}, "'inputs' must be a non-empty list"),
    "unknown_output": ({**mlp_request(), "outputs": [{"name": "nope"}]}, "no output named 'nope'"),
    "malformed_json": (b'{"inputs": [', "the request body is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_it_refuses_a_bad_request_naming_the_problem(server: om.ServerUnderTest, client: httpx.Client,
                                                      case: str) -> None:
    request, message = BAD_REQUESTS[case]
    errors_before = server.metric(client.get("/metrics").text, "edgewise_inference_errors_total",
                                  model="mlp", version="1")
    if isinstance(request, bytes):
        response = client.post("/v2/models/mlp/infer", content=request)
    else:
        response = client.post("/v2/models/mlp/infer", json=request)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert server.metric(client.get("/metrics").text, "edgewise_inference_errors_total",
                         model="mlp", version="1") == errors_before + 1
    # The server carries on serving.
    assert client.post("/v2/models/mlp/infer", json=mlp_request()).status_code == 200


def test_a_repeated_json_layout_is_read_alike_and_refused_alike(client: httpx.Client) -> None:
    # The second request of a layout (names, types, shapes) takes the checked-once path:
    # the same answers, and the same refusals, as the first.
    def flat(data: list[object], **extra: object) -> dict[str, object]:
        return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": data}], **extra}

    for x in ([[1.5, 2, 3, 4]], [[-1, 0.25, 1e3, 7]], [[True, 0, 0, 1]]):
        for extra in ({}, {"id": "again"}):
            body = client.post("/v2/models/mlp/infer", json=flat(list(np.ravel(x).tolist()), **extra)).json()
            np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(1, 3),
                                       om.mlp_expected(np.array(x, dtype=np.float32)), rtol=1e-5)
            assert body.get("id") == extra.get("id")
    for data, message in (([1, 2, "a", 4], "input 'x': data is not FP32"),
                          ([1, 2, [3], 4], "input 'x': data is not FP32"),
                          ([1, 2, 3], "input 'x': shape [1, 4] needs 4 elements, data has 3")):
        response = client.post("/v2/models/mlp/infer", json=flat(data))
        assert response.status_code == 400, (data, response.text)
        assert message in response.json()["error"], (data, response.text)
    response = client.post("/v2/models/mlp/infer", json=flat([1, 2, 3, 4], id=7))
    assert response.status_code == 400 and "'id' must be a string" in response.json()["error"]

    # A new layout: the first answer is built whole, the next from the plan; byte for byte the same.
    request = {"id": "same", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32",
                                         "data": list(range(12))}]}
    first, second = (client.post("/v2/models/mlp/infer", json=request) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    # NaN in the outputs: written as the string "NaN", on the planned path too.
    body = json.dumps(flat([float("nan"), 1, 2, 3]))
    response = client.post("/v2/models/mlp/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert json.loads(response.content)["outputs"][0]["data"] == ["NaN"] * 3


def test_it_refuses_a_missing_input_of_a_model_with_several(client: httpx.Client) -> None:
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    response = client.post("/v2/models/gather/infer", json=request)
    assert response.status_code == 400
    assert response.json()["error"] == "missing input(s) idx for model 'gather'"


def test_it_refuses_binary_sizes_that_do_not_fit(client: httpx.Client) -> None:
    body, headers = binary_request([("x", X, "FP32")])
    response = client.post("/v2/models/mlp/infer", content=body[:-4], headers=headers)
    assert response.status_code == 400
    assert "binary_data_size 32 runs past the end of the body" in response.json()["error"]


def test_it_refuses_an_oversized_body_with_413_and_keeps_serving(client: httpx.Client) -> None:
    big = np.zeros((20000, 4), dtype=np.float32)  # 320 kB binary, over the 256 KiB limit of this server
    body, headers = binary_request([("x", big, "FP32")])
    response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 413
    assert "over the limit of 262144 bytes" in response.json()["error"]
    assert client.post("/v2/models/mlp/infer", json=mlp_request()).status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/mlp/versions/9",
                                  "/v2/models/mlp/versions/9/ready"])
def test_it_answers_404_for_an_unknown_model_or_version(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "nope" in response.json()["error"] or "no version '9'" in response.json()["error"]


def test_it_answers_404_to_inference_on_an_unknown_model(client: httpx.Client) -> None:
    response = client.post("/v2/models/nope/infer", json=mlp_request())
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'nope'"}
    assert client.post("/v2/models/mlp/versions/2/infer", json=mlp_request()).status_code == 404


def test_it_fails_only_the_request_the_model_cannot_process(server: om.ServerUnderTest) -> None:
    # The gather model waits 300 ms for company, so these four run as one
    # batch; the out-of-range index makes that batch fail, and only its
    # request may get the error.
    x = np.arange(16, dtype=np.float32).reshape(4, 4)

    def send(i: int) -> httpx.Response:
        idx = 7 if i == 2 else i
        request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x[i].tolist()},
                              {"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [idx]}]}
        return httpx.post(f"{server.url}/v2/models/gather/infer", json=request, timeout=30)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, range(4)))
    assert responses[2].status_code == 500
    assert "model 'gather' failed on this request" in responses[2].json()["error"]
    for i in (0, 1, 3):
        assert responses[i].status_code == 200, responses[i].text
        assert responses[i].json()["outputs"][0]["data"] == [x[i, i]]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert server.metric(metrics, "edgewise_inference_batch_size_count", model="gather", version="1") < 4


def test_it_runs_a_fixed_batch_model_request_by_request(server: om.ServerUnderTest) -> None:
    def send(i: int) -> list[float]:
        data = [float(i)] * 6
        request = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data}]}
        response = httpx.post(f"{server.url}/v2/models/fixed/infer", json=request, timeout=30)
        assert response.status_code == 200, response.text
        return list(response.json()["outputs"][0]["data"])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(16)))
    assert results == [[2.0 * i] * 6 for i in range(16)]


def test_it_exposes_prometheus_metrics_per_model_and_version(server: om.ServerUnderTest,
                                                              client: httpx.Client) -> None:
    before = client.get("/metrics").text
    requests = server.metric(before, "edgewise_inference_requests_total", model="mlp", version="1")
    client.post("/v2/models/mlp/infer", json=mlp_request())
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert server.metric(text, "edgewise_inference_requests_total", model="mlp", version="1") == requests + 1
    assert "# TYPE edgewise_inference_request_duration_seconds histogram" in text
    assert server.metric(text, "edgewise_inference_request_duration_seconds_bucket",
                         model="mlp", version="1", le="+Inf") >= requests + 1
    assert server.metric(text, "edgewise_inference_queue_depth", model="mlp", version="1") == 0
    assert "# TYPE edgewise_inference_batch_size histogram" in text


def test_it_answers_405_for_a_wrong_method(client: httpx.Client) -> None:
    response = client.get("/v2/models/mlp/infer")
    assert response.status_code == 405
    assert "use POST" in response.json()["error"]


def test_it_reads_a_gzip_request_body(client: httpx.Client) -> None:
    import gzip

    body = gzip.compress(json.dumps(mlp_request()).encode())
    response = client.post("/v2/models/mlp/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(2, 3),
                               om.mlp_expected(X), rtol=1e-5)



"""Hostile inference requests against a real model server on loopback: a 4xx naming the problem, never a 5xx.

A property-based test posts JSON and binary (``Inference-Header-Content-Length``)
requests mixing valid layout with hostile values (wrong datatypes, shapes that
do not match the data, negative and huge dimensions, integers past int64, nested
and ragged lists, strings for numbers, parameters of the wrong type, binary
sizes that do not add up, missing, duplicate and unknown tensors) to models with
FP32, INT64 and BYTES inputs and dynamic dimensions. No answer is a 5xx, no
error is logged as unexpected, and ``/metrics`` counts exactly the refusals the
test saw. Explicit regressions pin each kind that once answered 500.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.edge_runtime import onnx_models as om

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MODELS = ("mlp", "rowsum", "strings")


def rowsum(path: Path) -> Path:
    """``y = sum(x, axis=1)``: x INT64 [N, M] -> y INT64 [N, 1], both dimensions dynamic."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "rowsum",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 1])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return om._save(graph, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[om.ServerUnderTest]:
    models = tmp_path_factory.mktemp("models")
    srv = om.ServerUnderTest(max_body_bytes=1024 * 1024)
    assert srv.load("mlp", "1", om.mlp(models / "mlp.onnx")).state == "serving"
    assert srv.load("rowsum", "1", rowsum(models / "rowsum.onnx")).state == "serving"
    assert srv.load("strings", "1", om.strings(models / "strings.onnx")).state == "serving"
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server: om.ServerUnderTest) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def infer(client: httpx.Client, model: str, body: bytes, header_length: int | str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json" if header_length is None else "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def counters(server: om.ServerUnderTest, client: httpx.Client, model: str) -> tuple[float, float]:
    text = client.get("/metrics").text
    return (server.metric(text, "edgewise_inference_requests_total", model=model, version="1"),
            server.metric(text, "edgewise_inference_errors_total", model=model, version="1"))


def assert_refused(response: httpx.Response, needle: str) -> None:
    assert response.status_code == 400, response.text[:300]
    assert needle in response.json()["error"], response.json()


# -- strategies ------------------------------------------------------------------------------------------------

HOSTILE_NUMBERS = [2**63, -(2**63) - 1, 2**64, 10**30, 2**31, -1, 0, 1.5, float("nan"), float("inf"), 1e300,
                   True, None, "1", "x", "\ud800", "a\x00"]
scalar = (st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none()
          | st.text(max_size=4) | st.sampled_from(HOSTILE_NUMBERS))
data_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=6), max_leaves=24)
dimension = st.integers(0, 4) | st.sampled_from([-1, 2**31, 2**40, 2**62, 2**64, True, 1.0, "2", None])
shape = st.lists(dimension, max_size=4) | st.sampled_from([None, "1,4", 4, {}])
datatype = st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP64", "INT32", "fp32", "", None, 5])
parameters = st.none() | st.fixed_dictionaries({}, optional={
    "binary_data_size": st.integers(-2, 40) | st.sampled_from([True, "16", 1.5, 2**64, None]),
    "binary_data": st.booleans() | st.integers()}) | st.sampled_from([[1], "p", 3])


@st.composite
def tensor(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        out["name"] = draw(st.sampled_from(["x", "x", "x", "idx", "", None, 7]))
    if draw(st.integers(0, 9)):
        out["shape"] = draw(shape)
    if draw(st.integers(0, 9)):
        out["datatype"] = draw(datatype)
    if draw(st.integers(0, 3)):
        out["data"] = draw(data_value)
    if draw(st.booleans()):
        out["parameters"] = draw(parameters)
    return out


# Each model's input: its datatype and how many columns it takes (None: 1-D).
INPUTS = {"mlp": ("FP32", 4), "rowsum": ("INT64", 3), "strings": ("BYTES", None)}
ELEMENTS = {"FP32": st.floats(-1e6, 1e6, width=32), "INT64": st.integers(-(2**63), 2**63 - 1),
            "BYTES": st.text(max_size=5)}


@st.composite
def plausible_tensor(draw: st.DrawFn, model: str) -> dict[str, Any]:
    """A tensor the model would take, mostly: its datatype and a shape that agrees with the data, with now and
    then a hostile element, another datatype or another width."""
    kind, cols = INPUTS[model]
    if not draw(st.integers(0, 4)):
        kind = draw(st.sampled_from(sorted(ELEMENTS)))
    if cols is not None and not draw(st.integers(0, 4)):
        cols = draw(st.integers(1, 5))
    rows = draw(st.integers(0, 3))
    count = rows * (cols or 1)
    element = ELEMENTS[kind]
    values = draw(st.lists(element, min_size=count, max_size=count))
    if values and not draw(st.integers(0, 3)):
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(HOSTILE_NUMBERS))
    if cols is None:
        return {"name": "x", "shape": [count], "datatype": kind, "data": values}
    nested = [values[r * cols:(r + 1) * cols] for r in range(rows)] if draw(st.booleans()) else values
    return {"name": "x", "shape": [rows, cols], "datatype": kind, "data": nested}


@st.composite
def json_request(draw: st.DrawFn, model: str) -> dict[str, Any]:
    inputs = [draw(plausible_tensor(model))] if draw(st.integers(0, 2)) else []
    if not inputs or not draw(st.integers(0, 2)):
        inputs += draw(st.lists(tensor(), max_size=2))  # arbitrary tensors, and duplicates of "x"
    request: dict[str, Any] = {"inputs": inputs} if draw(st.integers(0, 9)) else {"inputs": draw(data_value)}
    if not draw(st.integers(0, 3)):
        request["id"] = draw(st.text(max_size=5) | st.integers() | st.none())
    if not draw(st.integers(0, 3)):
        request["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["y", "y", "z", None, ["y"]])}, optional={"parameters": parameters}),
            max_size=2) | st.sampled_from([{"name": "y"}, "y", None]))
    if not draw(st.integers(0, 3)):
        request["parameters"] = draw(parameters)
    return request


@st.composite
def binary_request(draw: st.DrawFn, model: str) -> tuple[bytes, int | str]:
    """A JSON header with binary inputs, their bytes, and the header length (sometimes a wrong one)."""
    inputs = []
    blob = b""
    for i in range(draw(st.integers(0, 2))):
        kind, cols = INPUTS[model]
        if i or not draw(st.integers(0, 3)):
            kind = draw(st.sampled_from(["FP32", "INT64", "BYTES", "BOOL"]))
        rows = draw(st.integers(0, 3))
        if kind == "BYTES":
            items = [draw(st.binary(max_size=4)) for _ in range(rows)]
            raw = b"".join(struct.pack("<I", len(i)) + i for i in items)
            if not draw(st.integers(0, 3)):
                raw = raw[:draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=6))
            shape_: Any = [rows]
        else:
            width = cols or 2
            itemsize = {"FP32": 4, "INT64": 8, "BOOL": 1}[kind]
            raw = draw(st.binary(min_size=rows * width * itemsize, max_size=rows * width * itemsize))
            if not draw(st.integers(0, 3)):
                raw = draw(st.binary(max_size=40))
            shape_ = [rows, width] if draw(st.integers(0, 4)) else draw(st.sampled_from(
                [[2**62, 0], [-1, 4], [rows], [0, 2**40], [True, 4]]))
        size: Any = len(raw) if draw(st.integers(0, 4)) else draw(st.sampled_from([len(raw) + 1, -1, True, "8"]))
        inputs.append({"name": "x" if draw(st.integers(0, 4)) else "idx", "shape": shape_, "datatype": kind,
                       "parameters": {"binary_data_size": size}})
        blob += raw
    head = json.dumps({"inputs": inputs,
                       **({"parameters": {"binary_data_output": True}} if draw(st.booleans()) else {})}).encode()
    length: int | str = len(head)
    if not draw(st.integers(0, 5)):
        length = draw(st.sampled_from([len(head) + 3, len(head) - 1, 0, -1, "x", 10**9]))
    return head + blob, length


# -- the properties --------------------------------------------------------------------------------------------


def _no_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    unexpected = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unexpected, unexpected[:3]


@FUZZ
@given(data=st.data(), model=st.sampled_from(MODELS))
def test_it_never_answers_a_fuzzed_json_inference_with_a_server_error(
    server: om.ServerUnderTest, client: httpx.Client, caplog: pytest.LogCaptureFixture, data: st.DataObject,
    model: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="edge_runtime.serving")
    request = data.draw(json_request(model))
    before = counters(server, client, model)
    response = infer(client, model, json.dumps(request, allow_nan=True).encode())
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text[:300]
    if response.status_code != 200:
        assert response.status_code == 400 and response.json()["error"]
    after = counters(server, client, model)
    # Counted once, as an error exactly when refused: nothing failed unseen inside the server.
    assert after == (before[0] + 1, before[1] + (response.status_code != 200))
    _no_unexpected_errors(caplog)


@FUZZ
@given(data=st.data(), model=st.sampled_from(MODELS))
def test_it_never_answers_a_fuzzed_binary_inference_with_a_server_error(
    server: om.ServerUnderTest, client: httpx.Client, caplog: pytest.LogCaptureFixture, data: st.DataObject,
    model: str,
) -> None:
    caplog.set_level(logging.ERROR, logger="edge_runtime.serving")
    body, length = data.draw(binary_request(model))
    before = counters(server, client, model)
    response = infer(client, model, body, length)
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.text[:300]
    if response.status_code != 200:
        assert response.status_code == 400 and response.json()["error"]
    assert counters(server, client, model) == (before[0] + 1, before[1] + (response.status_code != 200))
    _no_unexpected_errors(caplog)


def test_it_answers_an_unknown_model_with_404(client: httpx.Client) -> None:
    response = infer(client, "nosuch", b'{"inputs": []}')
    assert response.status_code == 404 and "nosuch" in response.json()["error"]


# -- regressions -----------------------------------------------------------------------------------------------


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _x(data: Any, shape: list[Any], datatype: str = "FP32", **extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}], **extra},
                      allow_nan=True).encode()


def test_it_refuses_a_body_nested_100k_deep(client: httpx.Client) -> None:
    assert_refused(infer(client, "mlp", _deep(100_000)), "nested too deeply")
    inside = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + _deep(100_000) + b"}]}"
    assert_refused(infer(client, "mlp", inside), "nested too deeply")


def test_it_refuses_data_nested_deeper_than_the_shape_without_failing(client: httpx.Client) -> None:
    # Deep enough that orjson refuses it and Python's reader must take it.
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + _deep(1500) + b"}]}"
    response = infer(client, "mlp", body)
    assert response.status_code == 400


def test_it_refuses_ragged_nested_data_naming_the_input(client: httpx.Client) -> None:
    assert_refused(infer(client, "mlp", _x([[1, 2, 3, 4], 5, 6, 7, 8], [2, 4])), "input 'x': nested data mixes")
    assert_refused(infer(client, "mlp", _x([[1, 2], "ab"], [1, 4])), "input 'x'")


def test_it_refuses_bytes_that_are_not_utf8_text(client: httpx.Client) -> None:
    response = infer(client, "strings", _x(["ok", "\ud800"], [2], "BYTES"))
    assert_refused(response, "unpaired surrogate")
    ok = infer(client, "strings", _x(["ok", "a\x00b"], [2], "BYTES"))
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == ["ok", "a\x00b"]


@pytest.mark.parametrize("shape", [[2**40, 0], [0, 2**62], [2**64, 0], [2**62, 2**62, 0]],
                         ids=["2^40-rows", "2^62-columns", "2^64", "product-overflow"])
def test_it_refuses_dimensions_no_request_can_carry(client: httpx.Client, shape: list[int]) -> None:
    response = infer(client, "rowsum", _x([], shape, "INT64"))
    assert response.status_code == 400, response.text
    assert "input 'x'" in response.json()["error"]
    head = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "INT64",
                                   "parameters": {"binary_data_size": 0}}]}).encode()
    response = infer(client, "rowsum", head, len(head))
    assert response.status_code == 400 and "input 'x'" in response.json()["error"]


def test_it_still_serves_an_empty_batch(client: httpx.Client) -> None:
    response = infer(client, "rowsum", _x([], [0, 3], "INT64"))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [0, 1]


@pytest.mark.parametrize(("data", "needle"), [([2**63, 1], "not INT64"), ([-(2**63) - 1, 1], "input 'x': INT64 data"),
                                              ([1.5, 1], "must be integers"), (["x", 1], "not INT64"),
                                              ([[1], [2, [3]]], "input 'x'")])
def test_it_refuses_int64_data_that_does_not_fit(client: httpx.Client, data: list[Any], needle: str) -> None:
    assert_refused(infer(client, "rowsum", _x(data, [1, 2], "INT64")), needle)
    assert infer(client, "rowsum", _x([2**63 - 1, 0], [1, 2], "INT64")).json()["outputs"][0]["data"] == [2**63 - 1]


@pytest.mark.parametrize(("parameters", "needle"), [([1], "parameters must be an object"),
                                                    ("binary", "parameters must be an object"),
                                                    ({"binary_data_size": True}, "binary_data_size"),
                                                    ({"binary_data_size": "16"}, "binary_data_size")])
def test_it_refuses_parameters_of_the_wrong_type(client: httpx.Client, parameters: Any, needle: str) -> None:
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": parameters}]}).encode()
    assert_refused(infer(client, "mlp", head + b"\0" * 16, len(head)), needle)


def test_it_answers_the_same_layout_with_hostile_numbers_through_the_full_path(client: httpx.Client) -> None:
    # The first request caches the layout; the next ones of that layout take the plan, and fall back
    # to the full path (and its errors) when their numbers do not convert.
    good = _x([1.0] * 2000, [500, 4])
    assert infer(client, "mlp", good).status_code == 200
    assert infer(client, "mlp", good).status_code == 200
    for bad in ([None] * 1999 + [[1]], ["x"] * 2000, [10**400] * 2000):
        response = infer(client, "mlp", json.dumps({"inputs": [{"name": "x", "shape": [500, 4], "datatype": "FP32",
                                                                "data": bad}]}).encode())
        assert response.status_code == 400, response.text[:200]
        assert "input 'x'" in response.json()["error"]
    assert infer(client, "mlp", good).status_code == 200


def test_it_counts_a_refusal_as_an_error_and_never_as_an_internal_one(server: om.ServerUnderTest,
                                                                     client: httpx.Client) -> None:
    before = counters(server, client, "strings")
    kinds = Counter(infer(client, "strings", body).status_code for body in (
        _x(["\ud800"], [1], "BYTES"), _deep(100_000), _x([[1], "a"], [2], "BYTES"), _x(["a"], [1], "BYTES")))
    assert kinds == {400: 3, 200: 1}
    assert counters(server, client, "strings") == (before[0] + 4, before[1] + 3)

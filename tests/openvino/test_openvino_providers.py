"""The real OpenVINO execution provider (onnxruntime-openvino on this CPU): placement, fallback and answers.

Four models, each built here with onnx.helper: one OpenVINO takes whole, one
it takes in part (an ai.onnx.ml op stays on CPU), one it cannot compile (a
dynamic-rank input to its subgraph, as scikit-learn's converted models give
it), and one whose INT64 results it changes (cut to 32 bits). Each is loaded
by the node's own loader and registry, and must be reported and served as
the loader promises: the accelerator where it is right, CPU where it is not,
with the reason, and never nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.protocol import ModelStatus
from edge_runtime.serving import ModelRegistry, ProviderError, load_model

OV = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
F = TensorProto.FLOAT


def _save(path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
          outputs: list[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
B = np.array([0.5, -0.25, 1.0], dtype=np.float32)


def dense(path: Path) -> Path:
    """``relu(x @ W + B)``: every node is one OpenVINO runs."""
    return _save(path, [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
                        helper.make_node("Relu", ["a"], ["y"])],
                 [helper.make_tensor_value_info("x", F, ["N", 4])], [helper.make_tensor_value_info("y", F, ["N", 3])],
                 [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])


def dense_then_scaler(path: Path) -> Path:
    """The dense block, then an ai.onnx.ml Scaler (OpenVINO leaves it to CPU): 1 of 4 nodes on CPU."""
    return _save(path, [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
                        helper.make_node("Relu", ["a"], ["r"]),
                        helper.make_node("Scaler", ["r"], ["y"], domain="ai.onnx.ml", offset=[0.0] * 3,
                                         scale=[2.0] * 3)],
                 [helper.make_tensor_value_info("x", F, ["N", 4])], [helper.make_tensor_value_info("y", F, ["N", 3])],
                 [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])


def scaler_then_dense(path: Path) -> Path:
    """A Scaler feeding a MatMul: OpenVINO's subgraph gets an input of unknown rank and will not compile."""
    return _save(path, [helper.make_node("Scaler", ["x"], ["s"], domain="ai.onnx.ml", offset=[0.0] * 4,
                                         scale=[1.0] * 4),
                        helper.make_node("MatMul", ["s", "w"], ["y"])],
                 [helper.make_tensor_value_info("x", F, ["N", 4])], [helper.make_tensor_value_info("y", F, ["N", 3])],
                 [numpy_helper.from_array(W, "w")])


def int64_add(path: Path) -> Path:
    return _save(path, [helper.make_node("Add", ["a", "b"], ["c"])],
                 [helper.make_tensor_value_info("a", TensorProto.INT64, ["N"]),
                  helper.make_tensor_value_info("b", TensorProto.INT64, ["N"])],
                 [helper.make_tensor_value_info("c", TensorProto.INT64, ["N"])])


def expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W + B, 0)


def test_this_environment_has_openvino() -> None:
    assert OV in ort.get_available_providers()


def test_a_model_openvino_takes_whole_is_served_there_and_reported_full(tmp_path: Path) -> None:
    model = load_model(dense(tmp_path / "dense.onnx"), finite_inputs=True)
    assert (model.provider, model.placement, model.cpu_nodes, model.graph_nodes) == (OV, "full", 0, 3)
    assert model.fallback == ""
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.run({"x": x})[0], expected(x), rtol=1e-4, atol=1e-5)


def test_a_model_openvino_takes_in_part_is_reported_partial_with_its_cpu_nodes(tmp_path: Path) -> None:
    model = load_model(dense_then_scaler(tmp_path / "part.onnx"), finite_inputs=True)
    assert (model.provider, model.placement, model.cpu_nodes, model.graph_nodes) == (OV, "partial", 1, 4)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(model.run({"x": x})[0], 2 * expected(x), rtol=1e-4)


def test_a_model_openvino_cannot_compile_is_served_on_cpu_with_the_reason(tmp_path: Path) -> None:
    model = load_model(scaler_then_dense(tmp_path / "nocompile.onnx"))
    assert (model.provider, model.placement) == (CPU, "cpu_fallback")
    assert model.fallback.startswith(f"{OV}: onnxruntime cannot load nocompile.onnx")
    # The end of OpenVINO's long message, which says what is wrong, is kept.
    assert "doesn't support Parameter operation with dynamic rank" in model.fallback
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(model.run({"x": x})[0], x @ W, rtol=1e-5)


def test_a_model_whose_int64_results_openvino_changes_is_served_on_cpu(tmp_path: Path) -> None:
    model = load_model(int64_add(tmp_path / "i64.onnx"))
    assert (model.provider, model.placement) == (CPU, "cpu_fallback")
    assert f"{OV}: changes the results on the range probe inputs: output 'c' differs" in model.fallback
    a = np.array([2**40, 5], np.int64)
    b = np.array([1, 2**33], np.int64)
    np.testing.assert_array_equal(model.run({"a": a, "b": b})[0], a + b)


def test_nan_that_openvino_turns_into_numbers_keeps_the_version_on_cpu_unless_inputs_are_finite(
        tmp_path: Path) -> None:
    path = dense(tmp_path / "dense.onnx")
    model = load_model(path)
    assert (model.provider, model.placement) == (CPU, "cpu_fallback")
    assert "NaN where CPU has" in model.fallback
    x = np.array([[np.nan, 1, 2, 3]], np.float32)
    assert np.isnan(model.run({"x": x})[0]).all()


def test_a_version_that_requires_openvino_is_refused_where_openvino_cannot_serve_it(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match=f"requires {OV}, which cannot serve it: onnxruntime cannot load"):
        load_model(scaler_then_dense(tmp_path / "nocompile.onnx"), required=[OV])
    with pytest.raises(ProviderError, match="changes the results"):
        load_model(int64_add(tmp_path / "i64.onnx"), required=[OV])


def test_openvino_options_reach_the_provider(tmp_path: Path) -> None:
    path = dense(tmp_path / "dense.onnx")
    model = load_model(path, finite_inputs=True, provider_options={OV: {"device_type": "CPU", "precision": "FP32"}})
    assert (model.provider, model.placement) == (OV, "full")
    # OpenVINO on a CPU takes FP32 or ACCURACY only, and this machine has no NPU: each option stops it starting.
    for options in ({"precision": "FP16"}, {"device_type": "NPU"}):
        fallen = load_model(path, finite_inputs=True, provider_options={OV: options})
        assert (fallen.provider, fallen.placement) == (CPU, "cpu_fallback")
        assert fallen.fallback == f"{OV}: onnxruntime did not start it (the session runs on {CPU})"
        with pytest.raises(ProviderError, match="did not start it"):
            load_model(path, required=[OV], finite_inputs=True, provider_options={OV: options})


def test_the_registry_reports_each_placement_and_keeps_serving(tmp_path: Path) -> None:
    registry = ModelRegistry()
    files = {"dense": dense(tmp_path / "dense.onnx"), "part": dense_then_scaler(tmp_path / "part.onnx"),
             "nocompile": scaler_then_dense(tmp_path / "nocompile.onnx"), "i64": int64_add(tmp_path / "i64.onnx")}

    async def go() -> dict[str, ModelStatus]:
        try:
            statuses = {name: await registry.load(name, "1", path, finite_inputs=name != "i64")
                        for name, path in files.items()}
            out = await registry.get("nocompile").batcher.submit({"x": np.ones((1, 4), np.float32)})
            np.testing.assert_allclose(out[0], np.ones((1, 4), np.float32) @ W, rtol=1e-5)
            return statuses
        finally:
            await registry.close()

    statuses = asyncio.run(go())
    assert {n: (s.state, s.provider, s.placement_text()) for n, s in statuses.items()} == {
        "dense": ("serving", OV, "full"),
        "part": ("serving", OV, "partial (1 of 4 nodes on CPU)"),
        "nocompile": ("serving", CPU, "cpu fallback"),
        "i64": ("serving", CPU, "cpu fallback"),
    }
    assert "changes the results" in statuses["i64"].fallback

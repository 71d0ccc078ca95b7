"""Small ONNX models built with onnx.helper, for the registry's tests.

Every builder returns the serialized bytes, so a test can also cut, corrupt
or re-point them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgewise-tests")
    model.ir_version = 8
    return model.SerializeToString()


def linear(in_features: int = 32, out_features: int = 8, seed: int = 1) -> bytes:
    """y = x @ W + b with a dynamic batch dimension: x FP32 [-1, in], y FP32 [-1, out]."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((in_features, out_features)).astype(np.float32) * 0.1
    bias = rng.standard_normal(out_features).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _model(graph)


def argmax_classifier(in_features: int = 4, classes: int = 3) -> bytes:
    """Two outputs: FP32 scores and the INT64 class index."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((in_features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["scores"]),
         helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)],
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", in_features])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    return _model(graph)


def relu() -> bytes:
    """Nothing to quantize: a single Relu on a fixed shape."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return _model(graph)


def truncated() -> bytes:
    data = linear()
    return data[: len(data) // 2]


def inconsistent() -> bytes:
    """Parses as ONNX but the graph reads a tensor nothing produces."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"])], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return _model(graph)


def external_data(location: str = "../../etc/passwd", tensor: str = "W") -> bytes:
    """A linear model whose weight claims to live in an external file at ``location``."""
    model = onnx.load_from_string(linear())
    for init in model.graph.initializer:
        if init.name == tensor:
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            entry = init.external_data.add()
            entry.key, entry.value = "location", location
            for key, value in (("offset", "0"), ("length", str(4 * 32 * 8))):
                extra = init.external_data.add()
                extra.key, extra.value = key, value
    return model.SerializeToString()

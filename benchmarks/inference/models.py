"""The two models of the inference benchmark, built with ``onnx.helper`` (nothing is downloaded).

* ``mlp``: 32 features -> 64 hidden -> 8 outputs, a few microseconds per
  call: the server's own costs (HTTP, parsing, batching) dominate.
* ``cnn``: a small VGG-like network on 3x64x64 images (six 3x3 convolutions,
  32 to 128 channels, about 40 M multiply-adds per image), a few hundred
  microseconds per call at batch 1 on one core: the model's own work
  dominates, and batching should bring the server close to raw onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.edge_runtime import onnx_models as om

# (output channels, stride) of each 3x3 convolution, each followed by a Relu.
CNN_LAYERS: tuple[tuple[int, int], ...] = ((32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))
CNN_SIZE = 64
CNN_CLASSES = 10
MLP_FEATURES, MLP_HIDDEN, MLP_OUTPUTS = 32, 64, 8


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    # One request's input: a single row.
    x: np.ndarray


def cnn(path: Path, *, layers: tuple[tuple[int, int], ...] = CNN_LAYERS, size: int = CNN_SIZE,
        classes: int = CNN_CLASSES, seed: int = 0) -> Path:
    """Conv-Relu blocks, GlobalAveragePool, Gemm: x FP32 [N, 3, size, size] -> y FP32 [N, classes]."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    previous, channels = "x", 3
    for i, (width, stride) in enumerate(layers):
        # He initialisation keeps activations in range through the stack.
        kernel = rng.normal(scale=(2.0 / (channels * 9)) ** 0.5, size=(width, channels, 3, 3)).astype(np.float32)
        initializers += [numpy_helper.from_array(kernel, f"k{i}"),
                         numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [previous, f"k{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                   strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        previous, channels = f"r{i}", width
    weights = rng.normal(scale=0.1, size=(channels, classes)).astype(np.float32)
    initializers += [numpy_helper.from_array(weights, "w"),
                     numpy_helper.from_array(np.zeros(classes, np.float32), "b")]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "w", "b"], ["y"])]
    graph = helper.make_graph(
        nodes, "bench_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)], producer_name="edgewise-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build(model_dir: Path) -> dict[str, BenchModel]:
    """Both models in ``model_dir``, with one request's input each."""
    rng = np.random.default_rng(0)
    return {
        "mlp": BenchModel("mlp", om.mlp(model_dir / "mlp.onnx", features=MLP_FEATURES, hidden=MLP_HIDDEN,
                                        outputs=MLP_OUTPUTS),
                          rng.normal(size=(1, MLP_FEATURES)).astype(np.float32)),
        "cnn": BenchModel("cnn", cnn(model_dir / "cnn.onnx"),
                          rng.normal(size=(1, 3, CNN_SIZE, CNN_SIZE)).astype(np.float32)),
    }

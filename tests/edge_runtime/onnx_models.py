"""Small ONNX models built for the tests with ``onnx.helper`` (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgewise-tests")
    # An IR version every onnxruntime of the last years reads.
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_weights(features: int = 4, hidden: int = 8, outputs: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(features, hidden)).astype(np.float32),
        rng.normal(size=(hidden,)).astype(np.float32),
        rng.normal(size=(hidden, outputs)).astype(np.float32),
        rng.normal(size=(outputs,)).astype(np.float32),
    ]


def mlp(path: Path, *, features: int = 4, hidden: int = 8, outputs: int = 3, seed: int = 0) -> Path:
    """``y = relu(x @ w1 + b1) @ w2 + b2``; input ``x`` FP32 [N, features], output ``y`` FP32 [N, outputs]."""
    w1, b1, w2, b2 = mlp_weights(features, hidden, outputs, seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y0"]),
            helper.make_node("Add", ["y0", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip((w1, b1, w2, b2), ("w1", "b1", "w2", "b2"),
                                                                     strict=True)],
    )
    return _save(graph, path)


def mlp_expected(x: np.ndarray, *, features: int = 4, hidden: int = 8, outputs: int = 3, seed: int = 0) -> np.ndarray:
    w1, b1, w2, b2 = mlp_weights(features, hidden, outputs, seed)
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def add_constant(path: Path, constant: float, *, features: int = 4) -> Path:
    """``y = x + constant``, x FP32 [N, features]: each version tells which one answered."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
        initializer=[numpy_helper.from_array(np.array([constant], dtype=np.float32), "c")],
    )
    return _save(graph, path)


def fixed_batch(path: Path, *, batch: int = 2, features: int = 3) -> Path:
    """``y = 2 * x`` with a fixed batch dimension: x FP32 [batch, features]; never stacked."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fixed_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, features])],
        initializer=[numpy_helper.from_array(np.array([2.0], dtype=np.float32), "two")],
    )
    return _save(graph, path)


def gather(path: Path, *, features: int = 4) -> Path:
    """``y[i] = x[i, idx[i]]``: x FP32 [N, features], idx INT64 [N, 1] -> y FP32 [N, 1].

    Runs for indices in range (the smoke test's zeros are) and fails for an
    index past ``features``: a model that fails on some inputs only.
    """
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
        "gather",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
    )
    return _save(graph, path)


def fails_smoke_test(path: Path) -> Path:
    """A valid file that cannot run on a single row: reshapes [N, 4] to [-1, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "fails_smoke_test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "shape")],
    )
    return _save(graph, path)


def strings(path: Path) -> Path:
    """``y = x`` for a string tensor x [N]: BYTES in and out."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["N"])],
    )
    return _save(graph, path)


def cnn(path: Path, *, channels: int = 3, size: int = 32, filters: int = 16, classes: int = 10, seed: int = 0) -> Path:
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Gemm: x FP32 [N, channels, size, size] -> logits [N, classes]."""
    rng = np.random.default_rng(seed)
    k1 = rng.normal(scale=0.1, size=(filters, channels, 3, 3)).astype(np.float32)
    k2 = rng.normal(scale=0.1, size=(filters, filters, 3, 3)).astype(np.float32)
    w = rng.normal(scale=0.1, size=(filters, classes)).astype(np.float32)
    b = np.zeros((classes,), dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "k1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "w", "b"], ["y"]),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip((k1, k2, w, b), ("k1", "k2", "w", "b"),
                                                                     strict=True)],
    )
    return _save(graph, path)


# Running the model server inside a test -------------------------------------------

class LoopThread:
    """An asyncio loop on its own thread, so that tests can talk to a real server with blocking clients."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ServerUnderTest:
    """A registry and a real OIP server on loopback, on a :class:`LoopThread`."""

    def __init__(self, **server_options: Any) -> None:
        from edge_runtime.serving import ModelRegistry, run_server

        self.thread = LoopThread()
        self.registry = ModelRegistry(inference_threads=2)
        self.handle = self.thread.run(run_server(self.registry, "127.0.0.1", 0, **server_options))
        self.url = self.handle.url

    def load(self, name: str, version: str, path: Path, **options: Any) -> Any:
        return self.thread.run(self.registry.load(name, version, path, **options))

    def metric(self, text: str, name: str, **labels: str) -> float:
        """The value of one series in a /metrics page."""
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no series {name}{{{wanted}}} in the metrics page")

    def close(self) -> None:
        self.thread.run(self.handle.stop())
        self.thread.run(self.registry.close())
        self.thread.close()


class Hammer:
    """Threads posting one JSON request to ``path`` until stopped, keeping (model_version, first output
    element minus ``offset``) of each answer, or the failure. ``per_connection`` requests on each
    connection (None: one connection each for the whole run)."""

    def __init__(self, url: str, path: str, request: dict[str, Any], *, offset: float = 0.0, threads: int = 6,
                 per_connection: int | None = None) -> None:
        import threading

        self.url, self.path, self.request, self.offset = url, path, request, offset
        self.per_connection = per_connection
        self.stop = threading.Event()
        # (monotonic time the request was sent, model_version, value) of each answer.
        self.answers: list[tuple[float, str, float]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        import time

        import httpx

        while not self.stop.is_set():
            with httpx.Client(base_url=self.url, timeout=30) as client:
                on_connection = 0
                while not self.stop.is_set() and (self.per_connection is None or on_connection < self.per_connection):
                    on_connection += 1
                    at = time.monotonic()
                    response = client.post(self.path, json=self.request)
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text}")
                        continue
                    body = response.json()
                    self.answers.append((at, body["model_version"], body["outputs"][0]["data"][0] - self.offset))

    @property
    def seen(self) -> list[tuple[str, float]]:
        """(model_version, value) of each answer, in the order they came."""
        return [(version, value) for _, version, value in self.answers]

    def wait_for(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` answers or failures in all, or ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        while len(self.answers) + len(self.failures) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

"""Fallback and truthful placement, with an accelerator this CPU machine lacks put in through the loader's seam.

The seam is what opens a session (``session_factory``) and what the build
offers (``available``). The stand-in accelerator is a real CPU session of the
model that says it runs on ``CUDAExecutionProvider``, and fails, changes its
answers or writes the profile an accelerator would, as each test needs. Where
it runs at all, the answers are real onnxruntime answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.protocol import ModelStatus
from edge_runtime.serving import LoadError, ModelRegistry, ProviderError, load_model, probes
from edge_runtime.serving.loader import TensorSpec
from tests.edge_runtime import onnx_models as om

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
NODE = [CUDA, CPU]


class FakeAccelerator:
    """A CPU session that claims ``CUDA`` and behaves as told."""

    def __init__(self, path: str, options: ort.SessionOptions, *, fail_run: bool, change: bool,
                 cpu_kernels: int, accelerator_kernels: int, folder: Path) -> None:
        self.inner = ort.InferenceSession(path, providers=[CPU])
        self.fail_run, self.change = fail_run, change
        self.cpu_kernels, self.accelerator_kernels = cpu_kernels, accelerator_kernels
        self.folder = folder
        self.runs = 0

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]

    def get_inputs(self) -> Any:
        return self.inner.get_inputs()

    def get_outputs(self) -> Any:
        return self.inner.get_outputs()

    def run(self, names: Any, feeds: Any) -> list[Any]:
        self.runs += 1
        if self.fail_run:
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")
        outputs = self.inner.run(names, feeds)
        return [o + 1 for o in outputs] if self.change else outputs

    def end_profiling(self) -> str:
        events = [{"cat": "Node", "name": f"n{i}_kernel_time", "args": {"provider": CPU, "op_name": "Add"}}
                  for i in range(self.cpu_kernels)]
        events += [{"cat": "Node", "name": f"CUDA_subgraph_{i}_kernel_time",
                    "args": {"provider": CUDA, "op_name": "Gemm"}} for i in range(self.accelerator_kernels)]
        events.append({"cat": "Node", "name": "copy_kernel_time", "args": {"provider": CPU, "op_name": "MemcpyToHost"}})
        path = self.folder / "profile.json"
        path.write_text(json.dumps(events))
        return str(path)


def accelerator(tmp_path: Path, *, fail_load: bool = False, fail_run: bool = False, change: bool = False,
                cpu_kernels: int = 0, accelerator_kernels: int = 1) -> tuple[Callable[..., Any], list[list[str]]]:
    """A session factory whose CUDA sessions are :class:`FakeAccelerator`; and the provider lists it was asked for."""
    asked: list[list[str]] = []

    def factory(path: str, options: ort.SessionOptions, providers: list[str], provider_options: Any) -> Any:
        asked.append(list(providers))
        if providers[0] != CUDA:
            return ort.InferenceSession(path, sess_options=options, providers=providers)
        if fail_load:
            raise RuntimeError("CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected")
        return FakeAccelerator(path, options, fail_run=fail_run, change=change, cpu_kernels=cpu_kernels,
                               accelerator_kernels=accelerator_kernels, folder=tmp_path)

    return factory, asked


def test_a_provider_that_takes_the_whole_graph_serves_and_is_reported_full(tmp_path: Path) -> None:
    factory, asked = accelerator(tmp_path, accelerator_kernels=2)
    model = load_model(om.mlp(tmp_path / "m.onnx"), available=NODE, session_factory=factory)
    assert (model.provider, model.placement, model.cpu_nodes, model.graph_nodes) == (CUDA, "full", 0, 5)
    assert model.fallback == ""
    # Compared with CPU, on a CPU session of its own.
    assert asked == [[CUDA, CPU], [CPU]]


def test_a_provider_that_leaves_nodes_to_cpu_is_reported_partial_with_how_many(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, cpu_kernels=2, accelerator_kernels=1)
    model = load_model(om.mlp(tmp_path / "m.onnx"), available=NODE, session_factory=factory)
    assert (model.provider, model.placement, model.cpu_nodes, model.graph_nodes) == (CUDA, "partial", 2, 5)


def test_a_provider_that_takes_none_of_the_graph_is_not_used_and_cpu_is_reported_as_fallback(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, cpu_kernels=5, accelerator_kernels=0)
    model = load_model(om.mlp(tmp_path / "m.onnx"), available=NODE, session_factory=factory)
    assert (model.provider, model.placement, model.cpu_nodes) == (CPU, "cpu_fallback", 5)
    assert model.fallback == f"{CUDA}: it takes none of the graph's nodes (5 ran on CPU)"


@pytest.mark.parametrize(("fault", "reason"), [
    ({"fail_load": True}, "onnxruntime cannot load m.onnx: CUDA_ERROR_NO_DEVICE"),
    ({"fail_run": True}, "smoke test of m.onnx failed: CUDA failure 700"),
    ({"change": True}, "changes the results on the plain probe inputs: output 'y' differs beyond rtol 0.0001"),
])
def test_a_failing_or_wrong_provider_falls_back_to_cpu_with_its_reason(tmp_path: Path, fault: dict[str, bool],
                                                                      reason: str) -> None:
    factory, _ = accelerator(tmp_path, **fault)
    path = om.mlp(tmp_path / "m.onnx")
    model = load_model(path, available=NODE, session_factory=factory)
    assert (model.provider, model.placement) == (CPU, "cpu_fallback")
    assert model.fallback.startswith(f"{CUDA}: ")
    assert reason in model.fallback
    # It serves, with CPU's answers.
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(model.run({"x": x})[0], om.mlp_expected(x), rtol=1e-5)


def test_a_wider_tolerance_set_by_the_version_accepts_the_difference(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, change=True)
    model = load_model(om.mlp(tmp_path / "m.onnx"), available=NODE, session_factory=factory, atol=2.0)
    assert (model.provider, model.placement) == (CUDA, "full")


def test_a_required_provider_that_fails_is_a_refusal_not_a_fallback(tmp_path: Path) -> None:
    factory, asked = accelerator(tmp_path, fail_run=True)
    with pytest.raises(ProviderError, match=f"requires {CUDA}, which cannot serve it: smoke test of m.onnx failed"):
        load_model(om.mlp(tmp_path / "m.onnx"), required=[CUDA], available=NODE, session_factory=factory)
    assert asked == [[CUDA, CPU]]


def test_a_required_provider_that_runs_none_of_the_graph_is_refused(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, cpu_kernels=5, accelerator_kernels=0)
    with pytest.raises(ProviderError, match="takes none of the graph's nodes"):
        load_model(om.mlp(tmp_path / "m.onnx"), required=[CUDA], available=NODE, session_factory=factory)


def test_a_forbidden_provider_is_never_tried(tmp_path: Path) -> None:
    factory, asked = accelerator(tmp_path)
    model = load_model(om.mlp(tmp_path / "m.onnx"), forbidden=[CUDA], available=NODE, session_factory=factory)
    assert (model.provider, model.placement, model.fallback) == (CPU, "cpu", "")
    assert asked == [[CPU]]


def test_a_node_limited_to_cpu_uses_cpu_whatever_the_version_prefers(tmp_path: Path) -> None:
    factory, asked = accelerator(tmp_path)
    model = load_model(om.mlp(tmp_path / "m.onnx"), preferred=[CUDA], only=[CPU], available=NODE,
                       session_factory=factory)
    assert (model.provider, model.placement) == (CPU, "cpu")
    assert asked == [[CPU]]


def test_provider_options_reach_the_session(tmp_path: Path) -> None:
    seen: list[Any] = []
    factory, _ = accelerator(tmp_path)

    def recording(path: str, options: ort.SessionOptions, providers: list[str], provider_options: Any) -> Any:
        seen.append((providers, provider_options))
        return factory(path, options, providers, provider_options)

    load_model(om.mlp(tmp_path / "m.onnx"), available=NODE, session_factory=recording,
               provider_options={CUDA: {"device_id": 1, "cudnn_conv_use_max_workspace": True}})
    assert seen[0] == ([CUDA, CPU], [{"device_id": "1", "cudnn_conv_use_max_workspace": "1"}, {}])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"preferred": ["OpenVinoExecutionProvider"]},
     "providers: 'OpenVinoExecutionProvider' is not an execution provider onnxruntime knows "
     "(did you mean OpenVINOExecutionProvider?)"),
    ({"required": ["CUDA"]}, "required_providers: 'CUDA' is not an execution provider onnxruntime knows"),
    ({"forbidden": [CPU]}, "CPUExecutionProvider cannot be forbidden"),
    ({"provider_options": {"TensorRT": {"trt_fp16_enable": "1"}}}, "provider_options: 'TensorRT' is not"),
    ({"preferred": ["AzureExecutionProvider"]}, "calls a remote endpoint"),
    ({"only": ["CPUExecutionProvder"]}, "the node's providers: 'CPUExecutionProvder' is not"),
])
def test_a_misspelled_or_unusable_provider_name_is_a_refusal_naming_it(tmp_path: Path, kwargs: dict[str, Any],
                                                                      message: str) -> None:
    with pytest.raises(ProviderError) as caught:
        load_model(om.mlp(tmp_path / "m.onnx"), **kwargs)
    assert message in str(caught.value)


def test_the_registry_keeps_serving_on_cpu_and_reports_the_fallback(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, fail_load=True)
    registry = ModelRegistry(available=NODE, session_factory=factory)

    async def go() -> tuple[ModelStatus, list[np.ndarray]]:
        try:
            status = await registry.load("m", "1", om.mlp(tmp_path / "m.onnx"), providers=[CUDA])
            served = registry.get("m")
            x = np.ones((1, 4), np.float32)
            return status, await served.batcher.submit({"x": x})
        finally:
            await registry.close()

    status, outputs = asyncio.run(go())
    assert (status.state, status.provider, status.placement) == ("serving", CPU, "cpu_fallback")
    assert status.placement_text() == "cpu fallback"
    assert "CUDA_ERROR_NO_DEVICE" in status.fallback
    np.testing.assert_allclose(outputs[0], om.mlp_expected(np.ones((1, 4), np.float32)), rtol=1e-5)


def test_the_probes_span_each_type_and_a_difference_names_the_output() -> None:
    specs = [TensorSpec("f", "FP32", (-1, 3)), TensorSpec("i", "INT64", (-1,)), TensorSpec("b", "BOOL", (2,))]
    feeds = probes.range_inputs(specs)
    assert np.isnan(feeds["f"]).any() and np.isinf(feeds["f"]).any()
    assert feeds["i"].max() > 2**31 and feeds["i"].min() < -(2**31)
    assert set(feeds["b"].tolist()) == {True, False}
    finite = probes.range_inputs(specs, finite=True)
    assert np.isfinite(finite["f"]).all()
    cut = (feeds["i"].astype(np.int32)).astype(np.int64)
    assert "output 'c' differs" in (probes.difference(["c"], [cut], [feeds["i"]], rtol=0, atol=0) or "")
    lost_nan = np.nan_to_num(feeds["f"], nan=0.0)
    assert "NaN" in (probes.difference(["y"], [lost_nan], [feeds["f"]], rtol=1e-4, atol=1e-5) or "")
    assert probes.difference(["y"], [feeds["f"]], [feeds["f"].copy()], rtol=0, atol=0) is None


def test_the_model_files_nodes_are_counted_without_onnx(tmp_path: Path) -> None:
    assert probes.graph_nodes(om.mlp(tmp_path / "m.onnx")) == 5
    assert probes.graph_nodes(om.cnn(tmp_path / "c.onnx")) > 5
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
    assert probes.graph_nodes(tmp_path / "junk.onnx") == 0


def test_load_error_when_cpu_also_fails_says_what_was_tried(tmp_path: Path) -> None:
    factory, _ = accelerator(tmp_path, fail_load=True)
    with pytest.raises(LoadError, match=r"smoke test of bad.onnx failed.*tried before CPU: CUDAExecutionProvider"):
        load_model(om.fails_smoke_test(tmp_path / "bad.onnx"), available=NODE, session_factory=factory)


def test_the_nodes_provider_list_is_checked_when_the_node_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--providers", "CUDAExecutionProvider,OpenVINOExecutionprovider", "/nonexistent"])
    assert exited.value.code == 2
    assert ("--providers: 'OpenVINOExecutionprovider' is not an execution provider onnxruntime knows "
            "(did you mean OpenVINOExecutionProvider?)") in capsys.readouterr().err


def test_the_hardware_profile_offers_placement_only_providers_that_compute() -> None:
    from edge_runtime.hardware import execution_providers
    from edge_runtime.policy.placement import node_facts

    assert "AzureExecutionProvider" in ort.get_available_providers()  # this build lists it
    assert "AzureExecutionProvider" not in execution_providers()
    assert CPU in execution_providers()
    facts = node_facts("server", {"execution_providers": ["AzureExecutionProvider", CPU]})
    assert facts.execution_providers == (CPU,)

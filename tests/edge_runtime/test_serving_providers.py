"""Execution provider choice and signature reading, with the real onnxruntime of this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.serving import LoadError, ModelRegistry, ProviderError, load_model, select_providers
from edge_runtime.serving.loader import available_providers
from tests.edge_runtime import onnx_models as om

GPU_NODE = ["CUDAExecutionProvider", "TensorrtExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"]


def test_it_orders_providers_by_priority_among_those_available() -> None:
    assert select_providers(available=GPU_NODE) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(available=["CPUExecutionProvider", "OpenVINOExecutionProvider"]) == [
        "OpenVINOExecutionProvider", "CPUExecutionProvider"]


def test_it_puts_the_models_own_preference_first_and_cpu_last() -> None:
    chosen = select_providers(preferred=["CPUExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider"],
                              available=GPU_NODE)
    assert chosen == ["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(priority=["CUDAExecutionProvider"], available=GPU_NODE) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_it_never_picks_the_azure_provider_to_compute() -> None:
    assert "AzureExecutionProvider" not in available_providers()
    assert "AzureExecutionProvider" not in select_providers(preferred=["AzureExecutionProvider"], available=GPU_NODE)


def test_it_refuses_a_model_whose_required_provider_is_missing() -> None:
    with pytest.raises(ProviderError, match="requires ROCMExecutionProvider, which this node lacks"):
        select_providers(required=["ROCMExecutionProvider"], available=GPU_NODE)


def test_it_refuses_to_load_where_a_required_provider_is_missing(tmp_path: Path) -> None:
    import asyncio

    missing = next(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                   if p not in ort.get_available_providers())
    registry = ModelRegistry()

    async def go() -> object:
        try:
            return await registry.load("m", "1", om.mlp(tmp_path / "m.onnx"), required_providers=[missing])
        finally:
            await registry.close()

    status = asyncio.run(go())
    assert status.state == "refused"  # type: ignore[attr-defined]
    assert f"requires {missing}, which this node lacks" in status.error  # type: ignore[attr-defined]
    assert status.serving_version is None  # type: ignore[attr-defined]


def test_it_records_the_provider_a_session_actually_uses(tmp_path: Path) -> None:
    model = load_model(om.mlp(tmp_path / "m.onnx"), preferred=["CUDAExecutionProvider"])
    assert model.provider == model.session.get_providers()[0]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert model.provider == "CPUExecutionProvider"


def test_it_reads_the_signature_with_dynamic_dims_as_minus_one(tmp_path: Path) -> None:
    model = load_model(om.gather(tmp_path / "g.onnx"))
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("x", "FP32", (-1, 4)), ("idx", "INT64", (-1, 1))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("y", "FP32", (-1, 1))]
    assert model.batchable
    fixed = load_model(om.fixed_batch(tmp_path / "f.onnx"))
    assert fixed.inputs[0].shape == (2, 3)
    assert not fixed.batchable
    strings = load_model(om.strings(tmp_path / "s.onnx"))
    assert strings.inputs[0].datatype == "BYTES"
    np.testing.assert_array_equal(strings.run({"x": np.array(["a"], dtype=object)})[0], ["a"])


def test_it_smoke_tests_before_use(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="smoke test of bad.onnx failed"):
        load_model(om.fails_smoke_test(tmp_path / "bad.onnx"))


def test_it_gives_sessions_a_thread_pool_that_does_not_spin_and_times_a_warm_run(tmp_path: Path) -> None:
    model = load_model(om.mlp(tmp_path / "m.onnx"))
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # The quickest of the warm runs, never slower than the first run that allocated.
    assert 0 < model.warm_run_seconds <= model.smoke_seconds


def test_it_sizes_the_thread_pool_to_the_cpus_the_process_may_use() -> None:
    # One CPU left to the process, as a container's CPU set or taskset would.
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edge_runtime.serving.loader import session_options; "
            "print(session_options().intra_op_num_threads, session_options(3).intra_op_num_threads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    # With every CPU usable, onnxruntime sizes its own pool (0); with fewer, one thread per usable CPU.
    assert out == (["1", "3"] if (os.cpu_count() or 1) > 1 else ["0", "3"])


def test_it_runs_two_instances_on_cpu_and_one_on_an_accelerator() -> None:
    code = ("import os, sys; os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(sys.argv[1])])); "
            "from edge_runtime.serving.loader import auto_instances, instance_threads; "
            "print(auto_instances(['CPUExecutionProvider']), auto_instances(['CUDAExecutionProvider', "
            "'CPUExecutionProvider']), instance_threads(1), instance_threads(2))")
    root = Path(__file__).resolve().parents[2]

    def with_cpus(n: int) -> list[str]:
        return subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True,
                              cwd=root).stdout.split()

    # One CPU: one instance with onnxruntime's own pool size.
    assert with_cpus(1) == ["1", "1", "0", "1"]
    if len(os.sched_getaffinity(0)) >= 2:
        # Two CPUs: two single-threaded instances on CPU, one on the accelerator.
        assert with_cpus(2) == ["2", "1", "0", "1"]


def test_each_instance_gets_its_share_of_the_cpus(tmp_path: Path) -> None:
    path = om.mlp(tmp_path / "m.onnx")
    cpus = len(os.sched_getaffinity(0))
    model = load_model(path, instances=2)
    assert model.instances == 2
    assert model.session.get_session_options().intra_op_num_threads == max(1, cpus // 2)
    auto = load_model(path, instances=0)
    assert auto.instances == (2 if cpus >= 2 else 1)

"""What the OpenVINO environment is for: onnxruntime's OpenVINO provider, and the edge runtime beside it."""

from __future__ import annotations

import importlib.metadata

import onnxruntime


def test_it_has_the_openvino_execution_provider() -> None:
    assert "OpenVINOExecutionProvider" in onnxruntime.get_available_providers()


def test_it_has_the_openvino_build_of_onnxruntime_alone() -> None:
    providing = sorted(set(importlib.metadata.packages_distributions()["onnxruntime"]))
    assert [name.replace("_", "-").lower() for name in providing] == ["onnxruntime-openvino"]


def test_it_imports_the_edge_runtime_and_its_model_server() -> None:
    import edge_runtime
    from edge_runtime.onnxruntime_variants import check_onnxruntime
    from edge_runtime.serving.loader import available_providers

    assert edge_runtime.__version__
    assert check_onnxruntime() == "onnxruntime-openvino"
    assert "OpenVINOExecutionProvider" in available_providers()

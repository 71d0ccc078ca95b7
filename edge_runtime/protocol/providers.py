"""Execution provider names and options, checked alike at upload (control plane) and at the node.

A misspelled provider name is the mistake that otherwise fails silently: a
preference for ``OpenVinoExecutionProvider`` matches nothing, and the model
runs on CPU without a word. Every list of provider names a version or a node
gives is therefore checked against the names onnxruntime knows, and one it
does not know is an error that names it (with the closest known name).

The list is written here rather than read from ``onnxruntime.get_all_providers()``
so that the control plane checks the same names whatever onnxruntime build it
has; a node adds its own build's names (a provider newer than this list).

Provider options (``{"OpenVINOExecutionProvider": {"device_type": "GPU",
"precision": "FP16"}}``) are passed to onnxruntime as strings; their keys are
the provider's own, which only the provider can check (a node reports a
session that an option stopped from loading as a fallback with the reason).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

CPU = "CPUExecutionProvider"
KNOWN_PROVIDERS: frozenset[str] = frozenset({
    "NvTensorRTRTXExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider",
    "MIGraphXExecutionProvider", "ROCMExecutionProvider", "OpenVINOExecutionProvider", "DnnlExecutionProvider",
    "VitisAIExecutionProvider", "QNNExecutionProvider", "NnapiExecutionProvider", "VSINPUExecutionProvider",
    "JsExecutionProvider", "CoreMLExecutionProvider", "ArmNNExecutionProvider", "ACLExecutionProvider",
    "DmlExecutionProvider", "RknpuExecutionProvider", "WebNNExecutionProvider", "WebGpuExecutionProvider",
    "XnnpackExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider", CPU,
})
# Listed by onnxruntime but not a place to run a graph: the Azure provider
# calls a remote endpoint, and inference never waits on the network.
NON_COMPUTE_PROVIDERS: frozenset[str] = frozenset({"AzureExecutionProvider"})
MAX_PROVIDERS = 16
MAX_OPTIONS = 32
MAX_OPTION_CHARS = 200


class ProviderNameError(ValueError):
    """A provider name or option that cannot be used; the message names it."""


def check_names(names: Iterable[str], field: str, *, known: Iterable[str] = ()) -> list[str]:
    """``names`` as a list, each a known compute provider; a ProviderNameError naming the first that is not."""
    allowed = KNOWN_PROVIDERS | frozenset(known)
    checked: list[str] = []
    for name in names:
        if not isinstance(name, str) or name not in allowed:
            close = difflib.get_close_matches(str(name), sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ProviderNameError(f"{field}: {name!r} is not an execution provider onnxruntime knows{hint}")
        if name in NON_COMPUTE_PROVIDERS:
            raise ProviderNameError(f"{field}: {name} calls a remote endpoint and cannot run a model on a node")
        if name not in checked:
            checked.append(name)
    if len(checked) > MAX_PROVIDERS:
        raise ProviderNameError(f"{field}: at most {MAX_PROVIDERS} providers")
    return checked


def check_forbidden(names: Iterable[str], *, known: Iterable[str] = ()) -> list[str]:
    """Providers a version must not run on; CPU cannot be one (onnxruntime places what others leave on it)."""
    checked = check_names(names, "forbidden_providers", known=known)
    if CPU in checked:
        raise ProviderNameError("forbidden_providers: CPUExecutionProvider cannot be forbidden (onnxruntime runs "
                                "every node no other provider takes on it); require a provider instead")
    return checked


def check_options(options: Mapping[str, Any] | None, *, known: Iterable[str] = ()) -> dict[str, dict[str, str]]:
    """Provider options as ``{provider: {key: str}}``; a ProviderNameError naming what is wrong."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise ProviderNameError("provider_options: must map provider names to their options")
    checked: dict[str, dict[str, str]] = {}
    for provider, values in options.items():
        check_names([provider], "provider_options", known=known)
        if not isinstance(values, Mapping):
            raise ProviderNameError(f"provider_options: {provider}: must map option names to values")
        if len(values) > MAX_OPTIONS:
            raise ProviderNameError(f"provider_options: {provider}: at most {MAX_OPTIONS} options")
        entry: dict[str, str] = {}
        for key, value in values.items():
            if not isinstance(key, str) or not key or len(key) > MAX_OPTION_CHARS:
                raise ProviderNameError(f"provider_options: {provider}: option names are short non-empty strings")
            if isinstance(value, bool):
                value = "1" if value else "0"
            if not isinstance(value, str | int | float) or len(str(value)) > MAX_OPTION_CHARS:
                raise ProviderNameError(f"provider_options: {provider}: {key}: must be a string, number or "
                                        f"boolean of at most {MAX_OPTION_CHARS} characters")
            entry[key] = str(value)
        checked[provider] = entry
    return checked

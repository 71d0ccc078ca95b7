"""The node's model server: ONNX models behind the Open Inference Protocol.

* :mod:`.loader` picks the execution provider, reads the signature, smoke-tests;
* :mod:`.registry` holds the served versions, swaps them hot, keeps the last good one;
* :mod:`.batcher` batches concurrent requests per model version;
* :mod:`.app` is the OIP v2 REST API (JSON and binary tensors) and ``/metrics``;
* :mod:`.request` reads an inference request into the model's feeds, :mod:`.answer` writes its answer;
* :mod:`.plans` keeps what the request path works out once per request shape;
* :mod:`.http` is the node's own HTTP/1.1 layer, :mod:`.http_server` the side that accepts and sweeps;
* :mod:`.server` runs it on an asyncio loop (:func:`run_server`);
* :mod:`.workers` serves from several processes on one port (``python -m edge_runtime.serving.worker``);
* :mod:`.standalone` serves a folder of ``.onnx`` files with no control plane.

Importing any of them first checks that an onnxruntime variant is installed
(:func:`~edge_runtime.onnxruntime_variants.require_onnxruntime`), so an
environment without one gets the extras to install rather than a bare
``ModuleNotFoundError`` from deep inside.
"""

# The check has to run between the imports: E402 for this module only.
# ruff: noqa: E402
from __future__ import annotations

from edge_runtime.onnxruntime_variants import require_onnxruntime

require_onnxruntime()

from edge_runtime.serving.app import DEFAULT_MAX_BODY_BYTES, OIPApp
from edge_runtime.serving.loader import (
    DEFAULT_PROVIDER_PRIORITY,
    LoadedModel,
    LoadError,
    ProviderError,
    load_model,
    select_providers,
)
from edge_runtime.serving.registry import ModelNotFound, ModelRegistry
from edge_runtime.serving.server import ServerError, ServerHandle, run_server

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PROVIDER_PRIORITY",
    "LoadError",
    "LoadedModel",
    "ModelNotFound",
    "ModelRegistry",
    "OIPApp",
    "ProviderError",
    "ServerError",
    "ServerHandle",
    "load_model",
    "run_server",
    "select_providers",
]

"""The answer to an inference: the model's outputs as OIP JSON or binary tensors, in the order asked for.

Every answer is what the Open Inference Protocol says, byte for byte the same
whichever path wrote it: the cached heads (per request id and shape) and the
JSON plans' fixed parts give the same bytes as the full writer. JSON has no
NaN or Infinity: a float output's non-finite elements are written as the
strings "NaN", "Infinity" and "-Infinity" (as protobuf's JSON mapping does),
so that every answer is JSON a strict parser reads; numpy and tritonclient
read them back as floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.serving.plans import JsonOutputs, remember
from edge_runtime.serving.registry import ServedVersion
from edge_runtime.serving.tensors import (
    ORJSON_ARRAY_TYPES,
    Array,
    json_bytes,
    to_binary,
    to_json_data,
    to_json_data_safe,
)

Headers = list[tuple[bytes, bytes]]

JSON_TYPE: Headers = [(b"content-type", b"application/json")]


def error_body(message: str) -> bytes:
    return json_bytes({"error": message})


def respond(served: ServedVersion, request: dict[str, Any], outputs: list[Array],
            wanted: list[tuple[str, bool]]) -> tuple[int, Headers, bytes]:
    if type(wanted) is JsonOutputs:
        answer = wanted.answer(served, request, outputs)
        if answer is not None:
            return 200, JSON_TYPE, answer
    index = served.model.output_index
    if wanted and all(binary for _, binary in wanted):
        # Every output binary: the JSON head depends only on the id and the shapes (an
        # output's type is the model's), so it is built once per shape and the answer is
        # that head and the outputs' bytes.
        arrays = [outputs[index[name]] for name, _ in wanted]
        key = (request.get("id"), tuple(wanted), *[a.shape for a in arrays])
        cached = served.answer_heads.get(key)
        if cached is None and all(a.dtype.kind in "biuf" for a in arrays):
            status, headers, body = respond_whole(served, request, outputs, wanted)
            split = int(dict(headers)[b"inference-header-content-length"])
            cached = (headers, body[:split])
            remember(served.answer_heads, key, cached)
        if cached is not None:
            headers, head = cached
            return 200, headers, b"".join([head, *[a.tobytes() if a.flags.c_contiguous and
                                                   a.dtype.byteorder != ">" else to_binary(a)
                                                   for a in arrays]])
    return respond_whole(served, request, outputs, wanted)


def respond_whole(served: ServedVersion, request: dict[str, Any], outputs: list[Array],
                  wanted: list[tuple[str, bool]]) -> tuple[int, Headers, bytes]:
    """The answer written out in full, with no cached part (what every other path must equal)."""
    index = served.model.output_index
    specs = served.model.outputs
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        i = index[name]
        array = outputs[i]
        tensor: dict[str, Any] = {"name": name, "datatype": specs[i].datatype, "shape": list(array.shape)}
        if binary:
            blob = to_binary(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype in ORJSON_ARRAY_TYPES:
            # orjson writes a contiguous numeric array itself; ravel()
            # is a view for the contiguous outputs onnxruntime returns.
            tensor["data"] = array.ravel()
        else:
            tensor["data"] = to_json_data(array)
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if "id" in request:
        response["id"] = request["id"]
    response["outputs"] = tensors
    head = json_bytes(response)
    if b"null" in head and not all(_finite(t["data"]) for t in tensors if isinstance(t.get("data"), np.ndarray)):
        # orjson wrote NaN or Infinity as null, which reads back as neither: write them as strings.
        for t in tensors:
            if isinstance(t.get("data"), np.ndarray):
                t["data"] = to_json_data_safe(t["data"])
        head = json_bytes(response)
    if not blobs:
        return 200, JSON_TYPE, head
    return 200, [(b"content-type", b"application/octet-stream"),
                 (b"inference-header-content-length", str(len(head)).encode())], b"".join([head, *blobs])


def _finite(array: Array) -> bool:
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())

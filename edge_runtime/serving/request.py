"""An inference request read into the model's feeds, or refused with a 4xx naming the input and the problem.

Nothing a client sends gets past here unchecked: JSON nested past what the
readers take, data that does not convert to the input's datatype, text that
is not UTF-8, a body that decompresses past the limit, and dimensions larger
than the body could carry are :class:`BadRequest` (or 413) before the model
sees them. A request of a layout already checked once takes its plan
(:mod:`.plans`) and only its numbers or bytes are read.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import orjson

from edge_runtime.serving.plans import JsonPlan, RequestPlan, json_plan_feeds, remember
from edge_runtime.serving.registry import ServedVersion
from edge_runtime.serving.tensors import Array, TensorError, from_binary, from_json

HEADER_LENGTH = b"inference-header-content-length"
# The binary part of a request that has none.
_NO_BYTES = memoryview(b"")

# What a parsed request is: the request object, the model's feeds, and the outputs wanted (name, binary).
Parsed = tuple[dict[str, Any], dict[str, Array], list[tuple[str, bool]]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def parse_request(served: ServedVersion, body: bytes, headers: dict[bytes, bytes]) -> Parsed:
    """The request, its feeds and its wanted outputs, from a plan when one fits. Raises HTTPError."""
    header_length = headers.get(HEADER_LENGTH)
    if header_length is None:
        request = _loads(body)
        if type(request) is dict:
            fast = json_plan_feeds(served, request)
            if fast is not None:
                # The same layout as an earlier request's: only the numbers are new.
                return request, *fast
        return _parse_checked(served, request, body, _NO_BYTES, len(body), binary_request=False)
    if not header_length.isdigit() or int(header_length) > len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length.decode(errors='replace')!r} "
                         f"does not fit a body of {len(body)} bytes")
    split = int(header_length)
    head, binary = body[:split], memoryview(body)[split:]
    plan = served.request_plans.get(head)
    if plan is not None and len(binary) == plan.size:
        # The same header as an earlier request's: only the tensors' bytes are new.
        return plan.request, plan.feeds(binary), plan.wanted
    return _parse_checked(served, _loads(head), head, binary, len(body), binary_request=True)


def _parse_checked(served: ServedVersion, request: Any, head: bytes, binary: memoryview, body_size: int, *,
                   binary_request: bool) -> Parsed:
    """The full path: every check, then the plan that lets the next request of this layout skip them."""
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object")
    if "id" in request and not isinstance(request["id"], str):
        raise BadRequest("'id' must be a string")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    specs = served.model.inputs_by_name
    feeds: dict[str, Array] = {}
    offset = 0
    for tensor in inputs:
        offset = _read_input(served, tensor, feeds, binary, offset, body_size)
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise BadRequest(f"missing input(s) {', '.join(missing)} for model '{served.name}'")
    if len(feeds) > 1 and served.batcher.stackable:
        rows = {a.shape[0] for a in feeds.values()}
        if len(rows) > 1:
            raise BadRequest(f"inputs disagree on the batch dimension (sizes {sorted(rows)})")
    wanted = wanted_outputs(served, request)
    if binary_request:
        if all("data" not in t and t.get("datatype") != "BYTES" for t in inputs):
            remember(served.request_plans, bytes(head), RequestPlan(request, feeds, wanted, offset))
    else:
        plan = JsonPlan.of(request, feeds, wanted)
        if plan is not None:
            remember(served.request_plans, plan.key, plan)
    return request, feeds, wanted


def _read_input(served: ServedVersion, tensor: Any, feeds: dict[str, Array], binary: memoryview, offset: int,
                body_size: int) -> int:
    """Check one input and add its array to ``feeds``; the offset of the next input's binary data."""
    if not isinstance(tensor, dict):
        raise BadRequest("each input must be a JSON object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise BadRequest("an input has no 'name'")
    specs = served.model.inputs_by_name
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"model '{served.name}' has no input named '{name}' (its inputs: {', '.join(specs)})")
    if name in feeds:
        raise BadRequest(f"input '{name}' is given twice")
    datatype = tensor.get("datatype")
    if datatype != spec.datatype:
        raise BadRequest(f"input '{name}': datatype {datatype!r} does not match the model's {spec.datatype}")
    try:
        shape = _check_shape(name, tensor.get("shape"), spec.shape, body_size)
        parameters = tensor.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"input '{name}': parameters must be an object, got {_json_type(parameters)}")
        size = parameters.get("binary_data_size") if parameters else None
        if size is None:
            if "data" not in tensor:
                raise BadRequest(f"input '{name}' has no 'data' (nor binary_data_size)")
            feeds[name] = from_json(name, datatype, shape, tensor["data"])
            return offset
        if "data" in tensor:
            raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise BadRequest(f"input '{name}': binary_data_size {size!r} runs past the end of the body")
        feeds[name] = from_binary(name, datatype, shape, binary[offset:offset + size])
        return offset + size
    except TensorError as exc:
        raise BadRequest(str(exc)) from None


def wanted_outputs(served: ServedVersion, request: dict[str, Any]) -> list[tuple[str, bool]]:
    """``(name, binary)`` of each output the request asks for, in its order; every output when it names none."""
    parameters = request.get("parameters")
    binary_default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested = request.get("outputs")
    names = served.model.output_names
    if requested is None:
        return [(n, binary_default) for n in names]
    if not isinstance(requested, list):
        raise BadRequest("'outputs' must be a list")
    wanted: list[tuple[str, bool]] = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise BadRequest(f"model '{served.name}' has no output named {name!r} "
                             f"(its outputs: {', '.join(names)})")
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        wanted.append((name, binary is True))
    return wanted


def _check_shape(name: str, shape: Any, expected: tuple[int, ...], body_size: int) -> list[int]:
    # A plain loop: this runs for every input of every request (that no plan covers).
    if type(shape) is not list:
        raise BadRequest(f"input '{name}': shape must be a list of non-negative integers, got {_clip(shape)}")
    span = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise BadRequest(f"input '{name}': shape must be a list of non-negative integers, got {_clip(shape)}")
        span *= d or 1
    # Every element takes at least a byte of the body, so a real tensor's dimensions multiply to at most its
    # size; only a zero dimension could make the others larger, and a tensor of no elements with a dimension
    # of 2^40 would have the model allocate outputs of that many rows.
    if span > body_size:
        raise BadRequest(f"input '{name}': shape {_clip(shape)} has dimensions larger than the request "
                         f"({body_size} bytes) can carry")
    if len(shape) != len(expected):
        raise BadRequest(f"input '{name}': shape {shape} does not match the model's {list(expected)} "
                         f"(-1 is any size)")
    for d, e in zip(shape, expected):  # noqa: B905 - the lengths are equal
        if e != -1 and d != e:
            raise BadRequest(f"input '{name}': shape {shape} does not match the model's {list(expected)} "
                             f"(-1 is any size)")
    return shape


def _clip(value: Any) -> str:
    """``repr(value)`` cut short: error messages quote the client's input, not megabytes of it."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _loads(head: bytes | memoryview) -> Any:
    try:
        return orjson.loads(head)
    except orjson.JSONDecodeError:
        pass
    # What orjson refuses but Python's json reads: NaN, Infinity, integers past 64 bits.
    try:
        return json.loads(bytes(head))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the request body is not valid JSON: it is nested too deeply") from None


def decode_body(body: bytes, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The body as the client meant it: gzip and deflate undone (within ``limit``), identity as is."""
    encoding = headers.get(b"content-encoding")
    if encoding is None:
        return body
    encoding = encoding.strip().lower()
    if encoding in (b"gzip", b"deflate"):
        return _decompress(body, encoding, limit)
    if encoding not in (b"identity", b""):
        raise BadRequest(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}")
    return body


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    # wbits: 16+ for gzip framing, plain for zlib-wrapped deflate.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == b"gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the {encoding.decode()} body cannot be decompressed: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPError(413, f"decompressed request body is over the limit of {limit} bytes")
    return out

"""The Open Inference Protocol (KServe v2) REST API: the node's own HTTP layer calls :meth:`OIPApp.dispatch`.

Endpoints::

    GET  /v2/health/live                 200 while the process serves
    GET  /v2/health/ready                200 when no first load is pending
    GET  /v2                             server metadata (extensions incl. binary_tensor_data)
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    200 if that version serves
    POST /v2/models/{m}[/versions/{v}]/infer    inference, JSON or binary tensors
    GET  /metrics                        Prometheus text format

No web framework: the routes are few and fixed, and on the inference path
every microsecond of routing and middleware is paid per request. An
inference is answered through a callback on the batcher's future, not a
coroutine; the app is also a plain ASGI application, for embedding it in
another server. Errors are
``{"error": "..."}``: 400 for a request the model cannot take (naming the
input and the problem), 404 for an unknown model or version, 405 for a wrong
method, 413 for a body over the limit, 500 when the model itself fails. An
error answers one request; the server carries on serving everyone. Nothing a
client sends is a 500 by itself: JSON nested past what the readers take, data
that does not convert to the input's datatype, text that is not UTF-8, and
dimensions larger than the body could carry (a zero dimension beside 2^40 rows)
are refused before the model sees them.

Binary tensor data extension: a request whose JSON header is followed by raw
tensor bytes says so with ``Inference-Header-Content-Length``; each binary
input carries ``parameters.binary_data_size``, in input order. Outputs are
returned binary when asked for (``outputs[].parameters.binary_data`` or the
request's ``parameters.binary_data_output``), in the same layout.

JSON is read and written with orjson, which is several times faster than the
standard library on tensors of thousands of numbers and writes numpy arrays
directly (float32 in its shortest exact form). A body that orjson refuses is
given to the standard library before it is called invalid, so the NaN and
Infinity that Python clients may send are still accepted.

Requests are parsed and answered on the event loop, large ones too. Handing
a large JSON tensor to a worker thread was measured and lost: orjson and
numpy hold the GIL for the whole conversion (one C call each), so the loop
cannot run meanwhile anyway, and the handoff and the GIL switches added
about 15% of CPU per request (a 3x64x64 FP32 image as JSON, 2 cores). Only
another process could parse in parallel, and moving the body there would
cost about what parsing it does. Clients that send large tensors should use
the binary extension, which is parsed without a copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from edge_runtime import __version__
from edge_runtime.serving.batcher import ModelUnavailable
from edge_runtime.serving.plans import JsonOutputs, JsonPlan, RequestPlan, json_plan_feeds, remember
from edge_runtime.serving.registry import ModelNotFound, ModelRegistry, ServedVersion
from edge_runtime.serving.tensors import (
    ORJSON_ARRAY_TYPES,
    Array,
    TensorError,
    from_binary,
    from_json,
    json_bytes,
    to_binary,
    to_json_data,
)

logger = logging.getLogger("edge_runtime.serving")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# (status, headers, body) of one answer.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
# Where an answer that is not ready at once goes (called once, on the loop).
Reply = Callable[[Answer], object]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
SERVER_NAME = "edgewise-edge-runtime"
EXTENSIONS = ["binary_tensor_data", "health", "metadata", "metrics"]
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = b"inference-header-content-length"

JSON_TYPE = [(b"content-type", b"application/json")]
# The binary part of a request that has none.
_NO_BYTES = memoryview(b"")
METRICS_TYPE = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
# Tasks answering a request later, held until done (the loop keeps only weak references).
_PENDING: set[asyncio.Task[None]] = set()


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(HTTPError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


class OIPApp:
    def __init__(self, registry: ModelRegistry, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 server_name: str = SERVER_NAME) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.server_name = server_name
        self.live = True
        # The whole node's /metrics text when several processes serve it (see .workers); None: this registry's.
        self.node_metrics: Callable[[], Awaitable[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI, for embedding the API in another server; the node's own server calls :meth:`dispatch`."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        answer: Answer | None
        try:
            body = await self._read_body(receive, headers)
        except HTTPError as exc:
            answer = (exc.status, *self.error_answer(exc.message))
        else:
            later: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            answer = self.dispatch(scope["method"], scope["path"], headers, body, later.set_result)
            if answer is None:
                answer = await later
        status, response_headers, response_body = answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [*response_headers, (b"content-length", str(len(response_body)).encode())]})
        await send({"type": "http.response.body", "body": response_body})

    def dispatch(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, reply: Reply
                 ) -> Answer | None:
        """One request, whole: its answer now, or None and the answer to ``reply`` later (inference).

        Never raises. ``headers`` are keyed by lower-case name; ``body`` is as
        received (the HTTP layer has already held it to ``max_body_bytes``);
        ``reply`` is called once, on the loop.
        """
        try:
            return self.route(method, path, headers, body, reply)
        except HTTPError as exc:
            return exc.status, *self.error_answer(exc.message)
        except Exception:  # noqa: BLE001 - one request's bug must not take the server down
            logger.exception("unexpected error serving %s %s", method, path)
            return 500, *self.error_answer("internal server error")

    @staticmethod
    def error_answer(message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Headers and body of an error answer: ``{"error": message}``."""
        return JSON_TYPE, _error_body(message)

    def route(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, reply: Reply
              ) -> Answer | None:
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            n = len(parts)
            if n >= 3 and parts[1] == "models":
                name = parts[2]
                version: str | None = None
                rest = parts[3:]
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if not rest:
                    _allow(method, "GET")
                    return self.model_metadata(name, version)
                if rest == ["ready"]:
                    _allow(method, "GET")
                    self._resolve(name, version)
                    return 200, JSON_TYPE, b""
                if rest == ["infer"]:
                    _allow(method, "POST")
                    self.infer(name, version, headers, body, reply)
                    return None
            elif n == 1:
                _allow(method, "GET")
                return 200, JSON_TYPE, json_bytes({"name": self.server_name, "version": __version__,
                                              "extensions": EXTENSIONS})
            elif n == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
                _allow(method, "GET")
                ok = self.live if parts[2] == "live" else self.live and self.registry.ready
                return (200 if ok else 503), JSON_TYPE, b""
        elif parts == ["metrics"]:
            _allow(method, "GET")
            if self.node_metrics is None:
                return 200, METRICS_TYPE, self.registry.metrics.render().encode()
            self._reply_metrics(self.node_metrics, reply)
            return None
        raise HTTPError(404, f"no such endpoint: {path}")

    def _reply_metrics(self, node_metrics: Callable[[], Awaitable[str]], reply: Reply) -> None:
        async def gather() -> None:
            try:
                text = await node_metrics()
            except Exception as exc:  # noqa: BLE001 - a scrape must get an answer, not a hung connection
                logger.warning("the node's metrics could not be gathered: %s", exc)
                reply((503, *self.error_answer(f"the node's metrics could not be gathered: {_one_line(exc)}")))
            else:
                reply((200, METRICS_TYPE, text.encode()))

        task = asyncio.get_running_loop().create_task(gather())
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    # metadata ----------------------------------------------------------------

    def _resolve(self, name: str, version: str | None) -> ServedVersion:
        try:
            return self.registry.get(name, version)
        except ModelNotFound as exc:
            raise HTTPError(404, str(exc)) from None

    def model_metadata(self, name: str, version: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        served = self._resolve(name, version)
        model = served.model
        return 200, JSON_TYPE, json_bytes({
            "name": name,
            "versions": self.registry.versions(name),
            "platform": PLATFORM,
            "inputs": [spec.metadata() for spec in model.inputs],
            "outputs": [spec.metadata() for spec in model.outputs],
            "parameters": {"version": served.version, "execution_provider": model.provider,
                           "max_batch_size": served.max_batch_size, "instances": served.batcher.instances},
        })

    # inference ---------------------------------------------------------------

    def infer(self, name: str, version: str | None, headers: dict[bytes, bytes], body: bytes, reply: Reply) -> None:
        """Parse and queue one inference; ``reply`` gets the answer when its batch is done. Raises HTTPError."""
        served = self._resolve(name, version)
        metrics = served.metrics
        metrics.requests += 1
        started = time.perf_counter()
        try:
            if b"content-encoding" in headers:
                body = _decode_body(body, headers, self.max_body_bytes)
            request, feeds, wanted = self._parse(served, body, headers)
            try:
                served.batcher.submit_callback(
                    feeds, lambda outcome: reply(self._complete(outcome, served, request, wanted, started)))
            except ModelUnavailable as exc:
                raise HTTPError(503, str(exc)) from None
        except Exception:  # an HTTPError, or a bug that dispatch answers with 500: counted either way
            metrics.errors += 1
            metrics.latency.observe(time.perf_counter() - started)
            raise

    def _complete(self, outcome: list[Array] | BaseException, served: ServedVersion, request: dict[str, Any],
                  wanted: list[tuple[str, bool]], started: float) -> Answer:
        """The answer to a request from the model's outputs for it, or from its error. Never raises."""
        metrics = served.metrics
        name = served.name
        try:
            if isinstance(outcome, BaseException):
                try:
                    raise outcome
                except asyncio.CancelledError:
                    raise HTTPError(503, "the request was cancelled: the server is stopping") from None
                except ModelUnavailable as exc:
                    raise HTTPError(503, str(exc)) from None
                except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
                    raise BadRequest(f"model '{name}' refused the request: {_one_line(exc)}") from None
                except Exception as exc:  # noqa: BLE001 - the model failed on this request only
                    raise HTTPError(500, f"model '{name}' failed on this request: {_one_line(exc)}") from None
            return self._respond(served, request, outcome, wanted)
        except HTTPError as exc:
            metrics.errors += 1
            return exc.status, *self.error_answer(exc.message)
        except Exception:  # noqa: BLE001 - a bug answering one request must not lose the others
            logger.exception("unexpected error answering an inference on %s", name)
            metrics.errors += 1
            return 500, *self.error_answer("internal server error")
        finally:
            metrics.latency.observe(time.perf_counter() - started)

    async def _read_body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "the client closed the connection before sending the whole body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _parse(self, served: ServedVersion, body: bytes,
               headers: dict[bytes, bytes]) -> tuple[dict[str, Any], dict[str, Array], list[tuple[str, bool]]]:
        header_length = headers.get(HEADER_LENGTH)
        if header_length is None:
            request = _loads(body)
            if type(request) is dict:
                fast = json_plan_feeds(served, request)
                if fast is not None:
                    # The same layout as an earlier request's: only the numbers are new.
                    return request, *fast
            head, binary = body, _NO_BYTES
        else:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise BadRequest(f"Inference-Header-Content-Length {header_length.decode(errors='replace')!r} "
                                 f"does not fit a body of {len(body)} bytes")
            split = int(header_length)
            head, binary = body[:split], memoryview(body)[split:]
            plan = served.request_plans.get(head)
            if plan is not None and len(binary) == plan.size:
                # The same header as an earlier request's: only the tensors' bytes are new.
                return plan.request, plan.feeds(binary), plan.wanted
            request = _loads(head)
        if not isinstance(request, dict):
            raise BadRequest("the request body must be a JSON object")
        if "id" in request and not isinstance(request["id"], str):
            raise BadRequest("'id' must be a string")
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest("'inputs' must be a non-empty list of tensors")
        model = served.model
        specs = model.inputs_by_name
        feeds: dict[str, Array] = {}
        offset = 0
        for tensor in inputs:
            if not isinstance(tensor, dict):
                raise BadRequest("each input must be a JSON object with name, shape, datatype and data")
            name = tensor.get("name")
            if not isinstance(name, str):
                raise BadRequest("an input has no 'name'")
            spec = specs.get(name)
            if spec is None:
                raise BadRequest(f"model '{served.name}' has no input named '{name}' "
                                 f"(its inputs: {', '.join(specs)})")
            if name in feeds:
                raise BadRequest(f"input '{name}' is given twice")
            datatype = tensor.get("datatype")
            if datatype != spec.datatype:
                raise BadRequest(f"input '{name}': datatype {datatype!r} does not match the model's {spec.datatype}")
            try:
                shape = _check_shape(name, tensor.get("shape"), spec.shape, len(body))
                parameters = tensor.get("parameters")
                if parameters is not None and not isinstance(parameters, dict):
                    raise BadRequest(f"input '{name}': parameters must be an object, got {_json_type(parameters)}")
                size = parameters.get("binary_data_size") if parameters else None
                if size is not None:
                    if "data" in tensor:
                        raise BadRequest(f"input '{name}' has both 'data' and binary_data_size")
                    if type(size) is not int or size < 0 or offset + size > len(binary):
                        raise BadRequest(f"input '{name}': binary_data_size {size!r} runs past the end of the body")
                    feeds[name] = from_binary(name, datatype, shape, binary[offset:offset + size])
                    offset += size
                else:
                    if "data" not in tensor:
                        raise BadRequest(f"input '{name}' has no 'data' (nor binary_data_size)")
                    feeds[name] = from_json(name, datatype, shape, tensor["data"])
            except TensorError as exc:
                raise BadRequest(str(exc)) from None
        if offset != len(binary):
            raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
        missing = [n for n in specs if n not in feeds]
        if missing:
            raise BadRequest(f"missing input(s) {', '.join(missing)} for model '{served.name}'")
        if len(feeds) > 1 and served.batcher.stackable:
            rows = {a.shape[0] for a in feeds.values()}
            if len(rows) > 1:
                raise BadRequest(f"inputs disagree on the batch dimension (sizes {sorted(rows)})")
        wanted = self._wanted_outputs(served, request)
        if header_length is not None and offset == len(binary) and all(
                "data" not in t and t.get("datatype") != "BYTES" for t in inputs):
            remember(served.request_plans, bytes(head), RequestPlan(request, feeds, wanted, offset))
        elif header_length is None:
            plan = JsonPlan.of(request, feeds, wanted)
            if plan is not None:
                remember(served.request_plans, plan.key, plan)
        return request, feeds, wanted

    def _wanted_outputs(self, served: ServedVersion, request: dict[str, Any]) -> list[tuple[str, bool]]:
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

    def _respond(self, served: ServedVersion, request: dict[str, Any], outputs: list[Array],
                 wanted: list[tuple[str, bool]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
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
                status, headers, body = self._respond_whole(served, request, outputs, wanted)
                split = int(dict(headers)[b"inference-header-content-length"])
                cached = (headers, body[:split])
                remember(served.answer_heads, key, cached)
            if cached is not None:
                headers, head = cached
                return 200, headers, b"".join([head, *[a.tobytes() if a.flags.c_contiguous and
                                                       a.dtype.byteorder != ">" else to_binary(a)
                                                       for a in arrays]])
        return self._respond_whole(served, request, outputs, wanted)

    def _respond_whole(self, served: ServedVersion, request: dict[str, Any], outputs: list[Array],
                       wanted: list[tuple[str, bool]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
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
            # orjson wrote NaN or Infinity as null; Python's json keeps them,
            # as this server always has, and Python clients read them back.
            for t in tensors:
                if isinstance(t.get("data"), np.ndarray):
                    t["data"] = to_json_data(t["data"])
            head = json.dumps(response, separators=(",", ":")).encode()
        if not blobs:
            return 200, JSON_TYPE, head
        return 200, [(b"content-type", b"application/octet-stream"),
                     (b"inference-header-content-length", str(len(head)).encode())], b"".join([head, *blobs])


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


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise HTTPError(405, f"method {method} not allowed here (use {allowed})")


def _finite(array: Array) -> bool:
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())


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


def _error_body(message: str) -> bytes:
    return json_bytes({"error": message})


def _decode_body(body: bytes, headers: dict[bytes, bytes], limit: int) -> bytes:
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

"""The Open Inference Protocol (KServe v2) REST API: the node's own HTTP layer calls :meth:`OIPApp.dispatch`.

Endpoints::

    GET  /v2/health/live                 {"live": true}: 200 while the process serves, else 400
    GET  /v2/health/ready                {"ready": ...}: 200 when no first load is pending, else 400
    GET  /v2                             server metadata (the extensions below incl. binary_tensor_data)
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    {"name", "ready"}: 200 if that version serves, 400 with its
                                                reason if it was asked for and does not, else 404
    GET  /v2/models/{m}[/versions/{v}]/config   Triton's model configuration
    POST /v2/models/{m}[/versions/{v}]/infer    inference, JSON or binary tensors
    GET  /v2/models[/{m}[/versions/{v}]]/stats  Triton's statistics extension
    POST /v2/repository/index                   every model the node was asked to serve, with its state
    POST /v2/repository/models/{m}/load|unload  only with explicit model control (else 503)
    GET  /metrics                        Prometheus text format

The health bodies, readiness, repository, statistics and configuration are
:mod:`.extensions` (where the status codes are explained).
No web framework: the routes are few and fixed. An inference is answered
through a callback on the batcher's future, not a coroutine; the app is also
a plain ASGI application, for embedding it in another server. Errors are
``{"error": "..."}``: 400 for a request the model cannot take (naming the
input and the problem, see :mod:`.request`), 404 for an unknown model or
version, 405 for a wrong method, 413 for a body over the limit, 500 when the
model itself fails. JSON answers hold no bare NaN or Infinity: a float
output's non-finite elements are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (:func:`~.tensors.to_json_data_safe`).
An error answers one request; the server carries on serving everyone.
Nothing a client sends is a 500 by itself.

Binary tensor data extension: a request whose JSON header is followed by raw
tensor bytes says so with ``Inference-Header-Content-Length``; each binary
input carries ``parameters.binary_data_size``, in input order. Outputs are
returned binary when asked for (``outputs[].parameters.binary_data`` or the
request's ``parameters.binary_data_output``), in the same layout
(:mod:`.answer`). JSON is read and written with orjson; a body that orjson
refuses is given to the standard library before it is called invalid, so the
NaN and Infinity that Python clients may send are still accepted. Requests
are parsed and answered on the event loop, large ones too (see
docs/decisions/0002-model-server-json-on-the-loop.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import onnxruntime as ort

from edge_runtime import __version__
from edge_runtime.serving.answer import JSON_TYPE, error_body, respond
from edge_runtime.serving.batcher import ModelUnavailable
from edge_runtime.serving.extensions import Extensions, config_answer, health_answer
from edge_runtime.serving.registry import ModelNotFound, ModelRegistry, ServedVersion
from edge_runtime.serving.request import BadRequest, HTTPError, decode_body, parse_request
from edge_runtime.serving.tensors import Array, json_bytes

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
EXTENSIONS = ["binary_tensor_data", "health", "metadata", "metrics", "model_configuration", "model_repository",
              "statistics"]
PLATFORM = "onnxruntime_onnx"
METRICS_TYPE = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
# Tasks answering a request later, held until done (the loop keeps only weak references).
_PENDING: set[asyncio.Task[None]] = set()


class OIPApp:
    def __init__(self, registry: ModelRegistry, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 server_name: str = SERVER_NAME, model_control: str = "none") -> None:
        """``model_control``: "explicit" lets clients load and unload through the repository
        extension (only what the node was asked to serve, see :mod:`.extensions`); "none" refuses it."""
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.registry = registry
        self.extensions = Extensions(registry, model_control=model_control)
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
        return JSON_TYPE, error_body(message)

    def route(self, method: str, path: str, headers: dict[bytes, bytes], body: bytes, reply: Reply
              ) -> Answer | None:
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            n = len(parts)
            if n == 3 and parts[1] == "models" and parts[2] == "stats":
                _allow(method, "GET")
                self.extensions.stats(None, None, path, reply)
                return None
            if n >= 3 and parts[1] == "models":
                return self.model_route(method, path, parts[2], parts[3:], headers, body, reply)
            if n == 1:
                _allow(method, "GET")
                return 200, JSON_TYPE, json_bytes({"name": self.server_name, "version": __version__,
                                                   "extensions": EXTENSIONS})
            if n == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
                _allow(method, "GET")
                ok = self.live if parts[2] == "live" else self.live and self.registry.ready
                return health_answer(parts[2], ok)
            if n >= 3 and parts[1] == "repository":
                return self.extensions.repository(method, parts[2:], path, body, reply)
        elif parts == ["metrics"]:
            _allow(method, "GET")
            if self.node_metrics is None:
                return 200, METRICS_TYPE, self.registry.metrics.render().encode()
            self._reply_metrics(self.node_metrics, reply)
            return None
        raise HTTPError(404, f"no such endpoint: {path}")

    def model_route(self, method: str, path: str, name: str, rest: list[str], headers: dict[bytes, bytes],
                    body: bytes, reply: Reply) -> Answer | None:
        """``/v2/models/{name}/...``, ``rest`` the parts after the name."""
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if rest == ["infer"]:
            _allow(method, "POST")
            self.infer(name, version, headers, body, reply)
            return None
        if not rest:
            _allow(method, "GET")
            return self.model_metadata(name, version)
        if rest == ["ready"]:
            _allow(method, "GET")
            return self.extensions.model_ready(name, version, path, reply)
        if rest == ["stats"]:
            _allow(method, "GET")
            self.extensions.stats(name, version, path, reply)
            return None
        if rest == ["config"]:
            _allow(method, "GET")
            return config_answer(self._resolve(name, version))
        raise HTTPError(404, f"no such endpoint: {path}")

    async def answer(self, method: str, path: str, body: bytes) -> Answer:
        """One request's whole answer, awaited (another process's request, see :mod:`.workers`)."""
        later: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        answer = self.dispatch(method, path, {}, body, later.set_result)
        return answer if answer is not None else await later

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
                body = decode_body(body, headers, self.max_body_bytes)
            request, feeds, wanted = parse_request(served, body, headers)
            try:
                served.batcher.submit_callback(
                    feeds, lambda outcome: reply(self._complete(outcome, served, request, wanted, started)))
            except ModelUnavailable as exc:
                raise HTTPError(503, str(exc)) from None
        except Exception:  # an HTTPError, or a bug that dispatch answers with 500: counted either way
            metrics.errors += 1
            elapsed = time.perf_counter() - started
            metrics.latency.observe(elapsed)
            metrics.failed_seconds += elapsed
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
            return respond(served, request, outcome, wanted)
        except HTTPError as exc:
            metrics.errors += 1
            metrics.failed_seconds += time.perf_counter() - started
            return exc.status, *self.error_answer(exc.message)
        except Exception:  # noqa: BLE001 - a bug answering one request must not lose the others
            logger.exception("unexpected error answering an inference on %s", name)
            metrics.errors += 1
            metrics.failed_seconds += time.perf_counter() - started
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


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise HTTPError(405, f"method {method} not allowed here (use {allowed})")


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

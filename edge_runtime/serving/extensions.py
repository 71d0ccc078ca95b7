"""Protocol extensions Triton's and KServe's tools read: health bodies, readiness, repository, stats, config.

Endpoints (routed here by :class:`~edge_runtime.serving.app.OIPApp`)::

    GET  /v2/health/live | /v2/health/ready        {"live": bool} | {"ready": bool}; 200 true, 400 false
    GET  /v2/models/{m}[/versions/{v}]/ready        {"name", "version", "ready"[, "reason"]}; 200, 400, 404
    POST /v2/repository/index                       [{"name", "version", "state", "reason"}], body {"ready": bool}
    POST /v2/repository/models/{m}/load | /unload   200; 503 unless started with explicit model control
    GET  /v2/models[/{m}[/versions/{v}]]/stats      Triton's statistics ({"model_stats": [...]})
    GET  /v2/models/{m}[/versions/{v}]/config       Triton's model configuration, as JSON

**Health and readiness.** The OIP (KServe v2) REST spec says a health or
readiness answer's status is the boolean: 200 is true, a 4xx is false.
Triton answers false with 400, and ``tritonclient`` reads the status alone
(200 or not), so false is 400 here too, not 503: a Kubernetes probe fails on
either. KServe's own Python client reads the body (``response.json()["live"]``)
and raises on an empty one, so every answer carries ``{"live": ...}`` or
``{"ready": ...}`` as well; a model that is not ready says why in ``reason``
(its last load failed or was refused, with the loader's error; it was
unloaded; it is loading). A model this node was never asked to serve is 404.

**Repository.** What a node serves is decided by the control plane's signed
desired state (or, for ``edge-runtime serve``, by the folder the operator
chose), so the repository extension never loads anything else: ``load``
takes no path, config or files, only a name this node was asked to serve,
and loads that name's last requested version again from where it was
loaded (:meth:`~edge_runtime.serving.registry.ModelRegistry.requested`),
after checking the file still has the sha256 it was asked for. That retries a
failed load, or serves again a model a client unloaded. ``load`` and
``unload`` are refused unless the server was started with explicit model
control (``model_control="explicit"``, ``--model-control explicit``): with 503
and Triton's words for it ("explicit model load / unload is not allowed"),
as Triton answers when its model control mode is not EXPLICIT. Under
``edge-runtime run`` the agent's next reconcile still serves what the
desired state says, so an unload lasts until then. The index lists every
model the node was asked to serve, with Triton's states: READY (serving),
LOADING, UNAVAILABLE with the reason.

**Statistics** come from :class:`~edge_runtime.serving.metrics.ModelMetrics`
(the whole node's, when several processes serve it). ``queue`` is each
request's wait for its batch's run, ``compute_infer`` the batch's run
(session.run, its stacking and slicing included) counted once per request
as Triton does; the request's parsing and answer writing are not timed
apart, so ``compute_input`` and ``compute_output`` carry counts and 0 ns.
``success`` and ``fail`` are the request times, arrival to answer.

In a serving worker process (see :mod:`.workers`) the repository, the
statistics and the readiness of a model that does not serve are answered by
the first process, which decides what serves and holds the node's figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import orjson

from edge_runtime.serving.answer import JSON_TYPE, error_body
from edge_runtime.serving.loader import CPU
from edge_runtime.serving.metrics import ModelMetrics
from edge_runtime.serving.registry import LoadSpec, ModelNotFound, ModelRegistry, ServedVersion
from edge_runtime.serving.request import HTTPError
from edge_runtime.serving.tensors import json_bytes

logger = logging.getLogger("edge_runtime.serving")

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]
ModelControl = Literal["none", "explicit"]
MODEL_CONTROLS: tuple[str, ...] = ("none", "explicit")
# Another process's answer to a request (method, path, body): how a worker asks the first process.
Forward = Callable[[str, str, bytes], Awaitable[Answer]]

CONTROL_OFF = ("explicit model load / unload is not allowed: the server was not started with explicit "
               "model control (--model-control explicit); {why}")
WHY_OFF = "what this node serves is set by the control plane's desired state"
# ONNX Runtime providers that run on a GPU (Triton's KIND_GPU); others but CPU are KIND_MODEL.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                           "MIGraphXExecutionProvider", "DmlExecutionProvider"})
CONFIG_TYPES = {"BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING"}
NS = 1_000_000_000


def health_answer(kind: str, ok: bool) -> Answer:
    """``{"live": ok}`` or ``{"ready": ok}``: 200 if true, 400 if false (see the module's docstring)."""
    return (200 if ok else 400), JSON_TYPE, json_bytes({kind: ok})


class Extensions:
    """The extensions' handlers for one app: its registry, its model control and what clients unloaded."""

    def __init__(self, registry: ModelRegistry, *, model_control: str = "none") -> None:
        if model_control not in MODEL_CONTROLS:
            raise ValueError(f"model_control is one of {', '.join(MODEL_CONTROLS)}, not {model_control!r}")
        self.registry = registry
        self.model_control = model_control
        # Set in a worker process: the first process answers the repository and statistics.
        self.forward: Forward | None = None
        # Set in the first process of several: fresh figures from the others before statistics.
        self.refresh_peers: Callable[[], Awaitable[None]] | None = None
        # Per name, the spec a client unloaded; a later request for that name (by the agent) replaces it.
        self._unloaded: dict[str, LoadSpec] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # readiness ---------------------------------------------------------------------------------------

    def model_ready(self, name: str, version: str | None, path: str, reply: Callable[[Answer], object]
                    ) -> Answer | None:
        try:
            served = self.registry.get(name, version)
        except ModelNotFound as exc:
            if self.forward is not None:
                self._later(self.forward("GET", path, b""), reply)
                return None
            state, wanted, reason = self._state(name)
            if state is None or (version is not None and version != wanted):
                raise HTTPError(404, str(exc)) from None
            body: dict[str, Any] = {"name": name, "version": wanted, "ready": False, "reason": reason}
            return 400, JSON_TYPE, json_bytes(body)
        return 200, JSON_TYPE, json_bytes({"name": name, "version": served.version, "ready": True})

    def _state(self, name: str) -> tuple[str | None, str, str]:
        """(Triton state, version, reason) of ``name``'s last requested version if it does not serve now.

        The state is None when it serves, or when the node no longer serves it (the agent unloaded it).
        """
        registry = self.registry
        spec = registry.requested(name)
        if spec is None or spec.version in registry.versions(name):
            return None, "", ""
        status = registry.status(name)
        if status is not None and status.version == spec.version and status.state in ("failed", "refused"):
            return "UNAVAILABLE", spec.version, f"{status.state}: {status.error}"
        if registry.loading(name):
            return "LOADING", spec.version, "loading"
        if self._unloaded.get(name) is spec:
            return "UNAVAILABLE", spec.version, "unloaded"
        return None, "", ""

    # repository --------------------------------------------------------------------------------------

    def repository(self, method: str, rest: list[str], path: str, body: bytes,
                   reply: Callable[[Answer], object]) -> Answer | None:
        if method != "POST":
            raise HTTPError(405, f"method {method} not allowed here (use POST)")
        if rest == ["index"]:
            if self.forward is not None:
                self._later(self.forward(method, path, body), reply)
                return None
            ready_only = bool(_json_object(body).get("ready", False))
            return 200, JSON_TYPE, json_bytes(self.index(ready_only=ready_only))
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            if self.forward is not None:
                self._later(self.forward(method, path, body), reply)
                return None
            if self.model_control != "explicit":
                raise HTTPError(503, CONTROL_OFF.format(why=WHY_OFF))
            name, options = rest[1], _json_object(body)
            action = self._load(name, options) if rest[2] == "load" else self._unload(name)
            self._later(action, reply)
            return None
        raise HTTPError(404, f"no such endpoint: {path}")

    def index(self, *, ready_only: bool = False) -> list[dict[str, str]]:
        """Every model the node was asked to serve: each version serving (READY), and the last asked if it does not."""
        registry = self.registry
        rows: list[dict[str, str]] = []
        for name in sorted(set(registry.requested_names()) | set(registry.names())):
            rows += [{"name": name, "version": v, "state": "READY", "reason": ""} for v in registry.versions(name)]
            state, version, reason = self._state(name)
            if state is not None and not ready_only:
                rows.append({"name": name, "version": version, "state": state, "reason": reason})
        return rows

    async def _load(self, name: str, options: dict[str, Any]) -> Answer:
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise HTTPError(400, "'parameters' must be an object")
        overrides = sorted(k for k in parameters if k == "config" or str(k).startswith("file:"))
        if overrides:
            raise HTTPError(400, f"model '{name}': {', '.join(overrides)} not accepted: this node loads only "
                                 "what it was asked to serve, from where it was asked")
        spec = self.registry.requested(name)
        if spec is None or (self.registry.status(name) is None and self._unloaded.get(name) is not spec):
            raise HTTPError(404, f"model '{name}' is not one this node was asked to serve; {WHY_OFF}")
        if spec.sha256:
            found = await asyncio.to_thread(_file_sha256, Path(spec.path))
            if found != spec.sha256:
                raise HTTPError(400, f"failed to load '{name}': {spec.path} has sha256 {found}, "
                                     f"not {spec.sha256} as this node was asked; not loaded")
        status = await self.registry.load_spec(spec)
        if status.state != "serving":
            self.registry.metrics.load_failed(name)
            raise HTTPError(400, f"failed to load '{name}' version {spec.version} ({status.state}): {status.error}")
        self._unloaded.pop(name, None)
        logger.info("model %s version %s loaded again through the repository API", name, spec.version)
        return 200, JSON_TYPE, b""

    async def _unload(self, name: str) -> Answer:
        spec = self.registry.requested(name)
        if spec is None:
            raise HTTPError(404, f"unknown model '{name}'")
        self._unloaded[name] = spec
        await self.registry.unload(name)
        logger.info("model %s unloaded through the repository API", name)
        return 200, JSON_TYPE, b""

    # statistics ------------------------------------------------------------------------------------

    def stats(self, name: str | None, version: str | None, path: str, reply: Callable[[Answer], object]) -> None:
        self._later(self.forward("GET", path, b"") if self.forward is not None else self._stats(name, version),
                    reply)

    async def _stats(self, name: str | None, version: str | None) -> Answer:
        if self.refresh_peers is not None:
            await self.refresh_peers()
        series = self.registry.metrics.combined()
        rows = [model_stats(m, v, figures) for (m, v), figures in sorted(series.items())
                if (name is None or m == name) and (version is None or v == version)]
        if name is not None and not rows:
            known = self.registry.requested(name) is not None
            which = f"model '{name}'" + (f" version '{version}'" if version is not None else "")
            raise HTTPError(404, f"no statistics for {which}: " + ("it has not served here" if known
                                                                       else "unknown model"))
        return 200, JSON_TYPE, json_bytes({"model_stats": rows})

    # answering later --------------------------------------------------------------------------------

    def _later(self, work: Awaitable[Answer], reply: Callable[[Answer], object]) -> None:
        async def run() -> None:
            try:
                answer = await work
            except HTTPError as exc:
                answer = exc.status, JSON_TYPE, error_body(exc.message)
            except Exception:  # noqa: BLE001 - one request's bug must not go unanswered
                logger.exception("unexpected error in a protocol extension")
                answer = 500, JSON_TYPE, error_body("internal server error")
            reply(answer)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def model_stats(name: str, version: str, m: ModelMetrics) -> dict[str, Any]:
    """One version's entry of Triton's statistics (``model_stats[]``)."""
    served = m.queue.count

    def duration(count: int, seconds: float) -> dict[str, int]:
        return {"count": count, "ns": int(seconds * NS)}

    return {
        "name": name, "version": version, "last_inference": m.last_inference_ms(),
        "inference_count": m.inferences, "execution_count": m.batches,
        "inference_stats": {
            "success": duration(m.requests - m.errors, m.latency.total - m.failed_seconds),
            "fail": duration(m.errors, m.failed_seconds),
            "queue": duration(served, m.queue.total),
            "compute_input": duration(served, 0.0),
            "compute_infer": duration(served, m.compute_per_request),
            "compute_output": duration(served, 0.0),
            "cache_hit": duration(0, 0.0), "cache_miss": duration(0, 0.0),
        },
        "batch_stats": [{"batch_size": rows, "compute_input": duration(int(n), 0.0),
                         "compute_infer": duration(int(n), seconds), "compute_output": duration(int(n), 0.0)}
                        for rows, (n, seconds) in sorted(m.batch_compute.items())],
        "memory_usage": [],
    }


def model_config(served: ServedVersion) -> dict[str, Any]:
    """Triton's model configuration of one served version, as its JSON form."""
    model = served.model
    batchable = model.batchable

    def tensor(spec: Any) -> dict[str, Any]:
        meta = spec.metadata()
        dims = meta["shape"][1:] if batchable else meta["shape"]
        return {"name": meta["name"], "data_type": CONFIG_TYPES.get(meta["datatype"], "TYPE_" + meta["datatype"]),
                "dims": dims}

    provider = model.provider
    kind = "KIND_CPU" if provider == CPU else "KIND_GPU" if provider in GPU_PROVIDERS else "KIND_MODEL"
    config: dict[str, Any] = {
        "name": served.name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [served.version]}},
        "max_batch_size": served.max_batch_size if batchable else 0,
        "input": [tensor(spec) for spec in model.inputs], "output": [tensor(spec) for spec in model.outputs],
        "instance_group": [{"name": f"{served.name}_0", "kind": kind, "count": served.batcher.instances,
                            **({"gpus": [0]} if kind == "KIND_GPU" else {})}],
        "parameters": {"execution_provider": {"string_value": provider},
                       "variant": {"string_value": served.variant}},
    }
    if batchable:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(served.max_queue_delay_ms * 1000),
                                      "preferred_batch_size": []}
    return config


def config_answer(served: ServedVersion) -> Answer:
    return 200, JSON_TYPE, json_bytes(model_config(served))


def _json_object(body: bytes) -> dict[str, Any]:
    """A request body that may be empty or a JSON object. Raises HTTPError 400."""
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise HTTPError(400, f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()

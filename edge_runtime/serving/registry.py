"""The models this node serves, with hot swap and last known good.

``load`` builds and smoke-tests a new session off to the side (in a thread,
so serving carries on meanwhile) and only then swaps it in: from that moment
new requests go to the new version, while requests already queued on the old
one finish there before its session is dropped. Nothing is failed by a swap.
If the new version cannot be loaded or fails its smoke test, the previous
version keeps serving and the failure is reported as a
:class:`~edge_runtime.protocol.ModelStatus` with state ``failed`` and the
``serving_version``.

Each name has a default version (the one loaded last) that requests without
a version go to; a request may name any version that is loaded. All methods
run on the event loop that serves requests.

A *mirror* (:class:`~edge_runtime.serving.workers.WorkerPool`, when the node
serves from several processes) is told of every load that succeeded and
every unload, in order, so that each process serves the same versions.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_runtime.protocol import ModelStatus
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS, Batcher
from edge_runtime.serving.loader import (
    DEFAULT_PROVIDER_PRIORITY,
    LoadedModel,
    LoadError,
    ProviderError,
    SessionFactory,
    load_model,
)
from edge_runtime.serving.metrics import Metrics, ModelMetrics
from edge_runtime.serving.probes import DEFAULT_ATOL, DEFAULT_RTOL

logger = logging.getLogger("edge_runtime.serving")


def settle_heap() -> None:
    """Move every object alive now (modules, models) out of the cyclic collector's sight.

    A request allocates a few dozen containers, so the collector runs often;
    frozen, the modules and models that will never be garbage are skipped by
    its passes (docs/decisions/0006-model-server-freezes-the-heap.md).
    Objects frozen here that later become garbage are still freed by reference
    counting; a model version's, which may sit in cycles, are collected when it
    is retired (:func:`resettle_heap`).
    """
    gc.collect()
    gc.freeze()


def resettle_heap() -> None:
    """After a model version is retired: collect what was frozen and is garbage now, then freeze again."""
    if gc.get_freeze_count():
        gc.unfreeze()
        settle_heap()


async def _retire(retiring: list[ServedVersion]) -> None:
    """Retire versions taken out of service: their queued requests finish, then the collector gets them.

    Takes them out of ``retiring`` as it goes, so that no reference is left when the heap is resettled.
    """
    if not retiring:
        return
    while retiring:
        await retiring.pop().batcher.close()
    resettle_heap()


class ModelNotFound(LookupError):
    """No such model, or no such version of it loaded; the message says which."""


@dataclass(frozen=True)
class LoadSpec:
    """What one version was loaded from and how it is batched: enough for another process to load it alike."""

    name: str
    version: str
    path: str
    sha256: str = ""
    variant: str = "original"
    providers: tuple[str, ...] = ()
    required_providers: tuple[str, ...] = ()
    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    inline_below_ms: float = DEFAULT_INLINE_BELOW_MS
    forbidden_providers: tuple[str, ...] = ()
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    finite_inputs: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path, "sha256": self.sha256,
                "variant": self.variant, "providers": list(self.providers),
                "required_providers": list(self.required_providers), "max_batch_size": self.max_batch_size,
                "max_queue_delay_ms": self.max_queue_delay_ms, "inline_below_ms": self.inline_below_ms,
                "forbidden_providers": list(self.forbidden_providers), "provider_options": self.provider_options,
                "rtol": self.rtol, "atol": self.atol, "finite_inputs": self.finite_inputs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(**{**data, "providers": tuple(data["providers"]),
                      "required_providers": tuple(data["required_providers"]),
                      "forbidden_providers": tuple(data.get("forbidden_providers", ()))})

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`ModelRegistry.load` that load this spec again (after the path)."""
        return {"sha256": self.sha256, "variant": self.variant, "providers": self.providers,
                "required_providers": self.required_providers, "forbidden_providers": self.forbidden_providers,
                "provider_options": self.provider_options, "rtol": self.rtol, "atol": self.atol,
                "finite_inputs": self.finite_inputs, "max_batch_size": self.max_batch_size,
                "max_queue_delay_ms": self.max_queue_delay_ms, "inline_below_ms": self.inline_below_ms}


class Mirror(Protocol):
    """Told of each change to the served versions, after it is made here (see :mod:`.workers`)."""

    async def load(self, spec: LoadSpec, retire_others: bool) -> None: ...

    async def unload(self, name: str, version: str | None) -> None: ...


@dataclass
class ServedVersion:
    name: str
    version: str
    sha256: str
    variant: str
    model: LoadedModel
    batcher: Batcher
    metrics: ModelMetrics
    max_batch_size: int
    max_queue_delay_ms: float
    spec: LoadSpec
    # The app's caches for this version (see OIPApp): parsed binary request headers, answer heads.
    request_plans: dict[Any, Any] = field(default_factory=dict)
    answer_heads: dict[Any, Any] = field(default_factory=dict)

    def status(self) -> ModelStatus:
        model = self.model
        return ModelStatus(name=self.name, version=self.version, sha256=self.sha256, variant=self.variant,
                           provider=model.provider, state="serving", serving_version=self.version,
                           placement=model.placement, cpu_nodes=model.cpu_nodes, graph_nodes=model.graph_nodes,
                           fallback=model.fallback)


@dataclass
class ServedModel:
    versions: dict[str, ServedVersion] = field(default_factory=dict)
    default: str | None = None
    status: ModelStatus | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelRegistry:
    def __init__(self, *, provider_priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
                 intra_op_threads: int = 0, instances: int = 0, inference_threads: int = 4,
                 cpus: int = 0, metrics: Metrics | None = None, providers_only: Sequence[str] | None = None,
                 session_factory: SessionFactory | None = None, available: Sequence[str] | None = None) -> None:
        """``instances``: batches of one model run side by side (0: chosen per model, see
        :func:`~edge_runtime.serving.loader.auto_instances`); ``intra_op_threads``
        (0: ``cpus`` shared out among the instances) is per run; ``cpus`` is this
        process's share of the node's CPUs (0: every usable one). ``providers_only``:
        the node was given its provider list and uses no other. ``session_factory``
        and ``available`` stand in for onnxruntime's (see :mod:`.loader`)."""
        if instances < 0:
            raise ValueError("instances must not be negative")
        self.provider_priority = tuple(provider_priority)
        self.intra_op_threads = intra_op_threads
        self.instances = instances
        self.cpus = cpus
        self.providers_only = tuple(providers_only) if providers_only is not None else None
        self.session_factory = session_factory
        self.available = tuple(available) if available is not None else None
        self.mirror: Mirror | None = None
        self.metrics = metrics or Metrics()
        # Inference runs here; loading uses the loop's default executor so
        # that a slow load never takes a thread that requests are waiting for.
        self.executor = ThreadPoolExecutor(max_workers=inference_threads, thread_name_prefix="inference")
        self._models: dict[str, ServedModel] = {}
        # The last load asked for each name, served or not: what a repository load retries.
        self._requested: dict[str, LoadSpec] = {}
        self._loading = 0

    # reads -------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ServedVersion:
        served = self._models.get(name)
        if served is None or not served.versions:
            raise ModelNotFound(f"unknown model '{name}'")
        if version is None:
            if served.default is None:
                raise ModelNotFound(f"model '{name}' has no serving version")
            return served.versions[served.default]
        try:
            return served.versions[version]
        except KeyError:
            loaded = ", ".join(served.versions) or "none"
            raise ModelNotFound(f"model '{name}' has no version '{version}' loaded (loaded: {loaded})") from None

    def versions(self, name: str) -> list[str]:
        served = self._models.get(name)
        return list(served.versions) if served else []

    def loaded(self) -> list[ServedVersion]:
        return [v for s in self._models.values() for v in s.versions.values()]

    def names(self) -> list[str]:
        return sorted(name for name, served in self._models.items() if served.versions)

    def serving_version(self, name: str) -> str | None:
        served = self._models.get(name)
        return served.default if served else None

    def status(self, name: str) -> ModelStatus | None:
        """The outcome of the last load of ``name`` (serving, or failed with what still serves)."""
        served = self._models.get(name)
        return served.status if served else None

    def requested(self, name: str) -> LoadSpec | None:
        """The last load asked for ``name`` (whether it serves, failed or was refused); None if never."""
        return self._requested.get(name)

    def statuses(self) -> list[ModelStatus]:
        return [s.status for _, s in sorted(self._models.items()) if s.status is not None]

    def replay(self) -> list[LoadSpec]:
        """The loads that rebuild what serves here in another process, in order (each name's default last)."""
        specs: list[LoadSpec] = []
        for served in self._models.values():
            specs += [v.spec for name, v in served.versions.items() if name != served.default]
            if served.default is not None:
                specs.append(served.versions[served.default].spec)
        return specs

    @property
    def ready(self) -> bool:
        """No load is in progress for a model that has nothing serving yet."""
        return self._loading == 0 or all(s.default is not None for s in self._models.values() if s.lock.locked())

    # writes ------------------------------------------------------------------

    async def load(
        self,
        name: str,
        version: str,
        path: Path,
        *,
        sha256: str = "",
        variant: str = "original",
        providers: Sequence[str] = (),
        required_providers: Sequence[str] = (),
        forbidden_providers: Sequence[str] = (),
        provider_options: dict[str, dict[str, str]] | None = None,
        rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL,
        finite_inputs: bool = False,
        max_batch_size: int = 8,
        max_queue_delay_ms: float = 0.0,
        inline_below_ms: float = DEFAULT_INLINE_BELOW_MS,
        retire_others: bool = True,
    ) -> ModelStatus:
        """Load ``path`` as ``name``/``version`` and make it the default; never raises for a bad model.

        Batches that take less than ``inline_below_ms`` run on the event loop
        (see :mod:`.batcher`; 0 always uses the thread pool).
        With ``retire_others`` the other versions of ``name`` are unloaded once
        the new one serves (after their queued requests finish). Loading a
        version that is loaded from the same sha256 again only makes it the default.
        """
        spec = LoadSpec(name=name, version=version, path=str(path), sha256=sha256, variant=variant,
                        providers=tuple(providers), required_providers=tuple(required_providers),
                        max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                        inline_below_ms=inline_below_ms, forbidden_providers=tuple(forbidden_providers),
                        provider_options=dict(provider_options or {}), rtol=rtol, atol=atol,
                        finite_inputs=finite_inputs)
        return await self.load_spec(spec, retire_others=retire_others)

    async def load_spec(self, spec: LoadSpec, *, retire_others: bool = True) -> ModelStatus:
        """:meth:`load` of what ``spec`` says (a load asked for before, say: :meth:`requested`)."""
        name, version, sha256, path = spec.name, spec.version, spec.sha256, Path(spec.path)
        self._requested[name] = spec
        served = self._models.setdefault(name, ServedModel())
        async with served.lock:
            current = served.versions.get(version)
            if current is not None and sha256 and current.sha256 == sha256:
                served.default = version
                served.status = current.status()
                if self.mirror is not None:
                    await self.mirror.load(spec, retire_others=False)
                return served.status
            del current  # a version this load replaces is retired below: hold no reference to it
            model = await self._load_model(spec, path, served)
            if isinstance(model, ModelStatus):
                return model
            new, retiring = self._swap(served, spec, model, retire_others=retire_others)
            if self.mirror is not None:
                await self.mirror.load(spec, retire_others=retire_others)
        await _retire(retiring)
        return new.status()

    async def _load_model(self, spec: LoadSpec, path: Path, served: ServedModel) -> LoadedModel | ModelStatus:
        """The model loaded and smoke-tested off the loop, or the status that says why not (what serves stays)."""
        self._loading += 1
        try:
            return await asyncio.to_thread(
                load_model, path, preferred=spec.providers, required=spec.required_providers,
                forbidden=spec.forbidden_providers, provider_options=spec.provider_options, rtol=spec.rtol,
                atol=spec.atol, finite_inputs=spec.finite_inputs, priority=self.provider_priority,
                only=self.providers_only, intra_op_threads=self.intra_op_threads, instances=self.instances,
                cpus=self.cpus, available=self.available, session_factory=self.session_factory,
            )
        except LoadError as exc:
            state: Literal["refused", "failed"] = "refused" if isinstance(exc, ProviderError) else "failed"
            logger.error("model %s version %s not loaded (%s): %s; serving %s", spec.name, spec.version, state, exc,
                         served.default or "nothing")
            served.status = ModelStatus(name=spec.name, version=spec.version, sha256=spec.sha256,
                                        variant=spec.variant, state=state, error=str(exc)[:1000],
                                        serving_version=served.default)
            return served.status
        finally:
            self._loading -= 1

    def _swap(self, served: ServedModel, spec: LoadSpec, model: LoadedModel, *,
              retire_others: bool) -> tuple[ServedVersion, list[ServedVersion]]:
        """Serve ``model`` as its name's default; the versions it replaces, to retire once their requests finish."""
        metrics = self.metrics.of(spec.name, spec.version)
        batcher = Batcher(model, executor=self.executor, metrics=metrics, max_batch_size=spec.max_batch_size,
                          max_queue_delay_ms=spec.max_queue_delay_ms, inline_below_ms=spec.inline_below_ms,
                          instances=model.instances)
        batcher.start()
        new = ServedVersion(name=spec.name, version=spec.version, sha256=spec.sha256, variant=spec.variant,
                            model=model, batcher=batcher, metrics=metrics, max_batch_size=spec.max_batch_size,
                            max_queue_delay_ms=spec.max_queue_delay_ms, spec=spec)
        # The swap: no await between these lines, so every request sees
        # either the old default or the new one, never a gap.
        version = spec.version
        retiring = [v for v in (served.versions.pop(version, None),) if v is not None]
        served.versions[version] = new
        served.default = version
        if retire_others:
            for other in [v for v in served.versions if v != version]:
                retiring.append(served.versions.pop(other))
        served.status = new.status()
        logger.info("model %s version %s serving on %s, %s (load %.3fs, smoke test %.3fs)%s", spec.name, version,
                    model.provider, served.status.placement_text(), model.load_seconds, model.smoke_seconds,
                    f"; not on {model.fallback}" if model.fallback else "")
        return new, retiring

    async def unload(self, name: str, version: str | None = None) -> None:
        """Stop serving ``name`` (one version, or all); queued requests finish first."""
        served = self._models.get(name)
        if served is None:
            return
        async with served.lock:
            targets = [version] if version is not None else list(served.versions)
            retiring = [served.versions.pop(v) for v in targets if v in served.versions]
            if served.default not in served.versions:
                served.default = next(reversed(served.versions), None)
            if not served.versions:
                del self._models[name]
            elif served.status is not None and served.default is not None:
                served.status = served.versions[served.default].status()
            if self.mirror is not None and retiring:
                await self.mirror.unload(name, version)
        await _retire(retiring)

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # reads for the repository extension (see .extensions) -----------------------

    def requested_names(self) -> list[str]:
        """Every name a load was asked for (see :meth:`requested`), sorted."""
        return sorted(self._requested)

    def loading(self, name: str) -> bool:
        """A load or unload of ``name`` is under way."""
        served = self._models.get(name)
        return served is not None and served.lock.locked()

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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_runtime.protocol import ModelStatus
from edge_runtime.serving.batcher import DEFAULT_INLINE_BELOW_MS, Batcher
from edge_runtime.serving.loader import (
    DEFAULT_PROVIDER_PRIORITY,
    LoadedModel,
    LoadError,
    ProviderError,
    load_model,
)
from edge_runtime.serving.metrics import Metrics, ModelMetrics

logger = logging.getLogger("edge_runtime.serving")


class ModelNotFound(LookupError):
    """No such model, or no such version of it loaded; the message says which."""


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
    # The app's caches for this version (see OIPApp): parsed binary request headers, answer heads.
    request_plans: dict[bytes, Any] = field(default_factory=dict)
    answer_heads: dict[Any, Any] = field(default_factory=dict)

    def status(self) -> ModelStatus:
        return ModelStatus(name=self.name, version=self.version, sha256=self.sha256, variant=self.variant,
                           provider=self.model.provider, state="serving", serving_version=self.version)


@dataclass
class ServedModel:
    versions: dict[str, ServedVersion] = field(default_factory=dict)
    default: str | None = None
    status: ModelStatus | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelRegistry:
    def __init__(self, *, provider_priority: Sequence[str] = DEFAULT_PROVIDER_PRIORITY,
                 intra_op_threads: int = 0, instances: int = 0, inference_threads: int = 4,
                 metrics: Metrics | None = None) -> None:
        """``instances``: batches of one model run side by side (0: chosen per model, see
        :func:`~edge_runtime.serving.loader.auto_instances`); ``intra_op_threads``
        (0: the CPUs shared out among the instances) is per run."""
        if instances < 0:
            raise ValueError("instances must not be negative")
        self.provider_priority = tuple(provider_priority)
        self.intra_op_threads = intra_op_threads
        self.instances = instances
        self.metrics = metrics or Metrics()
        # Inference runs here; loading uses the loop's default executor so
        # that a slow load never takes a thread that requests are waiting for.
        self.executor = ThreadPoolExecutor(max_workers=inference_threads, thread_name_prefix="inference")
        self._models: dict[str, ServedModel] = {}
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

    def statuses(self) -> list[ModelStatus]:
        return [s.status for _, s in sorted(self._models.items()) if s.status is not None]

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
        served = self._models.setdefault(name, ServedModel())
        async with served.lock:
            current = served.versions.get(version)
            if current is not None and sha256 and current.sha256 == sha256:
                served.default = version
                served.status = current.status()
                return served.status
            self._loading += 1
            try:
                model = await asyncio.to_thread(
                    load_model, path, preferred=providers, required=required_providers,
                    priority=self.provider_priority, intra_op_threads=self.intra_op_threads,
                    instances=self.instances,
                )
            except LoadError as exc:
                state: Literal["refused", "failed"] = "refused" if isinstance(exc, ProviderError) else "failed"
                logger.error("model %s version %s not loaded (%s): %s; serving %s", name, version, state, exc,
                             served.default or "nothing")
                served.status = ModelStatus(name=name, version=version, sha256=sha256, variant=variant,
                                            state=state, error=str(exc)[:1000], serving_version=served.default)
                return served.status
            finally:
                self._loading -= 1
            metrics = self.metrics.of(name, version)
            batcher = Batcher(model, executor=self.executor, metrics=metrics, max_batch_size=max_batch_size,
                              max_queue_delay_ms=max_queue_delay_ms, inline_below_ms=inline_below_ms,
                              instances=model.instances)
            batcher.start()
            new = ServedVersion(name=name, version=version, sha256=sha256, variant=variant, model=model,
                                batcher=batcher, metrics=metrics, max_batch_size=max_batch_size,
                                max_queue_delay_ms=max_queue_delay_ms)
            # The swap: no await between these lines, so every request sees
            # either the old default or the new one, never a gap.
            replaced = served.versions.pop(version, None)
            served.versions[version] = new
            served.default = version
            retiring = [replaced] if replaced is not None else []
            if retire_others:
                for other in [v for v in served.versions if v != version]:
                    retiring.append(served.versions.pop(other))
            served.status = new.status()
            logger.info("model %s version %s serving on %s (load %.3fs, smoke test %.3fs)", name, version,
                        model.provider, model.load_seconds, model.smoke_seconds)
        for old in retiring:
            await old.batcher.close()
        return new.status()

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
        for old in retiring:
            await old.batcher.close()

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)
        self.executor.shutdown(wait=False, cancel_futures=True)

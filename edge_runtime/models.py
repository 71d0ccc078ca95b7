"""The node's model artifacts: download, verify, load; and the agent's ``models`` plug-in (:class:`ModelService`).

:class:`ModelStore` brings the model server in line with a list of
:class:`~edge_runtime.protocol.DesiredModel`. For each one it

1. checks the artifact signature (Ed25519 over the sha256, by the key pinned
   at enrollment), so a forged entry costs no download;
2. uses ``<state_dir>/artifacts/<sha256>.onnx`` if it is there, after hashing
   it again: a file altered on this node's disk is refused and deleted (the
   next reconcile downloads it afresh);
3. otherwise downloads ``GET {url}/agent/v1/nodes/{node}/artifacts/{sha256}``
   into ``<sha256>.partial``, resuming with a Range request when a partial
   file is there, stops at the announced size, and checks the sha256;
4. only then moves it to ``<sha256>.onnx`` and hands it to the registry,
   which smoke-tests it and swaps it in.

Before any of that, the site's policy decides (step 0): a model whose
classification the placement policy in the signed bundle
(``DesiredState.policy``, see :mod:`edge_runtime.policy.placement`) forbids
at this site is refused, whatever else the desired state says, with the rule
named in the status; and whatever version of that model still serves is
unloaded too, since the classification belongs to the model, not the
version. A bundle that does not validate refuses every model (fail closed);
an empty bundle (a control plane without policies) enforces nothing.

onnxruntime never sees a byte that did not pass steps 1-3. A refused or
failed model never touches the version that serves: it keeps serving and is
named in the status as ``serving_version``. Versions no longer desired are
unloaded, except a last known good one whose replacement does not serve
yet. Downloads that fail for a passing reason (network, 5xx) are retried in
the background with back-off, so the agent only calls :meth:`reconcile`
when its desired state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_runtime import signing
from edge_runtime.policy.placement import PolicyBundle, site_decision
from edge_runtime.protocol import API_PREFIX, DesiredModel, DesiredState, ModelStats, ModelStatus
from edge_runtime.serving.registry import ModelRegistry

if TYPE_CHECKING:
    from edge_runtime.audit import NodeAudit

logger = logging.getLogger("edge_runtime.models")

CHUNK_BYTES = 1024 * 1024
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
RETRY_BASE_S = 2.0
RETRY_MAX_S = 300.0


class ArtifactRefused(Exception):
    """The artifact is not the one the signed desired state names (hash, signature, size)."""


class PolicyRefused(ArtifactRefused):
    """The site's policy forbids this model here."""


class DownloadError(Exception):
    """The artifact could not be fetched this time (network, HTTP status); worth retrying."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        state_dir: Path,
        base_url: str,
        node_id: str,
        credential: str,
        public_key: Ed25519PublicKey | str,
        client: httpx.AsyncClient | None = None,
        retry_base_s: float = RETRY_BASE_S,
        audit: NodeAudit | None = None,
    ) -> None:
        self.registry = registry
        # The node's audit log: each model's changes of state are recorded there (None: not recorded).
        self.audit = audit
        self._recorded: dict[tuple[str, str], str] = {}
        self.artifacts = Path(state_dir) / "artifacts"
        self.base_url = base_url.rstrip("/")
        self.node_id = node_id
        self.credential = credential
        self.public_key = signing.public_key_from_b64(public_key) if isinstance(public_key, str) else public_key
        self._client = client
        self._own_client = client is None
        self.retry_base_s = retry_base_s
        self._lock = asyncio.Lock()
        self._desired: list[DesiredModel] = []
        self._policy: PolicyBundle | str | None = None
        self._statuses: list[ModelStatus] = []
        self._retry: asyncio.Task[None] | None = None
        self._attempt = 0

    # the agent's entry points ---------------------------------------------------

    async def reconcile(self, desired: Sequence[DesiredModel],
                        policy: PolicyBundle | str | None = None) -> list[ModelStatus]:
        """Serve exactly ``desired`` (as far as each one verifies, is allowed and loads); one status per entry.

        ``policy`` is the site's bundle, or a string saying why the bundle is
        invalid (then every model is refused), or None (nothing to enforce).
        Safe to call again with the same list: what already serves stays as it is.
        """
        if self._retry is not None and self._retry is not asyncio.current_task():
            self._retry.cancel()
            self._retry = None
            self._attempt = 0
        self._policy = policy
        return await self._reconcile(list(desired))

    def statuses(self) -> list[ModelStatus]:
        """What the last reconcile left (and background retries since), with the serving counters
        of each serving version: for the agent's actual state."""
        return [self._with_stats(s) for s in self._statuses]

    def _with_stats(self, status: ModelStatus) -> ModelStatus:
        if status.state != "serving":
            return status
        snapshot = self.registry.metrics.snapshot(status.name, status.version)
        if snapshot is None:
            return status
        requests, errors, bounds, counts, total = snapshot
        return status.model_copy(update={"stats": ModelStats(
            requests=requests, errors=errors, latency_bounds=list(bounds), latency_counts=list(counts),
            latency_sum_s=max(0.0, total))})

    def check_policy(self, model: DesiredModel) -> None:
        """Raise PolicyRefused if the site's policy forbids ``model`` here."""
        policy = self._policy
        if policy is None:
            return
        if isinstance(policy, str):
            raise PolicyRefused(f"refused by site policy: the policy bundle is invalid ({policy})")
        decision = site_decision(policy.placement, policy.site.facts(), model.classification)
        if not decision.allowed:
            raise PolicyRefused(f"refused by site policy (rule {decision.rule}, placement policy version "
                                f"{policy.placement_version}): {decision.reason}")

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # reconciling ------------------------------------------------------------------

    async def _reconcile(self, desired: list[DesiredModel]) -> list[ModelStatus]:
        async with self._lock:
            self._desired = desired
            self.artifacts.mkdir(parents=True, exist_ok=True)
            statuses: list[ModelStatus] = []
            transient = False
            forbidden: set[str] = set()
            for model in desired:
                try:
                    self.check_policy(model)
                except PolicyRefused as exc:
                    forbidden.add(model.name)
                    statuses.append(self._not_serving(model, "refused", str(exc)).model_copy(
                        update={"serving_version": None}))
                    logger.error("model %s version %s %s", model.name, model.version, exc)
                    continue
                try:
                    path = await self.fetch(model)
                except ArtifactRefused as exc:
                    statuses.append(self._not_serving(model, "refused", str(exc)))
                    logger.error("model %s version %s refused: %s", model.name, model.version, exc)
                    continue
                except DownloadError as exc:
                    transient = True
                    statuses.append(self._not_serving(model, "failed", str(exc)))
                    logger.warning("model %s version %s not downloaded: %s", model.name, model.version, exc)
                    continue
                statuses.append(await self.registry.load(
                    model.name, model.version, path, sha256=model.sha256, variant=model.variant,
                    providers=model.providers, required_providers=model.required_providers,
                    forbidden_providers=model.forbidden_providers, provider_options=model.provider_options,
                    rtol=model.rtol, atol=model.atol, finite_inputs=model.finite_inputs,
                    max_batch_size=model.max_batch_size, max_queue_delay_ms=model.max_queue_delay_ms,
                    retire_others=False,
                ))
                if statuses[-1].state != "serving":
                    self.registry.metrics.load_failed(model.name)
            await self._unload_undesired(desired, statuses, forbidden)
            self._collect_garbage(desired)
            self._statuses = statuses
            self._record(statuses)
            if transient:
                self._schedule_retry()
            else:
                self._attempt = 0
            return statuses

    def _not_serving(self, model: DesiredModel, state: Any, error: str) -> ModelStatus:
        return ModelStatus(name=model.name, version=model.version, sha256=model.sha256, variant=model.variant,
                           state=state, error=error[:1000], serving_version=self.registry.serving_version(model.name))

    async def _unload_undesired(self, desired: list[DesiredModel], statuses: list[ModelStatus],
                                forbidden: set[str]) -> None:
        for name in sorted(forbidden):
            if self.registry.versions(name):
                # The policy forbids the model itself: no last known good version of it either.
                logger.warning("unloading every version of model %s (forbidden by site policy)", name)
                for version in self.registry.versions(name):
                    self._audit("model.unloaded",
                                {"name": name, "version": version, "reason": "forbidden by site policy"})
                await self.registry.unload(name)
        wanted = {(m.name, m.version) for m in desired if m.name not in forbidden}
        serving_names = {s.name for s in statuses if s.state == "serving"}
        desired_names = {m.name for m in desired}
        for name in self.registry.names():
            for version in self.registry.versions(name):
                if (name, version) in wanted:
                    continue
                # Last known good: an old version keeps serving until a desired one does.
                if name in desired_names and name not in serving_names:
                    continue
                logger.info("unloading model %s version %s (no longer desired)", name, version)
                self._audit("model.unloaded", {"name": name, "version": version, "reason": "no longer desired"})
                await self.registry.unload(name, version)

    def _record(self, statuses: list[ModelStatus]) -> None:
        """Audit each model version whose state changed since the last reconcile (serving, refused, failed)."""
        for status in statuses:
            key = (status.name, status.version)
            if self._recorded.get(key) == status.state:
                continue
            self._recorded[key] = status.state
            action = {"serving": "model.loaded", "refused": "model.refused"}.get(status.state, "model.failed")
            detail: dict[str, Any] = {"name": status.name, "version": status.version, "sha256": status.sha256,
                                      "state": status.state}
            if status.error:
                detail["error"] = status.error[:500]
            self._audit(action, detail)
        current = {(s.name, s.version) for s in statuses}
        for key in [k for k in self._recorded if k not in current]:
            del self._recorded[key]

    def _audit(self, action: str, detail: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.record(action, detail)

    def _collect_garbage(self, desired: list[DesiredModel]) -> None:
        keep = {m.sha256 for m in desired} | {v.sha256 for v in self.registry.loaded()}
        for path in self.artifacts.iterdir():
            sha, _, suffix = path.name.partition(".")
            if suffix in ("onnx", "partial") and sha not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _schedule_retry(self) -> None:
        delay = min(RETRY_MAX_S, self.retry_base_s * 2 ** self._attempt) * random.uniform(0.5, 1.0)
        self._attempt += 1
        logger.info("retrying model downloads in %.1fs", delay)
        self._retry = asyncio.get_running_loop().create_task(self._retry_later(delay), name="model-store-retry")

    async def _retry_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._reconcile(self._desired)

    # artifacts --------------------------------------------------------------------

    def artifact_url(self, sha256: str) -> str:
        return f"{self.base_url}{API_PREFIX}/nodes/{self.node_id}/artifacts/{sha256}"

    async def fetch(self, model: DesiredModel) -> Path:
        """The verified artifact of ``model`` on disk; raises ArtifactRefused or DownloadError."""
        try:
            signing.verify_artifact(model.sha256, model.signature, self.public_key)
        except signing.SignatureError as exc:
            raise ArtifactRefused(f"artifact {model.sha256[:16]}: {exc}") from None
        final = self.artifacts / f"{model.sha256}.onnx"
        if final.exists():
            actual = await asyncio.to_thread(sha256_of, final)
            if actual == model.sha256:
                return final
            # Altered after it was verified: never load it; the next
            # reconcile downloads a clean copy.
            with contextlib.suppress(OSError):
                final.unlink()
            raise ArtifactRefused(f"the artifact on disk for {model.sha256[:16]} has sha256 {actual[:16]}: "
                                  f"it was altered on this node; deleted, it will be downloaded again")
        partial = self.artifacts / f"{model.sha256}.partial"
        await self._download(model, partial)
        actual = await asyncio.to_thread(sha256_of, partial)
        if actual != model.sha256:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise ArtifactRefused(f"the downloaded artifact has sha256 {actual[:16]}, not the signed "
                                  f"{model.sha256[:16]}; discarded")
        os.replace(partial, final)
        return final

    async def _download(self, model: DesiredModel, partial: Path) -> None:
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > model.size:
            partial.unlink()
            offset = 0
        if offset == model.size:
            return  # complete already; the hash decides
        headers = {"Authorization": f"Bearer {self.credential}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        client = self._http()
        url = self.artifact_url(model.sha256)
        try:
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code == 206 and offset:
                    content_range = response.headers.get("Content-Range", "")
                    if not content_range.startswith(f"bytes {offset}-"):
                        raise DownloadError(f"the server answered range bytes={offset}- with {content_range!r}")
                    mode = "ab"
                elif response.status_code == 200:
                    offset, mode = 0, "wb"
                elif response.status_code == 416:
                    partial.unlink(missing_ok=True)
                    raise DownloadError("the partial download no longer fits the artifact; starting over")
                else:
                    body = (await response.aread())[:300].decode(errors="replace")
                    raise DownloadError(f"GET {url} answered {response.status_code}: {body}")
                written = offset
                with partial.open(mode) as fh:
                    # As received (no chunk_size): bytes buffered by httpx would be
                    # lost when the connection drops, and the resume would start earlier.
                    async for chunk in response.aiter_bytes():
                        written += len(chunk)
                        if written > model.size:
                            fh.close()
                            partial.unlink(missing_ok=True)
                            raise ArtifactRefused(f"the artifact is larger than the signed size of {model.size} "
                                                  f"bytes; discarded")
                        fh.write(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
        except httpx.HTTPError as exc:
            # What arrived stays in the .partial file; the next try resumes there.
            raise DownloadError(f"downloading {model.sha256[:16]} failed: {type(exc).__name__}: {exc}") from None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=HTTP_TIMEOUT)
        return self._client


class ModelService:
    """The agent's ``models`` plug-in: reconciles models, reports what serves as ``actual.detail["models"]``."""

    name = "models"

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]:
        statuses = await self.store.reconcile(desired.models, policy_bundle(desired.policy))
        return {"models": [s.model_dump(mode="json", exclude={"stats"}) for s in statuses]}

    def model_status(self) -> list[ModelStatus]:
        """What serves now (background retries and swaps included), for every sync."""
        return self.store.statuses()

    def pin_key(self, public_key: Ed25519PublicKey) -> None:
        """Artifacts of later desired states are signed by the control plane's new key."""
        self.store.public_key = public_key


def policy_bundle(policy: dict[str, Any]) -> PolicyBundle | str | None:
    """The bundle of a desired state; a string saying what is wrong if it does not validate; None if empty."""
    if not policy:
        return None
    try:
        return PolicyBundle.model_validate(policy)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "bundle"
        return f"{where}: {first.get('msg', 'invalid')}"

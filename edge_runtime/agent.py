"""The agent: keeps this node in step with the control plane.

Two tasks run side by side:

* the **sync loop** POSTs a :class:`~edge_runtime.protocol.SyncRequest`
  (hardware, actual state, health, refusals) every sync interval (±10 %
  jitter, so a fleet restarted together does not sync in lockstep) and
  applies the signed desired state the answer carries when the generation
  moved;
* the **stream** keeps a websocket open to the control plane, which pushes a
  nudge the moment this node's desired state changes; each nudge wakes the
  sync loop at once. The stream is an accelerator only: when it cannot
  connect, polling carries on unchanged;
* with :mod:`edge_runtime.telemetry`, a **collect loop** takes a telemetry
  point every few seconds into the node's store-and-forward queue, whether
  or not the control plane is reachable, and the stream session sends what
  waits there (acknowledged points leave the queue).

What the node accepts: a desired state signed by the key pinned at
enrollment (or by a key that key endorsed when the control plane rotated it,
which the node then pins), addressed to this node, and not older than what it
already applied: a later epoch, or the same epoch at the same or a higher
generation (see :class:`~edge_runtime.protocol.DesiredState`). The state on
disk is held to the same floor at start-up. Anything else is refused: the
node keeps serving what it has, logs the refusal, audits it once per refused
document, and reports it as ``actual.refusing`` (and in its health) on every
sync until it applies a state again.

Failures (no connection, timeout, 5xx) are retried with exponential back-off
and full jitter: ``uniform(0, min(cap, 1 s * 2**attempt))`` with the cap at
``min(60 s, 6 * sync interval)``. A refused credential (401/403/404: the node
was revoked or is unknown) is logged as such and retried at the cap, so a
revoked node neither crash-loops nor hammers the control plane.

The last verified desired state lives on disk (:mod:`edge_runtime.state`),
so a node that starts while the control plane is out of reach carries on
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import random
import signal
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from edge_runtime import __version__, signing
from edge_runtime.hardware import detect_hardware
from edge_runtime.protocol import (
    API_PREFIX,
    ActualState,
    DesiredState,
    Hardware,
    Health,
    KeyEndorsement,
    ModelStatus,
    Nudge,
    QueryRequest,
    Refusal,
    SignedDesiredState,
    StreamError,
    StreamMessage,
    SyncRequest,
    SyncResponse,
    TelemetryAck,
)
from edge_runtime.replies import refusal
from edge_runtime.state import REMEMBERED_REFUSALS, Identity, StateDir, StateError, Status
from edge_runtime.telemetry import Telemetry, TelemetryStalled

logger = logging.getLogger("edge_runtime.agent")

BACKOFF_BASE_S = 1.0
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 60.0
# The cap is also bounded by the sync interval, so a fleet on a short interval
# finds its control plane again soon after it comes back.
BACKOFF_INTERVALS = 6
INTERVAL_JITTER = 0.1
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
STREAM_OPEN_TIMEOUT_S = 10.0
# Nudges are tiny; anything large on the stream is not from a sane control plane.
STREAM_MAX_MESSAGE_BYTES = 64 * 1024
# The protocol accepts at most this many refusals per sync.
MAX_PENDING_REFUSALS = 100
# Statuses that mean "this credential is not accepted": retrying fast cannot help.
CREDENTIAL_REFUSED = frozenset({401, 403, 404})
STREAM_MESSAGE: TypeAdapter[Nudge | TelemetryAck | StreamError] = TypeAdapter(StreamMessage)


def backoff_ceiling(attempt: int, *, base: float = BACKOFF_BASE_S, factor: float = BACKOFF_FACTOR,
                    cap: float = BACKOFF_MAX_S) -> float:
    """The largest delay before retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    # min() on the exponent keeps factor**attempt finite however long the outage.
    return float(min(cap, base * factor ** min(attempt, 64)))


def backoff_delay(attempt: int, rng: random.Random, *, base: float = BACKOFF_BASE_S,
                  factor: float = BACKOFF_FACTOR, cap: float = BACKOFF_MAX_S) -> float:
    """Exponential back-off with full jitter: uniform between 0 and the attempt's ceiling."""
    return rng.uniform(0.0, backoff_ceiling(attempt, base=base, factor=factor, cap=cap))


def backoff_cap(sync_interval_s: float) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_INTERVALS * sync_interval_s)


def jittered_interval(interval: float, rng: random.Random, *, jitter: float = INTERVAL_JITTER) -> float:
    return interval * rng.uniform(1.0 - jitter, 1.0 + jitter)


def stream_url(base_url: str, node_id: str) -> str:
    """The node's websocket URL: ws:// for http://, wss:// for https://, same host and path prefix."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"control-plane URL must be http:// or https://, not {base_url!r}")
    path = f"{parts.path.rstrip('/')}{API_PREFIX}/nodes/{node_id}/stream"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def document_digest(signed: SignedDesiredState) -> str:
    return hashlib.sha256(f"{signed.payload}\n{signed.signature}".encode()).hexdigest()


def claimed_generation(payload: str) -> int:
    """The generation an unverified payload claims, for reporting a refusal only; 0 if unreadable."""
    try:
        value = json.loads(payload).get("generation", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


class SyncFailed(Exception):
    """A sync that may succeed if retried: no connection, timeout, 5xx, garbled answer."""


class CredentialRefused(Exception):
    """The control plane does not accept this node's credential (revoked or unknown)."""


class Reconciler(Protocol):
    """One feature's part of applying a desired state (models, policy, datasets).

    ``reconcile`` brings the node in line with ``desired`` and returns what
    it now runs, which the node reports as ``actual.detail[name]``. It must
    be safe to call again with the same desired state (it is called on every
    start with the state from disk), and must leave the last good state in
    place when it fails.
    """

    name: str

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]: ...


@runtime_checkable
class ReportsModels(Protocol):
    """A reconciler that also knows what actually serves each model (``actual.models``).

    Asked on every sync rather than only after a reconcile, because what
    serves can change in between (a swap completes, a model fails).
    """

    def model_status(self) -> list[ModelStatus]: ...


@runtime_checkable
class PinsKey(Protocol):
    """A reconciler that verifies signatures with the control plane's key (model artifacts).

    Told of a new key when the node pins one after a key rotation, before it
    reconciles the first state that key signed.
    """

    def pin_key(self, public_key: Ed25519PublicKey) -> None: ...


@runtime_checkable
class AnswersQueries(Protocol):
    """A reconciler that answers federated queries (:class:`edge_runtime.datasets.DatasetService`).

    ``report`` is asked on every sync (its datasets change between desired
    states); ``queries_received`` gets the queries of every successful sync
    answer, an empty list included: a sync that succeeded also says that
    answers waiting for the control plane can go out now.
    """

    def report(self) -> dict[str, Any]: ...

    def queries_received(self, queries: list[QueryRequest]) -> None: ...


class Agent:
    def __init__(self, state: StateDir, *, reconcilers: Sequence[Reconciler] = (),
                 rng: random.Random | None = None, hardware: Hardware | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.state = state
        self.telemetry = telemetry
        self.identity: Identity = state.load_identity()
        self.public_key = self.identity.public_key()
        self.status: Status = state.load_status()
        self.status.highest_generation = max(self.status.highest_generation, self.status.applied_generation)
        self.reconcilers = list(reconcilers)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.hardware = hardware
        self.signed: SignedDesiredState | None = None
        self.desired: DesiredState | None = None
        self.detail: dict[str, Any] = {}
        self.problems: dict[str, str] = {}
        self.interval = self.identity.sync_interval_s
        self.base_url = self.identity.url.rstrip("/")
        self.sync_url = f"{self.base_url}{API_PREFIX}/nodes/{self.identity.node_id}/sync"
        self.stream_url = stream_url(self.base_url, self.identity.node_id)
        self.started = time.monotonic()
        self.synced_once = False
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    # the desired state ----------------------------------------------------

    async def load(self) -> None:
        """Pick up the last verified desired state from disk, verifying it again."""
        try:
            loaded = self.state.load_desired(self.identity)
        except StateError as exc:
            # Nothing verified is applied now; the control plane will send the
            # current state again because the node reports generation 0.
            self.status.applied_generation = 0
            self.problems["desired_state_file"] = str(exc)
            reason = f"desired state on disk refused: {exc}"
            raw = b""
            with contextlib.suppress(OSError):
                raw = self.state.desired_path.read_bytes()
            generation = 0
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                generation = claimed_generation(json.loads(raw).get("payload", ""))
            self._refuse(generation=generation, reason=reason, digest=hashlib.sha256(raw).hexdigest())
            return
        if loaded is None:
            self.status.applied_generation = 0
            logger.info("no desired state on disk yet; waiting for the control plane")
            return
        signed, desired = loaded
        older = self._below_floor(desired)
        if older is not None:
            # Held to the same floor as a network update: an older signed
            # state copied onto disk is refused, never applied.
            self.status.applied_generation = 0
            self._refuse(generation=desired.generation, digest=document_digest(signed),
                         reason=f"desired state on disk refused: {older}")
            return
        if signed.key_fingerprint != self.identity.signing_key_fingerprint:
            # Stored, but the node stopped before it pinned the key that signed it.
            path = signing.follow_key_chain(signed.key_chain, pinned_fingerprint=self.identity.signing_key_fingerprint,
                                            pinned_key=self.public_key, target_fingerprint=signed.key_fingerprint)
            self._pin(path[-1])
        await self._apply(signed, desired, persist=False)
        logger.info("loaded desired state generation=%d from disk", desired.generation)

    async def consider(self, signed: SignedDesiredState) -> bool:
        """Apply ``signed`` if it is acceptable, else record a refusal. True if applied."""
        digest = document_digest(signed)
        if self.signed is not None and document_digest(self.signed) == digest:
            # The state already applied, sent again: whatever was refused before is no longer offered.
            self._offered_applied()
            return False
        claimed = claimed_generation(signed.payload)
        try:
            desired, endorsement = signing.verify_with_chain(
                signed, pinned_fingerprint=self.identity.signing_key_fingerprint, pinned_key=self.public_key)
        except signing.SignatureError as exc:
            reason = str(exc)
            if signed.key_fingerprint != self.identity.signing_key_fingerprint and "endorse" not in reason:
                reason = (f"signed by key {signed.key_fingerprint[:16]}, not the pinned key "
                          f"{self.identity.signing_key_fingerprint[:16]} ({exc})")
            self._refuse(generation=claimed, reason=reason, digest=digest)
            return False
        if desired.node_id != self.identity.node_id:
            self._refuse(generation=desired.generation, digest=digest,
                         reason=f"addressed to node {desired.node_id}, not this node {self.identity.node_id}")
            return False
        older = self._below_floor(desired)
        if older is not None:
            self._refuse(generation=desired.generation, digest=digest, reason=older)
            return False
        if (self.desired is not None and desired.epoch == self.desired.epoch
                and desired.generation == self.desired.generation):
            self._refuse(generation=desired.generation, digest=digest,
                         reason=f"generation {desired.generation} is already applied with different content")
            return False
        try:
            self.state.save_desired(signed)
        except OSError as exc:
            # Not a refusal: the document is fine, the disk is not. Keep the
            # current state; the control plane offers it again next sync.
            self._note_error(f"cannot store desired state generation={desired.generation}: {exc}")
            logger.error("cannot store desired state generation=%d: %s", desired.generation, _one_line(exc))
            return False
        if endorsement is not None:
            self._pin(endorsement)
        await self._apply(signed, desired, persist=True)
        logger.info("applied desired state generation=%d", desired.generation)
        return True

    def _offered_applied(self) -> None:
        if self.status.refusing is not None:
            logger.info("no longer offered the refused generation %d; the state applied is current again",
                        self.status.refusing.generation)
            self.status.refusing = None
            self._save_status()

    def _below_floor(self, desired: DesiredState) -> str | None:
        """Why ``desired`` is older than what this node applied; None if it may be applied."""
        status = self.status
        if desired.epoch != status.epoch:
            current, offered = status.epoch_started_at, desired.epoch_started_at
            if current is not None and (offered is None or offered <= current):
                return (f"epoch {desired.epoch or '(none)'} (started {offered.isoformat() if offered else 'never'}) "
                        f"is older than epoch {status.epoch} in force since {current.isoformat()}")
            return None
        if desired.generation < status.highest_generation:
            return (f"generation {desired.generation} is lower than applied {status.highest_generation} "
                    f"in epoch {status.epoch or '(none)'}")
        return None

    def _pin(self, endorsement: KeyEndorsement) -> None:
        """Pin the control plane's new signing key (its endorsement already verified)."""
        previous = self.identity.signing_key_fingerprint
        self.identity = self.identity.model_copy(update={"signing_public_key": endorsement.public_key,
                                                         "signing_key_fingerprint": endorsement.fingerprint})
        self.state.save_identity(self.identity)
        self.public_key = self.identity.public_key()
        for reconciler in self.reconcilers:
            if isinstance(reconciler, PinsKey):
                reconciler.pin_key(self.public_key)
        logger.warning("pinned the control plane's new signing key %s (endorsed by the key pinned before, %s)",
                       endorsement.fingerprint[:16], previous[:16])

    async def _apply(self, signed: SignedDesiredState, desired: DesiredState, *, persist: bool) -> None:
        self.signed, self.desired = signed, desired
        self.interval = desired.sync_interval_s
        self.problems.pop("desired_state_file", None)
        if persist:
            # A new state applied ends the refusal; the same state loaded from disk does not.
            self.status.refusing = None
        self.detail = await self.reconcile(desired)
        status = self.status
        status.applied_generation = desired.generation
        if desired.epoch != status.epoch:
            status.epoch, status.epoch_started_at = desired.epoch, desired.epoch_started_at
            status.highest_generation = desired.generation
            logger.info("now in epoch %s (started %s)", desired.epoch or "(none)",
                        desired.epoch_started_at.isoformat() if desired.epoch_started_at else "never")
        else:
            status.highest_generation = max(status.highest_generation, desired.generation)
        if persist:
            self._save_status(durable=True)

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]:
        """Bring the node in line with ``desired``; returns the actual state's detail.

        Storing the document and adopting its sync interval happen before
        this; each feature (models, policy, data) adds a :class:`Reconciler`.
        A failing reconciler is reported in its detail and in health; the
        others still run, and the generation counts as applied so that the
        control plane sees the node's own account of what went wrong.
        """
        detail: dict[str, Any] = {}
        for reconciler in self.reconcilers:
            try:
                detail[reconciler.name] = await reconciler.reconcile(desired)
            except Exception as exc:  # noqa: BLE001 - one feature's failure must not stop the node
                message = f"{type(exc).__name__}: {_one_line(exc)}"
                logger.error("reconcile %s failed generation=%d: %s", reconciler.name, desired.generation, message)
                detail[reconciler.name] = {"error": message}
                self.problems[f"reconcile.{reconciler.name}"] = message
            else:
                self.problems.pop(f"reconcile.{reconciler.name}", None)
        return detail

    def _refuse(self, *, generation: int, reason: str, digest: str) -> None:
        reason = _one_line(reason)
        if digest in self.status.refused_digests and self.status.refusing is not None:
            logger.debug("refused desired state generation=%d again (already reported)", generation)
            return
        refusal = Refusal(generation=generation, reason=reason[:500], at=dt.datetime.now(dt.UTC))
        # Reported on every sync until a state is applied, and in health.
        self.status.refusing = refusal
        if digest in self.status.refused_digests:
            self._save_status()
            return
        logger.warning("refused desired state generation=%d: %s", generation, reason)
        self.status.pending_refusals = [*self.status.pending_refusals, refusal][-MAX_PENDING_REFUSALS:]
        self.status.refused_digests = [*self.status.refused_digests, digest][-REMEMBERED_REFUSALS:]
        self._note_error(f"refused desired state generation={generation}: {reason}")
        self._save_status()

    # syncing ------------------------------------------------------------------

    def sync_request(self) -> SyncRequest:
        return SyncRequest(
            runtime_version=__version__,
            hardware=self.hardware,
            actual=ActualState(applied_generation=self.status.applied_generation, applied_epoch=self.status.epoch,
                               refusing=self.status.refusing, models=self.model_status(),
                               detail={**self.detail, **{r.name: r.report() for r in self.reconcilers
                                                         if isinstance(r, AnswersQueries)}}),
            health=self.health(),
            refusals=list(self.status.pending_refusals),
        )

    def model_status(self) -> list[ModelStatus]:
        models: list[ModelStatus] = []
        for reconciler in self.reconcilers:
            if isinstance(reconciler, ReportsModels):
                try:
                    models.extend(reconciler.model_status())
                except Exception as exc:  # noqa: BLE001 - a report that fails must not stop the sync
                    logger.error("model status of %s failed: %s", reconciler.name, _one_line(exc))
        return models

    def health(self) -> Health:
        problems = dict(self.problems)
        if self.status.pending_refusals:
            problems["refusals"] = f"{len(self.status.pending_refusals)} desired state(s) refused"
        if self.status.refusing is not None:
            problems["desired_state"] = (f"refusing generation {self.status.refusing.generation}: "
                                         f"{self.status.refusing.reason}")
        return Health(
            status="degraded" if problems else "ok",
            uptime_s=round(time.monotonic() - self.started, 3),
            failed_syncs=self.status.consecutive_failures,
            message="; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))[:500],
        )

    async def sync_once(self) -> SyncResponse:
        """One sync. Raises SyncFailed or CredentialRefused; applies what the answer carries."""
        if self._client is None:
            raise RuntimeError("sync_once needs the HTTP client that run() opens")
        request = self.sync_request()
        try:
            response = await self._client.post(
                self.sync_url, content=request.model_dump_json(), headers={"Content-Type": "application/json"}
            )
        except httpx.TimeoutException as exc:
            raise SyncFailed(f"timed out talking to {self.base_url} ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise SyncFailed(f"cannot reach {self.base_url}: {_one_line(exc) or type(exc).__name__}") from exc
        if response.status_code in CREDENTIAL_REFUSED:
            raise CredentialRefused(f"HTTP {response.status_code}: {_error_message(response)}")
        if response.status_code != 200:
            raise SyncFailed(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            answer = SyncResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise SyncFailed(f"the control plane's answer is not a valid sync response: {exc.errors()[0]['msg']}"
                             ) from exc
        # The control plane has recorded everything this request carried.
        reported = len(request.refusals)
        self.status.pending_refusals = self.status.pending_refusals[reported:]
        failed_before = self.status.consecutive_failures
        self.status.consecutive_failures = 0
        self.status.last_sync_at = dt.datetime.now(dt.UTC)
        self.interval = answer.sync_interval_s
        applied = False
        if answer.desired is not None:
            applied = await self.consider(answer.desired)
        elif self.desired is not None and answer.generation == self.desired.generation:
            # The control plane holds what this node applied: nothing refused is on offer any more.
            self._offered_applied()
        # After the desired state: a query runs under the data policy that came with it.
        for reconciler in self.reconcilers:
            if isinstance(reconciler, AnswersQueries):
                reconciler.queries_received(list(answer.queries))
        level = logging.INFO if applied or failed_before or not self.synced_once or reported else logging.DEBUG
        extra = f" after {failed_before} failed attempts" if failed_before else ""
        extra += f" reported {reported} refusal(s)" if reported else ""
        logger.log(level, "sync ok generation=%d%s", self.status.applied_generation, extra)
        self.synced_once = True
        return answer

    async def sync_loop(self) -> None:
        attempt = 0
        while True:
            self.wake.clear()
            self.status.last_attempt_at = dt.datetime.now(dt.UTC)
            cap = backoff_cap(self.interval)
            try:
                await self.sync_once()
            except CredentialRefused as exc:
                self.status.consecutive_failures += 1
                delay = jittered_interval(cap, self.rng)
                self._note_error(f"credential refused: {exc}")
                logger.error("sync refused: credential not accepted (%s); the node may have been revoked; "
                             "retrying in %.1fs", exc, delay)
            except SyncFailed as exc:
                self.status.consecutive_failures += 1
                delay = backoff_delay(attempt, self.rng, cap=cap)
                self._note_error(f"sync failed: {exc}")
                logger.warning("sync failed attempt=%d: %s; retrying in %.1fs (backoff ceiling %.1fs)",
                               attempt + 1, exc, delay, backoff_ceiling(attempt, cap=cap))
                attempt += 1
            except Exception as exc:  # noqa: BLE001 - a bug in one sync must not kill the node; back off and retry
                self.status.consecutive_failures += 1
                delay = backoff_delay(attempt, self.rng, cap=cap)
                message = f"{type(exc).__name__}: {_one_line(exc)}"
                self._note_error(f"sync error: {message}")
                logger.error("sync error attempt=%d: %s; retrying in %.1fs", attempt + 1, message, delay)
                attempt += 1
            else:
                attempt = 0
                # A refusal found in this answer is reported at once rather than a full interval later.
                delay = 0.0 if self.status.pending_refusals else jittered_interval(self.interval, self.rng)
            self._save_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)

    async def stream_loop(self) -> None:
        attempt = 0
        headers = {"Authorization": f"Bearer {self.identity.credential}"}
        while True:
            try:
                # The bearer credential authenticates the node; agent routes
                # take no browser Origin check, so the node sends none.
                async with ws_connect(
                    self.stream_url, additional_headers=headers,
                    open_timeout=STREAM_OPEN_TIMEOUT_S,
                    max_size=STREAM_MAX_MESSAGE_BYTES, user_agent_header=f"edgewise-edge-runtime/{__version__}",
                ) as ws:
                    logger.info("stream connected")
                    attempt = 0
                    # Catch up with anything published while the stream was down.
                    self.wake.set()
                    await self._stream_session(ws)
                reason = "closed by the control plane"
            except InvalidStatus as exc:
                reason = f"refused with HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, WebSocketException, TelemetryStalled) as exc:
                reason = _one_line(exc) or type(exc).__name__
            cap = backoff_cap(self.interval)
            delay = backoff_delay(attempt, self.rng, cap=cap)
            attempt += 1
            logger.warning("stream disconnected: %s; reconnecting in %.1fs", reason, delay)
            await asyncio.sleep(delay)

    async def _stream_session(self, ws: Any) -> None:
        """Receive on ``ws`` and, with telemetry, send beside it; returns when either side ends."""
        tasks = [asyncio.create_task(self._receive(ws), name="stream-receive")]
        if self.telemetry is not None:
            tasks.append(asyncio.create_task(self.telemetry.run_session(ws.send), name="telemetry-send"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            failure = task.exception()
            if failure is not None:
                raise failure

    async def _receive(self, ws: Any) -> None:
        async for message in ws:
            try:
                parsed = STREAM_MESSAGE.validate_json(message)
            except ValidationError:
                logger.warning("stream message ignored: not one this node understands")
                continue
            if isinstance(parsed, Nudge):
                logger.info("nudge generation=%d", parsed.generation)
                self.wake.set()
            elif isinstance(parsed, TelemetryAck):
                if self.telemetry is not None:
                    self.telemetry.on_ack(parsed)
            else:
                logger.error("the control plane refused this node's telemetry: %s", _one_line(parsed.error))

    # running ------------------------------------------------------------------

    def stop(self, reason: str = "") -> None:
        if not self.stopping.is_set():
            logger.info("stopping%s", f" on {reason}" if reason else "")
        self.stopping.set()

    async def run(self) -> None:
        """Run until stop() (SIGTERM or SIGINT); the state on disk is consistent at every await."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        if self.hardware is None:
            # nvidia-smi may take a moment; the loop stays responsive meanwhile.
            self.hardware = await asyncio.to_thread(detect_hardware)
        logger.info("starting node=%s site=%s url=%s", self.identity.node_id, self.identity.site, self.base_url)
        await self.load()
        self._save_status()
        headers = {"Authorization": f"Bearer {self.identity.credential}",
                   "User-Agent": f"edgewise-edge-runtime/{__version__}"}
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers=headers) as client:
            self._client = client
            tasks = [asyncio.create_task(self.sync_loop(), name="sync"),
                     asyncio.create_task(self.stream_loop(), name="stream")]
            if self.telemetry is not None:
                tasks.append(asyncio.create_task(self.telemetry.collect_loop(), name="telemetry"))
            stopper = asyncio.create_task(self.stopping.wait(), name="stop")
            try:
                done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in [stopper, *tasks]:
                    task.cancel()
                await asyncio.gather(stopper, *tasks, return_exceptions=True)
                self._client = None
                self._save_status()
            for task in tasks:
                if task in done and task.exception() is not None:
                    raise RuntimeError(f"the {task.get_name()} task died") from task.exception()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logger.info("stopped")

    # bookkeeping --------------------------------------------------------------

    def _note_error(self, message: str) -> None:
        self.status.last_error = _one_line(message)[:500]
        self.status.last_error_at = dt.datetime.now(dt.UTC)

    def _save_status(self, *, durable: bool = False) -> None:
        try:
            self.state.save_status(self.status, durable=durable)
        except OSError as exc:
            # The report is lost, the node keeps running; the next write may succeed.
            logger.error("cannot write %s: %s", self.state.status_path, _one_line(exc))


def _error_message(response: httpx.Response) -> str:
    error, _ = refusal(response)
    if error is not None:
        return _one_line(error)[:300]
    return _one_line(response.reason_phrase) or "no error message"

"""Which desired states the agent applies, and how it records those it refuses (see the package doc)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from typing import Any

from edge_runtime import signing
from edge_runtime.agent.base import AgentBase, one_line
from edge_runtime.agent.plugins import PinsKey
from edge_runtime.protocol import (
    DesiredState,
    KeyEndorsement,
    Refusal,
    SignedDesiredState,
)
from edge_runtime.state import REMEMBERED_REFUSALS, StateError

logger = logging.getLogger("edge_runtime.agent")


# The protocol accepts at most this many refusals per sync.
MAX_PENDING_REFUSALS = 100


def document_digest(signed: SignedDesiredState) -> str:
    return hashlib.sha256(f"{signed.payload}\n{signed.signature}".encode()).hexdigest()


def claimed_generation(payload: str) -> int:
    """The generation an unverified payload claims, for reporting a refusal only; 0 if unreadable."""
    try:
        value = json.loads(payload).get("generation", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


class DesiredStates(AgentBase):
    """Loading, accepting, applying and refusing desired states."""

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
        """Apply ``signed`` if it is acceptable, else record a refusal. True if applied.

        From a sync's answer or a bundle's, one at a time.
        """
        async with self.applying:
            return await self._consider(signed)

    async def _consider(self, signed: SignedDesiredState) -> bool:
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
            logger.error("cannot store desired state generation=%d: %s", desired.generation, one_line(exc))
            return False
        if endorsement is not None:
            self._pin(endorsement)
        await self._apply(signed, desired, persist=True)
        logger.info("applied desired state generation=%d", desired.generation)
        self.record("desired.applied", {"generation": desired.generation, "epoch": desired.epoch})
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
                message = f"{type(exc).__name__}: {one_line(exc)}"
                logger.error("reconcile %s failed generation=%d: %s", reconciler.name, desired.generation, message)
                detail[reconciler.name] = {"error": message}
                self.problems[f"reconcile.{reconciler.name}"] = message
            else:
                self.problems.pop(f"reconcile.{reconciler.name}", None)
        return detail

    def _refuse(self, *, generation: int, reason: str, digest: str) -> None:
        reason = one_line(reason)
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
        self.record("desired.refused", {"generation": generation, "reason": reason[:500], "digest": digest})
        self.status.pending_refusals = [*self.status.pending_refusals, refusal][-MAX_PENDING_REFUSALS:]
        self.status.refused_digests = [*self.status.refused_digests, digest][-REMEMBERED_REFUSALS:]
        self._note_error(f"refused desired state generation={generation}: {reason}")
        self._save_status()

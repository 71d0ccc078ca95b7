"""Ed25519 signing of desired states, shared by the control plane and nodes.

The control plane signs the canonical JSON of a :class:`DesiredState`; a node
verifies it with the public key it pinned at enrollment. Fingerprints are the
hex sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_runtime.canonical import canonical_json as canonical_json  # re-exported: its callers import it from here
from edge_runtime.protocol import DesiredState, KeyEndorsement, SignedDesiredState


class SignatureError(Exception):
    """A signed document did not verify; the message says why."""


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def public_key_from_b64(value: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(value, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SignatureError(f"not an Ed25519 public key: {exc}") from exc


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` to a new file at ``path`` (PEM, 0600, durable); fails if the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_to_pem(key))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        # link() fails if another process created the file first: both then use that one.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the signing key is not an Ed25519 key")
    return key


def sign_desired_state(state: DesiredState, key: Ed25519PrivateKey,
                       key_chain: Sequence[KeyEndorsement] = ()) -> SignedDesiredState:
    payload = canonical_json(state.model_dump(mode="json"))
    signature = key.sign(payload.encode())
    return SignedDesiredState(
        payload=payload,
        signature=base64.b64encode(signature).decode(),
        key_fingerprint=fingerprint(public_key_raw(key.public_key())),
        key_chain=list(key_chain),
    )


# What an endorsement signature covers; the prefix keeps it from passing for any other signed thing.
ENDORSEMENT_CONTEXT = b"edgewise-key-endorsement-v1\x00"


def endorsement_message(*, public_key: str, fingerprint: str, previous_fingerprint: str,
                        issued_at: dt.datetime) -> bytes:
    body = canonical_json({"public_key": public_key, "fingerprint": fingerprint,
                           "previous_fingerprint": previous_fingerprint,
                           "issued_at": issued_at.astimezone(dt.UTC).isoformat()})
    return ENDORSEMENT_CONTEXT + body.encode()


def endorse_key(new_key: Ed25519PublicKey, previous: Ed25519PrivateKey, *,
                issued_at: dt.datetime) -> KeyEndorsement:
    """The previous key's signed statement that ``new_key`` succeeds it."""
    public_b64 = base64.b64encode(public_key_raw(new_key)).decode()
    new_fp = fingerprint(public_key_raw(new_key))
    previous_fp = fingerprint(public_key_raw(previous.public_key()))
    signature = previous.sign(endorsement_message(public_key=public_b64, fingerprint=new_fp,
                                                  previous_fingerprint=previous_fp, issued_at=issued_at))
    return KeyEndorsement(public_key=public_b64, fingerprint=new_fp, previous_fingerprint=previous_fp,
                          issued_at=issued_at, signature=base64.b64encode(signature).decode())


def follow_key_chain(chain: Sequence[KeyEndorsement], *, pinned_fingerprint: str, pinned_key: Ed25519PublicKey,
                     target_fingerprint: str) -> list[KeyEndorsement]:
    """The endorsements leading from the pinned key to ``target_fingerprint``, each verified.

    Empty when the target is the pinned key. Raises SignatureError when no
    verified path exists: an endorsement that does not verify is never followed.
    """
    path: list[KeyEndorsement] = []
    current_fp, current_key = pinned_fingerprint, pinned_key
    by_previous = {e.previous_fingerprint: e for e in chain}
    while current_fp != target_fingerprint:
        step = by_previous.get(current_fp)
        if step is None or len(path) >= len(chain):
            raise SignatureError(f"signed by key {target_fingerprint[:16]}, not the pinned key "
                                 f"{pinned_fingerprint[:16]}, and no endorsement leads there from it")
        try:
            raw_signature = base64.b64decode(step.signature, validate=True)
            current_key.verify(raw_signature, endorsement_message(
                public_key=step.public_key, fingerprint=step.fingerprint,
                previous_fingerprint=step.previous_fingerprint, issued_at=step.issued_at))
        except (ValueError, InvalidSignature) as exc:
            raise SignatureError(f"the endorsement of key {step.fingerprint[:16]} by key {current_fp[:16]} "
                                 "does not verify") from exc
        next_key = public_key_from_b64(step.public_key)
        if fingerprint(public_key_raw(next_key)) != step.fingerprint:
            raise SignatureError(f"the endorsed key does not have the fingerprint {step.fingerprint[:16]} it claims")
        path.append(step)
        current_fp, current_key = step.fingerprint, next_key
    return path


def verify_with_chain(signed: SignedDesiredState, *, pinned_fingerprint: str, pinned_key: Ed25519PublicKey,
                      ) -> tuple[DesiredState, KeyEndorsement | None]:
    """Verify ``signed`` with the pinned key or a key the pinned key endorsed (through rotations).

    Returns the desired state and, when it was signed by a newer key, the
    last endorsement followed: the key the node pins once it applies the state.
    """
    path = follow_key_chain(signed.key_chain, pinned_fingerprint=pinned_fingerprint, pinned_key=pinned_key,
                            target_fingerprint=signed.key_fingerprint)
    key = public_key_from_b64(path[-1].public_key) if path else pinned_key
    return verify_desired_state(signed, key), (path[-1] if path else None)


def verify_desired_state(signed: SignedDesiredState, public_key: Ed25519PublicKey) -> DesiredState:
    """Return the desired state if the signature holds, else raise SignatureError."""
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except ValueError as exc:
        raise SignatureError("the signature is not valid base64") from exc
    try:
        public_key.verify(signature, signed.payload.encode())
    except InvalidSignature as exc:
        raise SignatureError("the desired state's signature does not match the pinned key") from exc
    try:
        return DesiredState.model_validate_json(signed.payload)
    except ValueError as exc:
        raise SignatureError(f"the signed payload is not a valid desired state: {exc}") from exc


ARTIFACT_CONTEXT = b"edgewise-artifact-v1\x00"


def artifact_message(sha256_hex: str) -> bytes:
    """What an artifact signature covers: a context tag and the file's sha256."""
    return ARTIFACT_CONTEXT + sha256_hex.encode()


def sign_artifact(sha256_hex: str, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(artifact_message(sha256_hex))).decode()


def verify_artifact(sha256_hex: str, signature_b64: str, public_key: Ed25519PublicKey) -> None:
    """Raise SignatureError unless ``signature_b64`` signs this sha256 with ``public_key``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError as exc:
        raise SignatureError("the artifact signature is not valid base64") from exc
    try:
        public_key.verify(signature, artifact_message(sha256_hex))
    except InvalidSignature as exc:
        raise SignatureError("the artifact's signature does not match the pinned key") from exc


# A control plane proves it holds its signing key by signing a node's random
# challenge under this prefix. The prefix and the hex-only challenge make sure
# such a proof can never pass for a signed desired state or artifact.
KEY_PROOF_PREFIX = b"edgewise-key-proof:v1:"


def key_proof_message(challenge_hex: str) -> bytes:
    return KEY_PROOF_PREFIX + challenge_hex.encode()

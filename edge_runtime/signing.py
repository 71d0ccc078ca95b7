"""Ed25519 signing of desired states, shared by the control plane and nodes.

The control plane signs the canonical JSON of a :class:`DesiredState`; a node
verifies it with the public key it pinned at enrollment. Fingerprints are the
hex sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_runtime.protocol import DesiredState, SignedDesiredState


class SignatureError(Exception):
    """A signed document did not verify; the message says why."""


def canonical_json(data: Any) -> str:
    """One byte-exact JSON form: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


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


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the signing key is not an Ed25519 key")
    return key


def sign_desired_state(state: DesiredState, key: Ed25519PrivateKey) -> SignedDesiredState:
    payload = canonical_json(state.model_dump(mode="json"))
    signature = key.sign(payload.encode())
    return SignedDesiredState(
        payload=payload,
        signature=base64.b64encode(signature).decode(),
        key_fingerprint=fingerprint(public_key_raw(key.public_key())),
    )


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

"""The node's identity key: an Ed25519 key of its own, kept in its state directory.

The control plane signs what a node must obey; the identity key is the other
way round: the node signs what it vouches for (the checkpoints of its own
audit log), and the control plane verifies that with the public key the node
registered at enrollment (or, for a node enrolled before identity keys, on its
first sync that carries one).

``<state dir>/node_key.pem`` holds the private key (PKCS#8 PEM, unencrypted,
mode 0600). It is created the first time it is needed, complete or not at
all, and never replaced afterwards: a node keeps its key for as long as it
keeps its identity (of two processes creating it at once, both take the one
written first). A file that is not an Ed25519 key, or that group or others may
read, is refused rather than used or overwritten: a key someone else could
read is no longer this node's alone, and the operator must decide what to do.

``edge-runtime enroll --force`` enrolls the directory as a new node, which
needs a new key (the control plane registers one key to one node): it stages
the new key in ``node_key.next.pem`` and puts it in place only once the
enrollment succeeded (:func:`promote_next_key`), so a failed attempt leaves
the enrolled node's key as it was.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import signing
from edge_runtime.state import StateError, write_atomic

KEY_FILE = "node_key.pem"
NEXT_KEY_FILE = "node_key.next.pem"
KEY_MODE = 0o600


@dataclass(frozen=True)
class NodeKey:
    """This node's identity key and the forms of its public half that the protocol and the logs use."""

    private: Ed25519PrivateKey
    path: Path

    @classmethod
    def load_or_create(cls, state_dir: Path, *, next_key: bool = False) -> NodeKey:
        """The key in ``state_dir`` (``node_key.pem``, or the staged ``node_key.next.pem``), created if missing.

        Raises StateError for a file that is there but is not an Ed25519 PEM
        key, or that group or others may read.
        """
        path = state_dir / (NEXT_KEY_FILE if next_key else KEY_FILE)
        existing = _read_key(path)
        if existing is not None:
            return cls(existing, path)
        key = signing.generate_private_key()
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            signing.write_key_file(path, key)
        except FileExistsError:
            # Another process (an agent starting beside `enroll`) made it first: both use that one.
            return cls.load_or_create(state_dir, next_key=next_key)
        except OSError as exc:
            raise StateError(f"cannot write the node's identity key {path}: {exc.strerror or exc}") from exc
        return cls(key, path)

    @property
    def public_raw(self) -> bytes:
        return signing.public_key_raw(self.private.public_key())

    @property
    def public_b64(self) -> str:
        """The raw 32-byte public key in base64 (44 characters): what the node registers."""
        return base64.b64encode(self.public_raw).decode()

    @property
    def fingerprint(self) -> str:
        """The hex sha256 of the raw public key, as every Edgewise key fingerprint."""
        return signing.fingerprint(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def _read_key(path: Path) -> Ed25519PrivateKey | None:
    """The key at ``path``; None when there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read the node's identity key {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
        if mode & 0o077:
            raise StateError(f"the node's identity key {path} has mode {mode:04o}: group or others may read it; "
                             f"make it readable by its owner only (chmod 600 {path}) if it was never exposed, "
                             "otherwise move it away and re-enroll the node with a new key")
        data = fh.read()
    try:
        return signing.private_key_from_pem(data)
    except (ValueError, TypeError, UnsupportedAlgorithm, signing.SignatureError) as exc:
        raise StateError(f"{path} is not an Ed25519 private key in PEM form ({_reason(exc)}); "
                         "refusing to use or replace it") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, signing.SignatureError | UnsupportedAlgorithm):
        return "it holds a key of another type"
    if isinstance(exc, TypeError):
        return "it is encrypted"
    return "it holds no readable PEM private key"


def promote_next_key(state_dir: Path) -> None:
    """Put the staged key (``node_key.next.pem``) in place of ``node_key.pem``, in one step."""
    staged, current = state_dir / NEXT_KEY_FILE, state_dir / KEY_FILE
    key = _read_key(staged)
    if key is None:
        raise StateError(f"there is no staged identity key {staged} to put in place")
    try:
        write_atomic(current, signing.private_key_to_pem(key), mode=KEY_MODE)
        staged.unlink()
    except OSError as exc:
        raise StateError(f"cannot put the new identity key {staged} in place: {exc.strerror or exc}") from exc

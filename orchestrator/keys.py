"""The control plane's Ed25519 signing key.

Kept as a PEM file (``EDGEWISE_SIGNING_KEY_PATH``), created on first use with
owner-only permissions. Nodes pin its public key at enrollment; installers
carry its fingerprint, so a node refuses a control plane that holds another key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings

from edge_runtime import signing

_cache: dict[tuple[str, int], Ed25519PrivateKey] = {}


def signing_key() -> Ed25519PrivateKey:
    path = Path(settings.SIGNING_KEY_PATH)
    if not path.exists():
        _create(path)
    stamp = (str(path), path.stat().st_mtime_ns)
    key = _cache.get(stamp)
    if key is None:
        key = signing.private_key_from_pem(path.read_bytes())
        _cache.clear()
        _cache[stamp] = key
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = signing.private_key_to_pem(signing.generate_private_key())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    try:
        # link() fails if another process created the key first: both then use theirs.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def public_key_b64() -> str:
    raw = signing.public_key_raw(signing_key().public_key())
    return base64.b64encode(raw).decode()


def public_key_fingerprint() -> str:
    return signing.fingerprint(signing.public_key_raw(signing_key().public_key()))

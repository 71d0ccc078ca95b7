"""The audit log's own Ed25519 key: it signs the control plane's checkpoints and cosigns the nodes' ones.

It is not the desired-state signing key (:mod:`orchestrator.keys`): an
auditor's trust root must not change when that key rotates, and whoever can
publish desired states should not be able to rewrite the audit trail too. The
key is a PEM file (``EDGEWISE_AUDIT_KEY_PATH``, owner-only), created by the
first checkpoint of a log that has none; once the log has signed, a missing
file is an error naming it, never a silent new key (see
:func:`audit.checkpoints.checkpoint_key`).

Its public half is published as a C2SP verifier key (``vkey``): in every
export, at ``GET /audit/vkey`` and at the head of every anchor file. An
auditor pins it once, from a source they trust, and checks everything else
against it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from edge_runtime import notes, signing


class AuditKeyError(ImproperlyConfigured):
    """The audit log key is missing, unreadable or not an owner-only Ed25519 key."""


@dataclasses.dataclass(frozen=True)
class LogKey:
    name: str  # the log's origin: the name its signatures and cosignatures carry
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def vkey(self) -> str:
        return notes.vkey(self.name, self.public)


def key_path() -> Path:
    return Path(settings.AUDIT_KEY_PATH)


def log_key(*, create: bool = False) -> LogKey:
    """The audit log key; made (0600) when ``create`` and the file is missing, else AuditKeyError naming it."""
    path = key_path()
    if not path.exists():
        if not create:
            raise AuditKeyError(f"the audit log key {path} is missing: restore it (EDGEWISE_AUDIT_KEY_PATH); "
                                "without it no checkpoint can be signed and the audit trail cannot grow")
        with contextlib.suppress(FileExistsError):  # another process made it first: both use that one
            signing.write_key_file(path, signing.generate_private_key())
    return LogKey(settings.AUDIT_ORIGIN, _read(str(path), path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int) -> Ed25519PrivateKey:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditKeyError(f"the audit log key {path} may be read by others (mode {stat.S_IMODE(mode):o}); "
                            "chmod 600 it")
    try:
        return signing.private_key_from_pem(Path(path).read_bytes())
    except (ValueError, signing.SignatureError) as exc:
        raise AuditKeyError(f"the audit log key {path} is not an Ed25519 PEM key: {exc}") from None

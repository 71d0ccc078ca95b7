"""The control plane's Ed25519 signing key, its rotations, and the epochs generations count in.

What this module guarantees:

* **A key is never recreated silently.** The private key is a PEM file
  (``EDGEWISE_SIGNING_KEY_PATH``, owner-only). The database remembers every
  key it has signed with (:class:`~orchestrator.models.SigningKey`). A first
  start creates the file and says so; a missing file on a control plane that
  has already signed, or a file holding another key, is an error naming the
  file, at start-up (:func:`check_at_startup`) and at the first signature.
* **Rotation nodes follow.** :func:`signing_key_rotate` makes a new key and has
  the old one sign an endorsement of it; every signed desired state carries
  the chain of endorsements, so a node that pinned any earlier key verifies
  its way to the new one and pins it. Artifacts are signed again with the new
  key in the same transaction.
* **Epochs.** Generations count up within an :class:`~orchestrator.models.Epoch`.
  A new epoch starts with the first signature on a database (so a control
  plane rebuilt on an empty database reaches its nodes again), on every
  rotation, and with :func:`epoch_start` (``manage.py epoch_start``) after a
  database was restored from a backup. Nodes accept a later epoch whatever its
  generation; the state is signed, so an epoch change is as signed as any.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from edge_runtime import protocol, signing
from orchestrator import features
from orchestrator.models import DesiredState, Epoch, SigningKey

logger = logging.getLogger("edgewise.keys")

_key_cache: dict[tuple[str, int], Ed25519PrivateKey] = {}


class SigningKeyError(ImproperlyConfigured):
    """The signing key file is missing or is not the key this control plane signs with."""


@dataclasses.dataclass(frozen=True)
class Trust:
    """What a signature needs: the key, the epoch in force and the endorsement chain."""

    key: Ed25519PrivateKey
    fingerprint: str
    epoch: str
    epoch_started_at: str
    chain: tuple[protocol.KeyEndorsement, ...]


_trust: tuple[float, Trust] | None = None
_trust_lock = threading.Lock()


# Kept by this name for the callers of this module.
write_key_file = signing.write_key_file


def key_path() -> Path:
    return Path(settings.SIGNING_KEY_PATH)


def next_key_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.next")


def fingerprint_of(key: Ed25519PrivateKey) -> str:
    return signing.fingerprint(signing.public_key_raw(key.public_key()))


def _read(path: Path) -> Ed25519PrivateKey:
    stamp = (str(path), path.stat().st_mtime_ns)
    key = _key_cache.get(stamp)
    if key is None:
        try:
            key = signing.private_key_from_pem(path.read_bytes())
        except (ValueError, signing.SignatureError) as exc:
            raise SigningKeyError(f"the signing key {path} (EDGEWISE_SIGNING_KEY_PATH) cannot be read: {exc}") from exc
        _key_cache.clear()
        _key_cache[stamp] = key
    return key


def signing_key() -> Ed25519PrivateKey:
    """The key to sign with now. Creates it only on a control plane that never signed."""
    return current().key


def public_key_b64() -> str:
    return base64.b64encode(signing.public_key_raw(signing_key().public_key())).decode()


def public_key_fingerprint() -> str:
    return current().fingerprint


def current(*, fresh: bool = False) -> Trust:
    """The key, epoch and chain in force; see the module docstring.

    Costs one indexed read (the latest epoch) when nothing changed, so that a
    new epoch or key another process made is seen at once: a process never
    signs in an epoch older than one that already started.
    """
    global _trust
    latest = Epoch.objects.order_by("-started_at", "-pk").values_list("uuid", flat=True).first()
    path = key_path()
    with _trust_lock:
        if (not fresh and _trust is not None and latest is not None and str(latest) == _trust[1].epoch
                and _trust[0] == _stamp(path)):
            return _trust[1]
        trust = _establish()
        _trust = (_stamp(path), trust)
        return trust


def _stamp(path: Path) -> float:
    try:
        return float(path.stat().st_mtime_ns)
    except FileNotFoundError:
        return -1.0


def forget() -> None:
    """Drop the cached trust (after a rotation or a new epoch in this process, and in tests)."""
    global _trust
    with _trust_lock:
        _trust = None


def _establish() -> Trust:
    path = key_path()
    known = list(SigningKey.objects.order_by("created_at", "pk"))
    epoch = Epoch.objects.order_by("-started_at", "-pk").first()
    active = next((k for k in known if k.retired_at is None), None)
    consistent = (active is not None and epoch is not None and path.exists() and not next_key_path(path).exists()
                  and fingerprint_of(_read(path)) == active.fingerprint == epoch.key_fingerprint)
    if not consistent:
        # Something to create, finish or refuse: one process at a time decides.
        with transaction.atomic():
            trust_lock()
            known = list(SigningKey.objects.order_by("created_at", "pk"))
            active = next((k for k in known if k.retired_at is None), None)
            finish_rotation(path, active)
            active = _key_row(path, active, known)
            epoch = Epoch.objects.order_by("-started_at", "-pk").first()
            if epoch is None or epoch.key_fingerprint != active.fingerprint:
                epoch = new_epoch(active.fingerprint, "first signature on this database" if epoch is None
                                   else "the signing key changed")
    assert active is not None and epoch is not None  # noqa: S101 - established above
    chain = tuple(protocol.KeyEndorsement.model_validate(k.endorsement) for k in known if k.endorsement)
    return Trust(key=_read(path), fingerprint=active.fingerprint, epoch=str(epoch.uuid),
                 epoch_started_at=epoch.started_at.isoformat(), chain=chain)


def trust_lock() -> None:
    """Serialise key and epoch decisions across processes until the transaction ends."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # An arbitrary constant: the lock's name among this database's advisory locks.
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [0x6564676577697365])
    # SQLite (embedded) has one writer at a time already.


def _signed_before() -> str | None:
    """The key fingerprint of states this database signed before keys were recorded (an upgrade), if any."""
    return DesiredState.objects.exclude(key_fingerprint="").values_list("key_fingerprint", flat=True).first()


def _key_row(path: Path, active: SigningKey | None, known: list[SigningKey]) -> SigningKey:
    """The row of the key in ``path``, creating the file on a control plane that never signed."""
    signed_with = _signed_before() if active is None else None
    if not path.exists():
        if signed_with is not None:
            raise SigningKeyError(
                f"the signing key {path} (EDGEWISE_SIGNING_KEY_PATH) is missing, but this database holds desired "
                f"states signed with key {signed_with[:16]}: restore the file from a backup (nodes refuse any "
                "other key)")
        if active is not None:
            raise SigningKeyError(
                f"the signing key {path} (EDGEWISE_SIGNING_KEY_PATH) is missing, but this control plane has "
                f"signed with key {active.fingerprint[:16]} since {active.created_at:%Y-%m-%d}: restore the file "
                "from a backup (nodes refuse any other key); only manage.py signing_key_rotate makes a new key, "
                "and it needs the old one")
        write_key_file(path, signing.generate_private_key())
        logger.warning("created a new signing key at %s (fingerprint %s); nodes pin it when they enroll",
                       path, fingerprint_of(_read(path))[:16])
    key = _read(path)
    fingerprint = fingerprint_of(key)
    if active is None:
        if signed_with is not None and signed_with != fingerprint:
            raise SigningKeyError(
                f"the signing key {path} (EDGEWISE_SIGNING_KEY_PATH) holds key {fingerprint[:16]}, but this "
                f"database holds desired states signed with key {signed_with[:16]}: restore that key's file")
        row = SigningKey.objects.create(
            fingerprint=fingerprint, public_key=base64.b64encode(signing.public_key_raw(key.public_key())).decode(),
            created_at=timezone.now())
        known.append(row)
        return row
    if active.fingerprint != fingerprint:
        adopted = _adopt(path, key, active, known)
        if adopted is not None:
            return adopted
        retired = any(k.fingerprint == fingerprint for k in known)
        what = f"the retired key {fingerprint[:16]}" if retired else f"an unknown key {fingerprint[:16]}"
        raise SigningKeyError(
            f"the signing key {path} (EDGEWISE_SIGNING_KEY_PATH) holds {what}, but this control plane signs "
            f"with key {active.fingerprint[:16]}: restore that key's file")
    return active


def _chain_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.endorsements.json")


def _write_chain(path: Path) -> None:
    """Keep every endorsement beside the key file: a database restored from before a rotation can follow them."""
    chain = [k.endorsement for k in SigningKey.objects.order_by("created_at", "pk") if k.endorsement]
    tmp = _chain_path(path).with_name(f".{_chain_path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(chain, indent=1))
    os.replace(tmp, _chain_path(path))


def _adopt(path: Path, key: Ed25519PrivateKey, active: SigningKey, known: list[SigningKey]) -> SigningKey | None:
    """The key in ``path`` if endorsements kept beside it lead there from the database's key; else None.

    This is the database of a backup taken before a rotation: the nodes
    already pinned the newer key in the file, so the control plane takes it
    on (rows, artifacts signed again, a new epoch) instead of refusing to start.
    """
    try:
        chain = [protocol.KeyEndorsement.model_validate(e) for e in json.loads(_chain_path(path).read_text())]
    except (OSError, ValueError):
        return None
    target = fingerprint_of(key)
    try:
        steps = signing.follow_key_chain(chain, pinned_fingerprint=active.fingerprint,
                                         pinned_key=signing.public_key_from_b64(active.public_key),
                                         target_fingerprint=target)
    except signing.SignatureError:
        return None
    now = timezone.now()
    SigningKey.objects.filter(retired_at__isnull=True).update(retired_at=now)
    row = active
    for step in steps:
        row, _ = SigningKey.objects.update_or_create(
            fingerprint=step.fingerprint,
            defaults={"public_key": step.public_key, "endorsement": step.model_dump(mode="json"),
                      "created_at": step.issued_at, "retired_at": None if step.fingerprint == target else now})
        known.append(row)
    for feature in features.node_features():
        feature.sign_again(key)
    logger.warning("took on the signing key %s of %s: endorsements beside it lead there from key %s, which this "
                   "database signed with (a database restored from before a rotation)", target[:16], path,
                   active.fingerprint[:16])
    return row


def new_epoch(fingerprint: str, reason: str) -> Epoch:
    # Strictly later than the epoch before, whatever the clock did: nodes order epochs by this time.
    latest = Epoch.objects.order_by("-started_at").values_list("started_at", flat=True).first()
    started = timezone.now()
    if latest is not None and started <= latest:
        started = latest + dt.timedelta(microseconds=1)
    epoch = Epoch.objects.create(started_at=started, key_fingerprint=fingerprint, reason=reason[:200])
    logger.warning("started epoch %s: %s", epoch.uuid, reason)
    return epoch


def finish_rotation(path: Path, active: SigningKey | None) -> None:
    """Complete a rotation that committed but stopped before its key file moved into place."""
    pending = next_key_path(path)
    if not pending.exists() or active is None:
        return
    new = _read(pending)
    if fingerprint_of(new) != active.fingerprint:
        return  # the rotation did not commit: the new key was never used
    if path.exists():
        old = _read(path)
        os.replace(path, path.with_name(f"{path.name}.retired-{fingerprint_of(old)[:16]}"))
    os.replace(pending, path)
    _write_chain(path)
    logger.warning("finished the rotation to signing key %s", fingerprint_of(new)[:16])


def check_at_startup() -> Trust:
    """Called as a control-plane process starts: raises SigningKeyError naming the file if the key is wrong.

    Runs in a thread of its own, so it works from inside a running event loop
    (uvicorn imports the application there) as well as from a worker.
    """
    result: list[Trust | BaseException] = []

    def run() -> None:
        try:
            result.append(current(fresh=True))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append(exc)
        finally:
            from django.db import connection

            connection.close()

    thread = threading.Thread(target=run, name="signing-key-check")
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    logger.info("signing with key %s in epoch %s", outcome.fingerprint[:16], outcome.epoch)
    return outcome

"""Signed bundle files: what a sync exchanges, carried across an air gap on removable media.

A bundle is an uncompressed POSIX tar stream (models do not compress; a tar
can be written and read in one pass with flat memory). Its first member is
``bundle.json``, the signed metadata, in the manner of TUF's targets role::

    {"signed": BundleMeta, "signatures": [{"keyid": <fingerprint>, "sig": <base64>}]}

and every later member is one the metadata lists, in the order it lists
them, with its sha256 and size. A reader
(:func:`read_bundle`) checks the metadata first (signature, the site it is
for, its sequence number and expiry: whatever the caller's ``check`` says)
before it reads one byte of any other member; then it streams each member
through sha256 into the caller's sink, and refuses the bundle the moment a
member differs from the metadata, is missing, is extra, or the stream ends
early. Nothing of a refused bundle is to be used: a sink writes to staging
only, and its caller commits what it staged once :func:`read_bundle` returned.

A bundle may be split into parts of a given size (``FILE.001``,
``FILE.002``, ...) for removable media; the parts read as one stream in
order, so a missing, reordered or truncated part is refused like any other
damage.

The signature covers ``BUNDLE_CONTEXT`` followed by the canonical JSON of
``signed`` (:func:`edge_runtime.canonical.canonical_json`), so a bundle's
signature passes for no other signed thing of Edgewise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, Field, ValidationError, field_validator, model_validator

from edge_runtime import signing
from edge_runtime.canonical import canonical_json
from edge_runtime.protocol.base import INT64_MAX, WireModel
from edge_runtime.protocol.desired import SHA256_PATTERN, KeyEndorsement

__all__ = ["BUNDLE_CONTEXT", "BUNDLE_FORMAT", "METADATA_NAME", "BundleMeta", "BundleRefused", "Member",
           "Signature", "SignedMeta", "bundle_digest", "bundle_parts", "check_fresh", "read_bundle", "read_metadata",
           "sign_meta", "verify_signature"]

BUNDLE_FORMAT: Literal["edgewise-bundle/1"] = "edgewise-bundle/1"
METADATA_NAME = "bundle.json"
BUNDLE_CONTEXT = b"edgewise-bundle-v1\x00"
# The metadata lists members and a key chain: far below this even for a site of hundreds of nodes.
MAX_METADATA_BYTES = 8 * 1024 * 1024
MAX_MEMBERS = 10_000
CHUNK = 1024 * 1024
# A member's name: plain relative paths of a fixed alphabet; never "..", never absolute.
MEMBER_NAME = r"^[a-z0-9][a-z0-9._/-]{0,199}$"


class BundleRefused(Exception):
    """A bundle that must not be used, and why (the message names the member or field at fault)."""


class Member(WireModel):
    name: str = Field(pattern=MEMBER_NAME)
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0, le=INT64_MAX)

    @field_validator("name")
    @classmethod
    def _no_parent(cls, value: str) -> str:
        if ".." in value.split("/") or "//" in value or value.endswith("/"):
            raise ValueError("a member name is a plain relative path (no '..', no empty part)")
        return value


class BundleMeta(WireModel):
    """What a bundle is, for whom, and what it holds: everything here is covered by the signature."""

    format: Literal["edgewise-bundle/1"] = BUNDLE_FORMAT
    # in: from the control plane to a site; out: from one node back to the control plane.
    direction: Literal["in", "out"]
    site: str = Field(min_length=1, max_length=100)
    # The site's id on the control plane (a bundle in); a node knows its site by name only.
    site_id: str = Field(default="", max_length=64)
    # The node that wrote an outgoing bundle; empty for an incoming one (it is for every node of the site).
    node: str = Field(default="", max_length=64)
    # Rises with every bundle of the same direction and writer: an equal or lower one is a replay or a rollback.
    sequence: int = Field(ge=1, le=INT64_MAX)
    created: AwareDatetime
    # After this an incoming bundle is stale; what a site does with it is its policy.
    expires: AwareDatetime | None = None
    # The control plane's key rotations, oldest first: the path from a key a node pinned to the signer.
    key_chain: list[KeyEndorsement] = Field(default_factory=list, max_length=64)
    members: list[Member] = Field(max_length=MAX_MEMBERS)

    @model_validator(mode="after")
    def _unique_names(self) -> BundleMeta:
        seen: set[str] = set()
        for member in self.members:
            if member.name in seen or member.name == METADATA_NAME:
                raise ValueError(f"members: {member.name!r} is listed twice")
            seen.add(member.name)
        return self

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


class Signature(WireModel):
    keyid: str = Field(pattern=SHA256_PATTERN)
    sig: str = Field(max_length=200)


class SignedMeta(WireModel):
    signed: BundleMeta
    signatures: list[Signature] = Field(min_length=1, max_length=4)


def _message(meta: BundleMeta) -> bytes:
    return BUNDLE_CONTEXT + canonical_json(meta.model_dump(mode="json")).encode()


def bundle_digest(signed: SignedMeta) -> str:
    """A bundle's identity: the sha256 of its signed metadata, which names every member's sha256."""
    return hashlib.sha256(canonical_json(signed.signed.model_dump(mode="json")).encode()).hexdigest()


def sign_meta(meta: BundleMeta, key: Ed25519PrivateKey) -> SignedMeta:
    keyid = signing.fingerprint(signing.public_key_raw(key.public_key()))
    return SignedMeta(signed=meta, signatures=[Signature(keyid=keyid, sig=base64.b64encode(key.sign(
        _message(meta))).decode())])


def verify_signature(signed: SignedMeta, key: Ed25519PublicKey) -> None:
    """Raise BundleRefused unless a signature of ``key`` covers ``signed.signed``."""
    keyid = signing.fingerprint(signing.public_key_raw(key))
    ours = [s for s in signed.signatures if s.keyid == keyid]
    if not ours:
        named = ", ".join(s.keyid[:16] for s in signed.signatures)
        raise BundleRefused(f"signed by key {named}, not by the expected key {keyid[:16]}")
    try:
        raw = base64.b64decode(ours[0].sig, validate=True)
        key.verify(raw, _message(signed.signed))
    except (binascii.Error, ValueError, InvalidSignature):
        raise BundleRefused(f"the signature of key {keyid[:16]} does not verify: the metadata was altered "
                            "or signed by another key") from None


# -- reading ---------------------------------------------------------------------


def bundle_parts(path: Path) -> list[Path]:
    """The files of the bundle at ``path``: itself, or ``path.001``, ``path.002``, ... in order (given either
    the base name or the first part)."""
    if path.suffix == ".001":
        path = path.with_suffix("")
    if path.is_file() and not path.with_name(f"{path.name}.001").exists():
        return [path]
    parts: list[Path] = []
    while (part := path.with_name(f"{path.name}.{len(parts) + 1:03d}")).is_file():
        parts.append(part)
    if not parts:
        raise BundleRefused(f"{path}: no such bundle (neither the file nor its first part {path.name}.001)")
    return parts


class _PartReader(io.RawIOBase):
    """The parts of a bundle read as one stream, in order."""

    def __init__(self, parts: Sequence[Path]) -> None:
        super().__init__()
        self._parts = list(parts)
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._file is None:
                if not self._parts:
                    return 0
                self._file = self._parts.pop(0).open("rb")
            n: int = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


Check = Callable[[SignedMeta], None]
Sink = Callable[[Member], BinaryIO]


def read_metadata(path: Path) -> SignedMeta:
    """The signed metadata of the bundle at ``path``, unverified (to show what a file claims to be)."""
    with _open_tar(bundle_parts(path)) as (tar, _):
        return _metadata(tar)


@contextlib.contextmanager
def _open_tar(parts: Sequence[Path]) -> Iterator[tuple[tarfile.TarFile, BinaryIO]]:
    stream = io.BufferedReader(_PartReader(parts), CHUNK)
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.TarError as exc:
            raise BundleRefused(f"not a bundle: {_tar_error(exc)}") from None
        with tar:
            yield tar, stream
    finally:
        stream.close()


def _tar_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "unexpected end" in text or isinstance(exc, EOFError):
        return "the file is truncated (it ends inside a member)"
    return f"the file is damaged ({text})"


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except (tarfile.TarError, EOFError) as exc:
        raise BundleRefused(_tar_error(exc)) from None


def _metadata(tar: tarfile.TarFile) -> SignedMeta:
    first = _next(tar)
    if first is None or first.name != METADATA_NAME or not first.isfile():
        raise BundleRefused(f"not a bundle: its first member is {first.name if first else 'missing'}, "
                            f"not {METADATA_NAME}")
    if first.size > MAX_METADATA_BYTES:
        raise BundleRefused(f"{METADATA_NAME} of {first.size} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    f = tar.extractfile(first)
    assert f is not None
    try:
        raw = f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleRefused(_tar_error(exc)) from None
    if len(raw) != first.size:
        raise BundleRefused(_tar_error(EOFError()))
    try:
        return SignedMeta.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or METADATA_NAME
        raise BundleRefused(f"{METADATA_NAME}: {where}: {error['msg']}") from None


def read_bundle(path: Path, check: Check, sink: Sink) -> SignedMeta:
    """Verify the bundle at ``path`` while streaming its members into ``sink``; its metadata once all passed.

    ``check`` sees the metadata before any member is read and raises
    BundleRefused to stop there. ``sink(member)`` gives the writable file
    a member's bytes go to (closed here). Raises BundleRefused naming the
    first fault: then what the sinks hold must be thrown away.
    """
    with _open_tar(bundle_parts(path)) as (tar, stream):
        signed = _metadata(tar)
        check(signed)
        for expected in signed.signed.members:
            info = _next(tar)
            if info is None:
                # tarfile reads a header it cannot parse as the end: bytes after it mean damage, not an early end.
                if stream.read(1):
                    raise BundleRefused(f"the bundle is damaged: the header of member {expected.name} does not read")
                raise BundleRefused(f"the bundle is truncated: it ends before member {expected.name}")
            if info.name != expected.name:
                listed = signed.signed.member(info.name)
                why = "is not listed in the signed metadata" if listed is None else "is out of order"
                raise BundleRefused(f"member {info.name} {why} (expected {expected.name})")
            if not info.isfile():
                raise BundleRefused(f"member {info.name} is not a regular file")
            if info.size != expected.size:
                raise BundleRefused(f"member {info.name} holds {info.size} bytes, not the {expected.size} the "
                                    "signed metadata names (altered)")
            _copy(tar, info, expected, sink)
        extra = _next(tar)
        if extra is not None:
            raise BundleRefused(f"member {extra.name} is not listed in the signed metadata")
    return signed


def _copy(tar: tarfile.TarFile, info: tarfile.TarInfo, expected: Member, sink: Sink) -> None:
    source = tar.extractfile(info)
    assert source is not None
    digest = hashlib.sha256()
    size = 0
    with sink(expected) as out:
        try:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        except (tarfile.TarError, EOFError) as exc:
            raise BundleRefused(f"member {info.name}: {_tar_error(exc)}") from None
    if size != expected.size:
        raise BundleRefused(f"the bundle is truncated: member {info.name} ends after {size} of its "
                            f"{expected.size} bytes")
    if digest.hexdigest() != expected.sha256:
        raise BundleRefused(f"member {info.name} was altered: its sha256 is {digest.hexdigest()[:16]}, the signed "
                            f"metadata names {expected.sha256[:16]}")


def check_fresh(meta: BundleMeta, *, now: dt.datetime | None = None) -> str | None:
    """Why ``meta`` is expired (None while it is not, or has no expiry)."""
    now = now or dt.datetime.now(dt.UTC)
    if meta.expires is not None and meta.expires <= now:
        return (f"bundle {meta.sequence} expired at {meta.expires.isoformat(timespec='seconds')} "
                f"(made {meta.created.isoformat(timespec='seconds')})")
    return None

"""Writing a bundle (the format: :mod:`edge_runtime.airgap.bundle`): one pass over every member, parts optional."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.airgap.bundle import CHUNK, METADATA_NAME, BundleMeta, Member, SignedMeta, sign_meta
from edge_runtime.canonical import canonical_json

__all__ = ["Source", "write_bundle"]


@dataclass(frozen=True)
class Source:
    """One member to write: its bytes, or a file; a file's sha256 and size, when known, are checked as it is copied."""

    name: str
    data: bytes | None = None
    path: Path | None = None
    sha256: str | None = None
    size: int | None = None

    @classmethod
    def json(cls, name: str, value: Any) -> Source:
        return cls(name=name, data=canonical_json(value).encode())

    def member(self) -> Member:
        if self.data is not None:
            return Member(name=self.name, sha256=hashlib.sha256(self.data).hexdigest(), size=len(self.data))
        assert self.path is not None
        if self.sha256 is not None and self.size is not None:
            return Member(name=self.name, sha256=self.sha256, size=self.size)
        digest, size = _hash_file(self.path)
        return Member(name=self.name, sha256=digest, size=size)

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.data is not None:
            yield io.BytesIO(self.data)
        else:
            assert self.path is not None
            with self.path.open("rb") as f:
                yield f


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class _HashingReader:
    """A file read through sha256, at most ``size`` bytes: what tarfile copies into the bundle."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.left, self.digest = f, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        self.digest.update(data)
        return data


class _PartWriter(io.RawIOBase):
    """Bytes written across ``FILE.001``, ``FILE.002``, ... of ``part_size`` each (one ``FILE`` without a size)."""

    def __init__(self, path: Path, part_size: int | None) -> None:
        super().__init__()
        self.path, self.part_size = path, part_size
        self.paths: list[Path] = []
        self._file: IO[bytes] | None = None
        self._left = 0

    def _next(self) -> None:
        if self._file is not None:
            self._finish()
        target = self.path if self.part_size is None else self.path.with_name(
            f"{self.path.name}.{len(self.paths) + 1:03d}")
        self._file = target.open("xb")
        self.paths.append(target)
        self._left = self.part_size or -1

    def _finish(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            if self._file is None or self._left == 0:
                self._next()
            assert self._file is not None
            take = len(view) - written if self._left < 0 else min(self._left, len(view) - written)
            self._file.write(view[written:written + take])
            written += take
            if self._left > 0:
                self._left -= take
        return written

    def close(self) -> None:
        if self._file is not None:
            self._finish()
        super().close()


def write_bundle(path: Path, meta: dict[str, Any], sources: Sequence[Source], key: Ed25519PrivateKey, *,
                 part_size: int | None = None) -> tuple[SignedMeta, list[Path]]:
    """Write a signed bundle of ``sources`` to ``path`` (or its parts); the signed metadata and the files written.

    ``meta`` holds the fields of :class:`BundleMeta` but ``members``. A file
    whose bytes do not match the sha256 or size given for it, or that changes
    while it is copied, fails the write (ValueError), and nothing is left at
    ``path``. Files are written exclusively: an existing bundle is never overwritten.
    """
    if part_size is not None and part_size < tarfile.BLOCKSIZE:
        raise ValueError(f"a part must hold at least {tarfile.BLOCKSIZE} bytes, not {part_size}")
    members = [s.member() for s in sources]
    signed = sign_meta(BundleMeta.model_validate({**meta, "members": [m.model_dump() for m in members]}), key)
    created = signed.signed.created.timestamp()
    writer = _PartWriter(path, part_size)
    try:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            head = json.dumps(signed.model_dump(mode="json"), indent=1, sort_keys=True).encode()
            tar.addfile(_info(METADATA_NAME, len(head), created), io.BytesIO(head))
            for source, member in zip(sources, members, strict=True):
                with source.open() as f:
                    reader = _HashingReader(f, member.size)
                    tar.addfile(_info(member.name, member.size, created), reader)  # type: ignore[arg-type,unused-ignore]
                    if reader.left or reader.digest.hexdigest() != member.sha256 or f.read(1):
                        raise ValueError(f"{source.name}: the file does not hold the {member.size} bytes of sha256 "
                                         f"{member.sha256[:16]} it was listed with (changed while it was written?)")
        writer.close()
    except BaseException:
        writer.close()
        for written in writer.paths:
            with contextlib.suppress(OSError):
                written.unlink()
        raise
    return signed, writer.paths


def _info(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uname = info.gname = "edgewise"
    return info



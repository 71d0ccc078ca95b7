"""Content-addressed artifact storage: ``ARTIFACT_DIR/sha256/<first2>/<sha256>``.

A file is streamed to a temporary file in the same folder tree while it is
hashed, then moved into place with ``os.replace``: a reader never sees a
half-written artifact, and two uploads of the same bytes end as one file.
Nothing is ever held whole in memory, and an upload over the size cap is
refused with nothing left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from django.conf import settings

CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than the limit of {limit} bytes (EDGEWISE_MAX_MODEL_BYTES)")
        self.limit = limit


@dataclasses.dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int
    path: Path


def artifact_root() -> Path:
    return Path(settings.ARTIFACT_DIR) / "sha256"


def artifact_path(sha256: str) -> Path:
    """Where the artifact with this hash lives (whether or not it exists)."""
    if not _SHA256.match(sha256):
        # Never join an unchecked string onto a path.
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return artifact_root() / sha256[:2] / sha256


def _chunks(source: BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    chunks = getattr(source, "chunks", None)
    if callable(chunks):
        # Django's UploadedFile: already on disk or in small pieces.
        yield from chunks(CHUNK)
        return
    if hasattr(source, "read"):
        while True:
            block = source.read(CHUNK)
            if not block:
                return
            yield block
        return
    yield from source


def artifact_store(source: BinaryIO | Iterable[bytes], *, max_bytes: int | None = None) -> StoredArtifact:
    """Stream ``source`` into the store; raise ArtifactTooLarge past ``max_bytes`` (nothing kept)."""
    limit = settings.MAX_MODEL_BYTES if max_bytes is None else max_bytes
    tmp_dir = Path(settings.ARTIFACT_DIR) / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for block in _chunks(source):
                size += len(block)
                if size > limit:
                    raise ArtifactTooLarge(limit)
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        sha256 = digest.hexdigest()
        final = artifact_path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StoredArtifact(sha256=sha256, size=size, path=final)


def artifact_store_path(path: Path) -> StoredArtifact:
    """Store a file produced on this machine (a quantized variant)."""
    with path.open("rb") as fh:
        return artifact_store(fh, max_bytes=max(settings.MAX_MODEL_BYTES, path.stat().st_size))

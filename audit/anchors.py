"""Anchors: the log's signed checkpoints, also kept outside the database, in an append-only file.

A database superuser can rewrite every table, but not the checkpoints already
written here (put ``EDGEWISE_AUDIT_ANCHOR_DIR`` on other storage, or copy the
file away), nor sign new ones without the log key, which lives outside the
database too. ``audit_verify`` compares the log with every checkpoint of an
anchor file taken before a rewrite and names what changed.

The file, ``checkpoints.log``, is text: a header naming the log's verifier
key, then one record per checkpoint, its length in bytes and the signed note
(C2SP), so that it parses back however many blank lines the notes hold::

    # edgewise audit anchors v1
    # vkey <name>+<key id>+<key>

    checkpoint 171
    <the signed note: checkpoint text, a blank line, signature lines>

It is opened with ``O_APPEND`` and synced after every record; the directory
and the file are owner-only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from django.conf import settings

from edge_runtime import notes

MAGIC = "# edgewise audit anchors v1\n"
FILE_NAME = "checkpoints.log"


class AnchorError(ValueError):
    """An anchor file that cannot be read or written, is malformed, or holds a checkpoint that does not verify."""


@dataclasses.dataclass(frozen=True)
class Anchored:
    """One checkpoint of an anchor file, its signature verified."""

    checkpoint: notes.Checkpoint
    note: str
    source: str  # "<file> record <n>", for messages


def anchor_path() -> Path:
    return Path(settings.AUDIT_ANCHOR_DIR) / FILE_NAME


def header(vkey: str) -> str:
    return f"{MAGIC}# vkey {vkey}\n\n"


def record(note: str) -> bytes:
    data = note.encode()
    return f"checkpoint {len(data)}\n".encode() + data + b"\n"


def anchor_append(note: str, vkey: str, path: Path | None = None) -> Path:
    """Append one signed checkpoint to the anchor file (made, owner-only, with its header if missing)."""
    path = path or anchor_path()
    _ensure_file(path, vkey)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        _write_all(fd, record(note))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def anchor_write(path: Path, notes_text: Iterable[str], vkey: str) -> int:
    """A new anchor file at ``path`` (refused if it exists) holding ``notes_text``; how many it holds."""
    fd = _create(path, vkey)
    count = 0
    try:
        for note in notes_text:
            _write_all(fd, record(note))
            count += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def _ensure_file(path: Path, vkey: str) -> None:
    if path.exists():
        found = _read_header(path.read_bytes()[:4096].decode(errors="replace"), str(path))[0]
        if found != vkey:
            raise AnchorError(f"the anchor file {path} is of the log key {found}, not of this log's key {vkey}: "
                              "a log key that changed cannot continue it (move the file away to start a new one)")
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        os.close(_create(path, vkey))
    except FileExistsError:
        pass  # another checkpointer made it meanwhile


def _create(path: Path, vkey: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    _write_all(fd, header(vkey).encode())
    os.fsync(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_header(text: str, name: str) -> tuple[str, int]:
    """The vkey the header names, and where the records start."""
    lines = text.split("\n", 3)
    if len(lines) < 4 or lines[0] + "\n" != MAGIC or not lines[1].startswith("# vkey ") or lines[2] != "":
        raise AnchorError(f"{name} is not an audit anchor file (it does not start with {MAGIC.strip()!r} "
                          "and a '# vkey' line)")
    return lines[1][len("# vkey "):].strip(), len(lines[0]) + len(lines[1]) + len(lines[2]) + 3


def anchors_read(path: Path, vkeys: Sequence[str]) -> list[Anchored]:
    """Every checkpoint of the anchor file at ``path``, each verified with its header's key.

    The header's key must be one of ``vkeys`` (the keys this log is known
    by): an unknown key is an error, as is a malformed record or a signature
    that fails.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnchorError(f"cannot read the anchor file {path}: {exc.strerror}") from None
    vkey, offset = _read_header(data[:4096].decode(errors="replace"), str(path))
    if vkey not in vkeys:
        raise AnchorError(f"the anchor file {path} names the key {vkey}, which is not a key of this log")
    name, public = notes.parse_vkey(vkey)
    found: list[Anchored] = []
    for number, note in enumerate(_records(data, offset, path), start=1):
        source = f"{path} record {number}"
        try:
            _, checkpoint = notes.open_checkpoint(note, name, public)
        except notes.NoteError as exc:
            raise AnchorError(f"{source}: the checkpoint does not verify: {exc}") from None
        found.append(Anchored(checkpoint, note, source))
    return found


def _records(data: bytes, offset: int, path: Path) -> Iterable[str]:
    number = 0
    while offset < len(data):
        number += 1
        end = data.find(b"\n", offset)
        line = data[offset:end if end >= 0 else len(data)].decode(errors="replace")
        if end < 0 or not line.startswith("checkpoint ") or not line[len("checkpoint "):].isdigit():
            raise AnchorError(f"{path} record {number}: expected 'checkpoint <bytes>', found {line[:60]!r}")
        length = int(line[len("checkpoint "):])
        body = data[end + 1:end + 1 + length]
        if len(body) != length or data[end + 1 + length:end + 2 + length] != b"\n":
            raise AnchorError(f"{path} record {number} is cut short (a write that did not finish?)")
        yield body.decode()
        offset = end + 2 + length

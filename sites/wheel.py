"""The ``edge-runtime`` wheel, built in memory from the ``edge_runtime`` package.

Sites install the edge runtime from the control plane they enroll with (see
``sites.distribution`` and the installer), so the control plane must be able
to hand out its own copy of the package without a build step or a package
index. A pure-Python ``py3-none-any`` wheel is only a zip file with a
``.dist-info`` folder, so it is built here with the standard library.

Guarantees:

- Deterministic: entries are sorted and carry a fixed timestamp and mode, so
  the same source gives the same bytes and the same sha256 on every control
  plane. Installers pin that sha256.
- Current: the cache is keyed by a digest of the source files, so a control
  plane whose code was upgraded in place serves the new code at once.
- Self-consistent: version and requirements are read from the package source
  on disk (not from the module imported when the process started), so the
  metadata always describes the code inside the same wheel.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import edge_runtime

PACKAGE = "edge_runtime"
DIST_NAME = "edge-runtime"
SOURCE_DIR = Path(edge_runtime.__file__).resolve().parent
REQUIRES_PYTHON = ">=3.11"
TAG = "py3-none-any"
SUMMARY = "Edgewise edge runtime: agent, model server, data engine, policy and audit for one node"
ENTRY_POINTS = "[console_scripts]\nedge-runtime = edge_runtime.cli:main\n"

# Which files of the package directory are part of the distribution. An
# explicit list rather than "everything" so an editor's swap file or a stray
# local database never ends up on every site.
_SUFFIXES = {".py", ".pyi", ".json", ".sql", ".txt", ".toml", ".html"}
_NAMES = {"py.typed"}
# The earliest time a zip entry can carry; any fixed value makes builds repeatable.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644 << 16


class WheelError(Exception):
    """The package source cannot be turned into a wheel (names what is wrong)."""


@dataclass(frozen=True)
class Wheel:
    filename: str
    data: bytes
    sha256: str
    version: str
    requires: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.data)


_lock = threading.Lock()
_cache: dict[str, Wheel] = {}


def source_files(source_dir: Path = SOURCE_DIR) -> list[tuple[str, bytes]]:
    """``(archive path, content)`` of every distributable file, sorted by path."""
    if not (source_dir / "__init__.py").is_file():
        raise WheelError(f"{source_dir} is not a Python package (no __init__.py)")
    files: list[tuple[str, bytes]] = []
    for path in source_dir.rglob("*"):
        rel = path.relative_to(source_dir)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
            continue
        if not path.is_file() or not (path.suffix in _SUFFIXES or path.name in _NAMES):
            continue
        files.append((f"{PACKAGE}/{rel.as_posix()}", path.read_bytes()))
    files.sort()
    return files


def _metadata_from_source(init_source: bytes) -> tuple[str, tuple[str, ...]]:
    """``__version__`` and ``REQUIRES`` as written in ``edge_runtime/__init__.py``."""
    found: dict[str, object] = {}
    try:
        body = ast.parse(init_source).body
    except SyntaxError as exc:
        raise WheelError(f"{PACKAGE}/__init__.py does not parse: {exc}") from exc
    for node in body:
        target: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        if isinstance(target, ast.Name) and target.id in {"__version__", "REQUIRES"}:
            try:
                found[target.id] = ast.literal_eval(node.value)  # type: ignore[arg-type]
            except ValueError:
                found[target.id] = None  # not a literal: reported below by name
    version = found.get("__version__")
    requires = found.get("REQUIRES")
    if not isinstance(version, str) or not version:
        raise WheelError(f"{PACKAGE}/__init__.py must assign __version__ a literal string")
    if not isinstance(requires, tuple | list) or not all(isinstance(r, str) for r in requires):
        raise WheelError(f"{PACKAGE}/__init__.py must assign REQUIRES a literal tuple of strings")
    return version, tuple(requires)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _dist_info(version: str, requires: tuple[str, ...]) -> list[tuple[str, bytes]]:
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {DIST_NAME}",
        f"Version: {version}",
        f"Summary: {SUMMARY}",
        "License: Apache-2.0",
        f"Requires-Python: {REQUIRES_PYTHON}",
        *(f"Requires-Dist: {req}" for req in requires),
    ]
    wheel = [
        "Wheel-Version: 1.0",
        f"Generator: edgewise-control-plane ({version})",
        "Root-Is-Purelib: true",
        f"Tag: {TAG}",
    ]
    info = f"{PACKAGE}-{version}.dist-info"
    return [
        (f"{info}/METADATA", ("\n".join(metadata) + "\n").encode()),
        (f"{info}/WHEEL", ("\n".join(wheel) + "\n").encode()),
        (f"{info}/entry_points.txt", ENTRY_POINTS.encode()),
        (f"{info}/top_level.txt", f"{PACKAGE}\n".encode()),
    ]


def build_wheel(files: list[tuple[str, bytes]]) -> Wheel:
    """Build the wheel from ``source_files()`` output. Pure: same input, same bytes."""
    init = dict(files).get(f"{PACKAGE}/__init__.py")
    if init is None:
        raise WheelError(f"{PACKAGE}/__init__.py is missing from the source files")
    version, requires = _metadata_from_source(init)
    entries = list(files) + _dist_info(version, requires)
    record_name = f"{PACKAGE}-{version}.dist-info/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{record_name},,\n"
    entries.append((record_name, record.encode()))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # Package files first (sorted), dist-info last with RECORD at the very
        # end, as the wheel spec recommends so installers can stream it.
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = _FILE_MODE
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=9)
    data = buffer.getvalue()
    return Wheel(
        filename=f"{PACKAGE}-{version}-{TAG}.whl",
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        version=version,
        requires=requires,
    )


def runtime_wheel(source_dir: Path = SOURCE_DIR) -> Wheel:
    """The wheel of the package as it is on disk now, built once per source digest."""
    files = source_files(source_dir)
    key = hashlib.sha256()
    for name, data in files:
        key.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest = key.hexdigest()
    with _lock:
        cached = _cache.get(digest)
        if cached is None:
            cached = build_wheel(files)
            # Keep only the current build: old source never comes back.
            _cache.clear()
            _cache[digest] = cached
    return cached

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
- Self-consistent: the version is read from ``edge_runtime/__init__.py`` and
  the name, requirements and scripts from ``edge_runtime/pyproject.toml`` on
  disk (not from the module imported when the process started), so the
  metadata always describes the code inside the same wheel. That pyproject is
  the edge runtime's own distribution, the one place its requirements are
  written; it is read, not shipped. Its extras (one per onnxruntime variant)
  become ``Provides-Extra`` and ``Requires-Dist: ...; extra == "name"``, so
  ``pip install 'edge-runtime[openvino] @ URL'`` works with this wheel as with
  one built by setuptools.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import re
import threading
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import edge_runtime

PACKAGE = "edge_runtime"
SOURCE_DIR = Path(edge_runtime.__file__).resolve().parent
TAG = "py3-none-any"
# The edge runtime's distribution: read for the metadata, never shipped.
PROJECT_FILE = f"{PACKAGE}/pyproject.toml"

# Which files of the package directory are part of the distribution. An
# explicit list rather than "everything" so an editor's swap file or a stray
# local database never ends up on every site.
_SUFFIXES = {".py", ".pyi", ".json", ".sql", ".txt", ".toml", ".html"}
_NAMES = {"py.typed"}
# What a local `pip install -e ./edge_runtime` leaves in the folder.
_BUILD_DIRS = {"build", "dist"}
# The earliest time a zip entry can carry; any fixed value makes builds repeatable.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644 << 16
# An extra's name as PEP 685 normalizes it; anything else would not match what pip asks for.
_EXTRA = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class WheelError(Exception):
    """The package source cannot be turned into a wheel (names what is wrong)."""


@dataclass(frozen=True)
class Wheel:
    filename: str
    data: bytes
    sha256: str
    version: str
    requires: tuple[str, ...]
    requires_python: str
    # extra -> what it adds (edge_runtime/pyproject.toml's optional-dependencies).
    extras: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def requires_dist(self) -> tuple[str, ...]:
        """Every ``Requires-Dist`` line of the metadata: the requirements, then each extra's."""
        return _requires_dist(self.requires, self.extras)


_lock = threading.Lock()
_cache: dict[str, Wheel] = {}


def source_files(source_dir: Path = SOURCE_DIR) -> list[tuple[str, bytes]]:
    """``(archive path, content)`` of every distributable file, sorted by path."""
    if not (source_dir / "__init__.py").is_file():
        raise WheelError(f"{source_dir} is not a Python package (no __init__.py)")
    files: list[tuple[str, bytes]] = []
    for path in source_dir.rglob("*"):
        rel = path.relative_to(source_dir)
        if any(part == "__pycache__" or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel.parts[0] in _BUILD_DIRS:
            continue
        if not path.is_file() or not (path.suffix in _SUFFIXES or path.name in _NAMES):
            continue
        files.append((f"{PACKAGE}/{rel.as_posix()}", path.read_bytes()))
    files.sort()
    return files


@dataclass(frozen=True)
class _Project:
    """What the wheel's metadata says, read from the package source."""

    name: str
    version: str
    summary: str
    requires_python: str
    requires: tuple[str, ...]
    scripts: dict[str, str]
    extras: dict[str, tuple[str, ...]]


def _version_from_source(init_source: bytes) -> str:
    """``__version__`` as written in ``edge_runtime/__init__.py``."""
    try:
        body = ast.parse(init_source).body
    except SyntaxError as exc:
        raise WheelError(f"{PACKAGE}/__init__.py does not parse: {exc}") from exc
    version: object = None
    for node in body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == "__version__" and value is not None:
            try:
                version = ast.literal_eval(value)
            except ValueError:
                version = None  # not a literal: reported below by name
    if not isinstance(version, str) or not version:
        raise WheelError(f"{PACKAGE}/__init__.py must assign __version__ a literal string")
    return version


def _project(init_source: bytes, pyproject: bytes | None) -> _Project:
    """The metadata: the version from ``__init__.py``, the rest from the edge runtime's ``pyproject.toml``."""
    version = _version_from_source(init_source)
    if pyproject is None:
        raise WheelError(f"{PROJECT_FILE} is missing from the source files")
    try:
        project = tomllib.loads(pyproject.decode())["project"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise WheelError(f"{PROJECT_FILE} has no readable [project] table: {exc}") from exc
    requires = project.get("dependencies", [])
    scripts = project.get("scripts", {})
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise WheelError(f"{PROJECT_FILE}: [project] dependencies must be a list of strings")
    if not isinstance(scripts, dict) or not all(isinstance(v, str) for v in scripts.values()):
        raise WheelError(f"{PROJECT_FILE}: [project.scripts] must map names to strings")
    extras = _extras(project.get("optional-dependencies", {}))
    fields = {key: project.get(key) for key in ("name", "description", "requires-python")}
    missing = sorted(key for key, value in fields.items() if not isinstance(value, str) or not value)
    if missing:
        raise WheelError(f"{PROJECT_FILE}: [project] needs {', '.join(missing)}")
    return _Project(name=str(fields["name"]), version=version, summary=str(fields["description"]),
                    requires_python=str(fields["requires-python"]), requires=tuple(requires), scripts=scripts,
                    extras=extras)


def _extras(table: object) -> dict[str, tuple[str, ...]]:
    """``[project.optional-dependencies]``, checked: normalized names, each a list of requirement strings."""
    if not isinstance(table, dict):
        raise WheelError(f"{PROJECT_FILE}: [project.optional-dependencies] must be a table")
    extras: dict[str, tuple[str, ...]] = {}
    for name, requires in table.items():
        if not _EXTRA.match(name):
            raise WheelError(f"{PROJECT_FILE}: extra {name!r} is not a normalized name (lowercase, digits, '-')")
        if not isinstance(requires, list) or not all(isinstance(r, str) and r for r in requires):
            raise WheelError(f"{PROJECT_FILE}: extra {name!r} must be a list of requirement strings")
        extras[name] = tuple(requires)
    return extras


def _requires_dist(requires: tuple[str, ...], extras: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The requirements, then each extra's with ``extra == "name"`` added to its marker (PEP 508)."""
    lines = list(requires)
    for name, extra_requires in extras.items():
        for requirement in extra_requires:
            spec, _, marker = requirement.partition(";")
            condition = f'extra == "{name}"'
            if marker.strip():
                condition = f"({marker.strip()}) and {condition}"
            lines.append(f"{spec.strip()}; {condition}")
    return tuple(lines)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _dist_info(project: _Project) -> list[tuple[str, bytes]]:
    version = project.version
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {project.name}",
        f"Version: {version}",
        f"Summary: {project.summary}",
        "License: Apache-2.0",
        f"Requires-Python: {project.requires_python}",
        *(f"Requires-Dist: {req}" for req in _requires_dist(project.requires, project.extras)),
        *(f"Provides-Extra: {name}" for name in project.extras),
    ]
    wheel = [
        "Wheel-Version: 1.0",
        f"Generator: edgewise-control-plane ({version})",
        "Root-Is-Purelib: true",
        f"Tag: {TAG}",
    ]
    entry_points = "[console_scripts]\n" + "".join(f"{name} = {target}\n" for name, target in project.scripts.items())
    info = f"{PACKAGE}-{version}.dist-info"
    return [
        (f"{info}/METADATA", ("\n".join(metadata) + "\n").encode()),
        (f"{info}/WHEEL", ("\n".join(wheel) + "\n").encode()),
        (f"{info}/entry_points.txt", entry_points.encode()),
        (f"{info}/top_level.txt", f"{PACKAGE}\n".encode()),
    ]


def build_wheel(files: list[tuple[str, bytes]]) -> Wheel:
    """Build the wheel from ``source_files()`` output. Pure: same input, same bytes."""
    by_name = dict(files)
    init = by_name.get(f"{PACKAGE}/__init__.py")
    if init is None:
        raise WheelError(f"{PACKAGE}/__init__.py is missing from the source files")
    project = _project(init, by_name.get(PROJECT_FILE))
    version = project.version
    entries = [(name, data) for name, data in files if name != PROJECT_FILE] + _dist_info(project)
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
        requires=project.requires,
        requires_python=project.requires_python,
        extras=project.extras,
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

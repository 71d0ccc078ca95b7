"""The auditor's export of the estate's audit trail, and its standalone check (``edge-runtime audit-verify``).

A bundle is one zip file (format version 1)::

    manifest.json                   {"format": "edgewise-audit-bundle", "version": 1, "created_at": ISO time,
                                     "control_plane": {"origin", "vkey"},
                                     "nodes": [{"node": uuid, "site": uuid, "origin", "vkey"}, ...]}
    control-plane/entries.jsonl     {"position": 0, 1, ..., "leaf_data": str} per line, in log order;
                                    the leaf hash is merkle.leaf_hash(leaf_data as UTF-8)
    control-plane/checkpoints.txt   the control plane log's signed checkpoints, oldest first
    nodes/<uuid>/entries.jsonl      the node's LogEntry JSON per line, seq 1, 2, ...
    nodes/<uuid>/checkpoints.txt    the node's checkpoints, oldest first
    proofs.json                     {"control-plane": [{"old": m, "new": n, "proof": [base64]}, ...],
                                     "<node uuid>": [...]}: consistency proofs between successive checkpoints

A checkpoints.txt holds C2SP signed notes, each followed by a line ``-----``.
The control plane's checkpoints are signed by its audit log key (name = its
origin) and cosigned by the same key, which gives their time; a node's are
signed by the node's identity key (name = the node's origin) and cosigned by
the control plane's audit log key. Every key is a C2SP vkey string whose name
is the origin it signs for.

:func:`verify_bundle` needs nothing but this package: no Django, no network.
It checks the manifest; refuses a bundle whose control plane key is not the
one the auditor trusts (when one is given: without it, the bundle's own key
is used and the report says so); then each log on its own (see
:mod:`edge_runtime.audit_bundle_logs`): signatures and cosignatures, the root
of its entries at every checkpoint's size, sizes that never decrease, every
consistency proof; and the node heads that the control plane's own log
recorded ("audit.node_heads" events) against the nodes' logs. Entries after a
log's last checkpoint are reported as not yet covered, not as an error; a log
with entries but no checkpoint at all is an error, because nothing vouches
for any of it. :class:`BundleWriter` writes the same format, for the control
plane's exporter and for tests.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_runtime.audit_bundle_logs import (
    NODE_HEADS_ACTION,
    BundleError,
    Head,
    LogFailure,
    LogReport,
    LogSpec,
    Walk,
    check_heads,
    check_proofs,
    control_plane_leaves,
    heads_by_node,
    join_notes,
    node_leaves,
    read_checkpoints,
    walk,
)
from edge_runtime.audit_inclusion import (
    ANOTHER_KEY,
    InclusionReport,
    inclusion_proof_document,
    trusted_key,
    verify_inclusion_file,
)
from edge_runtime.merkle import Tree, consistency_proof
from edge_runtime.notes import NoteError, parse_vkey, vkey
from edge_runtime.protocol.audit import LogEntry, encode_proof

__all__ = ["BundleError", "BundleReport", "BundleWriter", "InclusionReport", "LogReport", "Proof",
           "inclusion_proof_document", "proofs_between", "verify_bundle", "verify_inclusion_file"]

FORMAT = "edgewise-audit-bundle"
VERSION = 1
MANIFEST = "manifest.json"
PROOFS = "proofs.json"
CONTROL_PLANE = "control-plane"
MAX_MANIFEST_BYTES = 64 << 20
MAX_CHECKPOINTS_BYTES = 256 << 20
MAX_PROOFS_BYTES = 512 << 20
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def entries_member(log: str) -> str:
    return f"{CONTROL_PLANE}/entries.jsonl" if log == CONTROL_PLANE else f"nodes/{log}/entries.jsonl"


def checkpoints_member(log: str) -> str:
    return f"{CONTROL_PLANE}/checkpoints.txt" if log == CONTROL_PLANE else f"nodes/{log}/checkpoints.txt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlPlaneKey(_Strict):
    origin: str = Field(min_length=1, max_length=200)
    vkey: str = Field(max_length=400)


class NodeKey(_Strict):
    node: str = Field(pattern=UUID_PATTERN)
    site: str = Field(pattern=UUID_PATTERN)
    origin: str = Field(min_length=1, max_length=200)
    vkey: str = Field(max_length=400)


class Manifest(_Strict):
    format: Literal["edgewise-audit-bundle"]
    version: Literal[1]
    created_at: str
    control_plane: ControlPlaneKey
    nodes: list[NodeKey]

    @field_validator("created_at")
    @classmethod
    def _iso(cls, value: str) -> str:
        try:
            dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 time") from None
        return value


@dataclass(frozen=True)
class Proof:
    """A consistency proof from the log's size ``old`` to its size ``new``."""

    old: int
    new: int
    hashes: list[bytes]

    def to_json(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "proof": encode_proof(self.hashes)}


def proofs_between(tree: Tree, sizes: Iterable[int]) -> list[Proof]:
    """The consistency proofs between each two successive (distinct, non-zero) checkpoint sizes of a log."""
    distinct = sorted({size for size in sizes if size > 0})
    return [Proof(old, new, consistency_proof(tree, old, new)) for old, new in zip(distinct, distinct[1:],
                                                                                     strict=False)]


class BundleWriter:
    """Writes a bundle, streaming each log's entries: the control plane's log once, then each node's.

    ``with BundleWriter(path, origin=..., vkey=...) as bundle: bundle.control_plane(...); bundle.node(...)``;
    the manifest and proofs are written when it closes (a writer left by an exception writes no manifest, so
    no verifier takes what it wrote for a bundle). The proofs of a log are ``proofs_between(tree, sizes)`` of
    its checkpoints' sizes, with any :class:`~edge_runtime.merkle.Tree` of it (a store of its subtree hashes).
    """

    def __init__(self, target: str | Path | BinaryIO, *, origin: str, vkey: str,
                 created_at: dt.datetime | None = None) -> None:
        self._zip = zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED)
        when = created_at or dt.datetime.now(dt.UTC)
        self._manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "created_at": when.isoformat(),
                                          "control_plane": {"origin": origin, "vkey": vkey}, "nodes": []}
        self._proofs: dict[str, list[dict[str, Any]]] = {}

    def control_plane(self, *, entries: Iterable[tuple[int, str]], checkpoints: Sequence[str],
                      proofs: Iterable[Proof]) -> None:
        """The control plane's log: (position, leaf data) in log order, its signed checkpoints oldest first."""
        lines = (json.dumps({"position": position, "leaf_data": data}, ensure_ascii=False) + "\n"
                 for position, data in entries)
        self._log(CONTROL_PLANE, lines, checkpoints, proofs)

    def node(self, *, node: str, site: str, origin: str, vkey: str, entries: Iterable[LogEntry],
             checkpoints: Sequence[str], proofs: Iterable[Proof]) -> None:
        """One node's log: its entries in seq order, its cosigned checkpoints oldest first."""
        if node in self._proofs:
            raise ValueError(f"the bundle already holds the log of node {node}")
        self._manifest["nodes"].append({"node": node, "site": site, "origin": origin, "vkey": vkey})
        self._log(node, (entry.model_dump_json() + "\n" for entry in entries), checkpoints, proofs)

    def _log(self, log: str, lines: Iterable[str], checkpoints: Sequence[str], proofs: Iterable[Proof]) -> None:
        if log in self._proofs:
            raise ValueError(f"the bundle already holds the log {log!r}")
        with self._zip.open(entries_member(log), "w", force_zip64=True) as fh:
            for line in lines:
                fh.write(line.encode())
        self._zip.writestr(checkpoints_member(log), join_notes(checkpoints))
        self._proofs[log] = [proof.to_json() for proof in proofs]

    def close(self) -> None:
        self._zip.writestr(PROOFS, json.dumps(self._proofs))
        self._zip.writestr(MANIFEST, json.dumps(self._manifest, indent=2))
        self._zip.close()

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # an unfinished bundle has no manifest: no verifier takes it for a whole one
            self._zip.close()


@dataclass
class BundleReport:
    """What a bundle showed: ``errors`` about the bundle as a whole, then one report per log."""

    path: str
    created_at: str | None = None
    control_plane_origin: str | None = None
    control_plane_vkey: str | None = None
    # True when no key to trust was given: the bundle was checked with the key it names itself.
    key_from_bundle: bool = True
    errors: list[str] = field(default_factory=list)
    logs: list[LogReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(log.ok for log in self.logs)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for item, log in zip(data["logs"], self.logs, strict=True):
            item["ok"], item["uncovered"] = log.ok, log.uncovered
        return {**data, "ok": self.ok}


@dataclass(frozen=True)
class _Estate:
    manifest: Manifest
    control_plane: LogSpec
    nodes: list[tuple[NodeKey, LogSpec]]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path} is not an audit bundle (a zip file): {exc}") from None


def _read(zf: zipfile.ZipFile, member: str, limit: int) -> bytes:
    """A member's bytes; LogFailure if it is missing, too large or corrupt."""
    try:
        with zf.open(member) as fh:
            data = fh.read(limit + 1)
    except KeyError:
        raise LogFailure(f"the bundle has no {member}") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError) as exc:
        raise LogFailure(f"{member} cannot be read from the bundle: {exc}") from None
    if len(data) > limit:
        raise LogFailure(f"{member} is larger than {limit} bytes")
    return data


def _json(zf: zipfile.ZipFile, member: str, limit: int) -> Any:
    try:
        return json.loads(_read(zf, member, limit))
    except ValueError:
        raise LogFailure(f"{member} is not JSON") from None


def _key(text: str, what: str, origin: str) -> tuple[str, Any]:
    try:
        name, key = parse_vkey(text)
    except NoteError as exc:
        raise LogFailure(f"manifest.json: the {what} is not a verifier key: {exc}") from None
    if name != origin:
        raise LogFailure(f"manifest.json: the {what} is named {name!r}, not after its origin {origin!r}")
    return name, key


def _estate(zf: zipfile.ZipFile, report: BundleReport) -> _Estate:
    if MANIFEST not in zf.namelist():
        raise BundleError(f"{report.path} is a zip file but not an audit bundle: it has no {MANIFEST}")
    raw = _json(zf, MANIFEST, MAX_MANIFEST_BYTES)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{report.path} is a zip file but not an audit bundle (its manifest's format is not "
                          f"{FORMAT!r})")
    if raw.get("version") != VERSION:
        raise LogFailure(f"version {raw.get('version')!r} of the bundle format is not known here "
                         f"(this verifier reads version {VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise LogFailure(f"manifest.json is malformed: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    origin = manifest.control_plane.origin
    report.created_at, report.control_plane_origin = manifest.created_at, origin
    cp_key = _key(manifest.control_plane.vkey, "control plane's key", origin)
    report.control_plane_vkey = vkey(*cp_key)
    nodes: list[tuple[NodeKey, LogSpec]] = []
    for node in manifest.nodes:
        if any(node.node == seen.node for seen, _ in nodes):
            raise LogFailure(f"manifest.json names node {node.node} twice")
        node_key = _key(node.vkey, f"key of node {node.node}", node.origin)
        nodes.append((node, LogSpec(node.node, node.origin, signer=node_key, cosigner=cp_key)))
    return _Estate(manifest, LogSpec(CONTROL_PLANE, origin, signer=cp_key, cosigner=cp_key), nodes)


def _check_members(zf: zipfile.ZipFile, estate: _Estate) -> None:
    names = [name for name in zf.namelist() if not name.endswith("/")]
    expected = {MANIFEST, PROOFS}
    for spec in (estate.control_plane, *(spec for _, spec in estate.nodes)):
        expected |= {entries_member(spec.log), checkpoints_member(spec.log)}
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise LogFailure(f"the bundle holds {name} twice")
        if name not in expected:
            raise LogFailure(f"the bundle holds {name}, which its manifest does not name")
        seen.add(name)


def _proofs(zf: zipfile.ZipFile, estate: _Estate) -> dict[str, Any]:
    proofs = _json(zf, PROOFS, MAX_PROOFS_BYTES)
    if not isinstance(proofs, dict):
        raise LogFailure(f"{PROOFS} is not an object of proofs by log")
    logs = {CONTROL_PLANE, *(node.node for node, _ in estate.nodes)}
    for log in proofs:
        if log not in logs:
            raise LogFailure(f"{PROOFS} holds proofs of {log!r}, a log the manifest does not name")
    return proofs


Leaves = Callable[[IO[bytes], str], Iterator[bytes]]


def _verify_log(zf: zipfile.ZipFile, spec: LogSpec, proofs: dict[str, Any], leaves: Leaves,
                heads: Sequence[Head] = (), site: str | None = None) -> LogReport:
    report, walked = LogReport(log=spec.log, origin=spec.origin, site=site), Walk()
    try:
        checkpoints = read_checkpoints(spec, _text(zf, checkpoints_member(spec.log)))
        report.checkpoints = len(checkpoints)
        if checkpoints:
            report.last_size = checkpoints[-1].checkpoint.size
            report.last_cosigned_at = checkpoints[-1].cosigned_at
        member = entries_member(spec.log)
        try:
            with zf.open(member) as stream:
                walk(spec, leaves(stream, member), checkpoints, [head.size for head in heads], walked)
        except KeyError:
            raise LogFailure(f"the bundle has no {member}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError) as exc:
            raise LogFailure(f"{member} cannot be read from the bundle: {exc}") from None
        if walked.entries and not checkpoints:
            raise LogFailure(f"the log holds {walked.entries} entries but no checkpoint: nothing vouches for them")
        check_proofs(spec, checkpoints, proofs.get(spec.log, []))
        check_heads(spec, heads, walked)
        report.heads_checked = len(heads)
    except LogFailure as exc:
        report.error = str(exc)
    report.entries = walked.entries
    return report


def _text(zf: zipfile.ZipFile, member: str) -> str:
    try:
        return _read(zf, member, MAX_CHECKPOINTS_BYTES).decode()
    except UnicodeDecodeError:
        raise LogFailure(f"{member} is not UTF-8 text") from None


def _verify_logs(zf: zipfile.ZipFile, estate: _Estate, proofs: dict[str, Any], report: BundleReport) -> None:
    cp_spec = estate.control_plane
    heads: list[Head] = []
    control_plane = _verify_log(zf, cp_spec, proofs,
                                lambda stream, member: control_plane_leaves(cp_spec, stream, member, heads))
    report.logs.append(control_plane)
    by_node = heads_by_node(heads)
    unknown = sorted(set(by_node) - {node.node for node, _ in estate.nodes})
    if unknown and control_plane.ok:
        control_plane.error = (f"position {by_node[unknown[0]][0].position} ({NODE_HEADS_ACTION}) records the head "
                               f"of node {unknown[0]}, whose log the bundle does not hold")
    for node, spec in estate.nodes:
        report.logs.append(_verify_log(zf, spec, proofs, functools.partial(node_leaves, spec),
                                       heads=by_node.get(node.node, []), site=node.site))


def verify_bundle(path: str | Path, *, trusted_vkey: str | None = None) -> BundleReport:
    """Check a bundle; BundleError if ``path`` is no bundle (or ``trusted_vkey`` no key), else the report."""
    trusted = trusted_key(trusted_vkey) if trusted_vkey is not None else None
    report = BundleReport(path=str(path), key_from_bundle=trusted is None)
    with _open_zip(Path(path)) as zf:
        try:
            estate = _estate(zf, report)
            if trusted is not None and trusted != report.control_plane_vkey:
                raise LogFailure(f"the bundle is {ANOTHER_KEY}: it names {report.control_plane_vkey}, "
                                 f"you trust {trusted}")
            _check_members(zf, estate)
            proofs = _proofs(zf, estate)
        except LogFailure as exc:
            report.errors.append(str(exc))
            return report
        _verify_logs(zf, estate, proofs, report)
    return report

"""A bundle in, imported at a node: everything verified while streaming, then handed to the agent whole.

:func:`import_bundle` (``edge-runtime import-bundle FILE``, and the agent's
drop folder) refuses, with the reason and before a byte of any member is
read:

* a bundle that is not for this node's site, or holds nothing for this node;
* one not signed by the control plane key this node pinned (or a key it
  endorsed through rotations, following the bundle's key chain);
* a replay (the sequence already imported) and a rollback (a lower one);
* an expired bundle, unless the site's policy (``policy.bundles.expired``
  of the desired state in force) is ``warn``: then it is imported and the
  warning recorded.

It then streams the members through sha256 into a staging directory, keeping
only this node's entry and the artifacts its desired state names, and
refuses an altered, truncated, reordered or padded file. Only after all of
that, and the node's own desired state verified, does it commit: artifacts
move into the model store's directory (where the model store hashes them
again before onnxruntime sees them), the node's entry goes into the inbox,
and the sequence is recorded durably. The running agent (or the next start)
applies the inbox like a sync's answer (``Agent.take_bundle``): stage,
smoke-test and swap of each model, the last good version kept serving. A
refused bundle leaves the node exactly as it was.

Every import and every refusal is written to the node's audit log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from edge_runtime import signing
from edge_runtime.airgap.bundle import (
    BundleRefused,
    Member,
    SignedMeta,
    bundle_digest,
    check_fresh,
    read_bundle,
    verify_signature,
)
from edge_runtime.audit import AuditError, NodeAudit
from edge_runtime.protocol import DesiredState
from edge_runtime.protocol.airgap import NodeBundle
from edge_runtime.state import Identity, StateDir, StateError, write_atomic

logger = logging.getLogger("edge_runtime.airgap")

BUNDLES_DIR = "bundles"
STATE_FILE = "state.json"
INBOX_DIR = "inbox"
STAGING_DIR = "staging"
LOCK_FILE = ".lock"


class BundleState(BaseModel):
    """What a node remembers of bundles (``<state dir>/bundles/state.json``)."""

    model_config = ConfigDict(extra="ignore")

    in_sequence: int = 0
    in_digest: str = ""
    in_made_at: dt.datetime | None = None
    in_imported_at: dt.datetime | None = None
    in_warning: str = ""
    # The last bundle in the agent applied, and when.
    applied_sequence: int = 0
    applied_at: dt.datetime | None = None
    out_sequence: int = 0
    out_written_at: dt.datetime | None = None
    last_refusal: str = ""
    last_refusal_at: dt.datetime | None = None


@dataclass
class Imported:
    """A bundle in that passed every check and is in the inbox."""

    sequence: int
    site: str
    made_at: dt.datetime
    generation: int
    artifacts: list[str] = field(default_factory=list)
    queries: int = 0
    warning: str = ""


class Bundles:
    """The bundles directory of one state directory: its state file, inbox and staging area."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.path = state.path / BUNDLES_DIR
        self.inbox = self.path / INBOX_DIR
        self.staging = self.path / STAGING_DIR

    def load(self) -> BundleState:
        try:
            return BundleState.model_validate_json((self.path / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return BundleState()
        except (OSError, ValidationError) as exc:
            # The floor must not silently drop to zero: a damaged file stops imports until it is looked at.
            raise StateError(f"{self.path / STATE_FILE} cannot be read ({exc}); an import would not know which "
                             "bundles were imported before: restore it or remove it deliberately") from None

    def save(self, state: BundleState) -> None:
        write_atomic(self.path / STATE_FILE, (state.model_dump_json(indent=2) + "\n").encode(), mode=0o600)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One import (or export) at a time per state directory; waits for the one under way."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def pending(self) -> list[Path]:
        """Entries in the inbox, oldest sequence first."""
        if not self.inbox.is_dir():
            return []
        return sorted(p for p in self.inbox.iterdir() if p.suffix == ".json")


def expired_policy(state: StateDir, identity: Identity) -> str:
    """``refuse`` or ``warn``: the site's policy for an expired bundle, from the desired state in force."""
    try:
        loaded = state.load_desired(identity)
    except StateError:
        loaded = None
    if loaded is None:
        return "refuse"
    value = loaded[1].policy.get("bundles", {}).get("expired", "refuse")
    return "warn" if value == "warn" else "refuse"


def import_bundle(state: StateDir, path: Path, *, now: dt.datetime | None = None,
                  audit: NodeAudit | None = None) -> Imported:
    """Verify the bundle at ``path`` and put this node's part of it in the inbox; BundleRefused says why not."""
    bundles = Bundles(state)
    audit = audit if audit is not None else _audit(state)
    with bundles.lock():
        try:
            imported = _import(state, bundles, path, now or dt.datetime.now(dt.UTC))
        except BundleRefused as exc:
            _refused(bundles, audit, path, str(exc))
            raise
        if audit is not None:
            audit.record("bundle.imported", {"sequence": imported.sequence, "site": imported.site,
                                             "generation": imported.generation,
                                             "artifacts": len(imported.artifacts), "queries": imported.queries,
                                             **({"warning": imported.warning} if imported.warning else {})})
        return imported


def _audit(state: StateDir) -> NodeAudit | None:
    try:
        return NodeAudit.in_state_dir(state.path)
    except AuditError as exc:
        logger.error("the audit log cannot be opened: %s", exc)
        return None


def _refused(bundles: Bundles, audit: NodeAudit | None, path: Path, reason: str) -> None:
    logger.error("bundle %s refused: %s", path.name, reason)
    with contextlib.suppress(StateError, OSError):
        current = bundles.load()
        current.last_refusal, current.last_refusal_at = reason[:500], dt.datetime.now(dt.UTC)
        bundles.save(current)
    if audit is not None:
        audit.record("bundle.refused", {"file": path.name[:200], "reason": reason[:500]})


def _import(state: StateDir, bundles: Bundles, path: Path, now: dt.datetime) -> Imported:
    try:
        identity = state.load_identity()
        floor = bundles.load()
    except StateError as exc:
        raise BundleRefused(str(exc)) from None
    policy = expired_policy(state, identity)
    own = f"nodes/{identity.node_id}.json"
    warning = ""

    def check(signed: SignedMeta) -> None:
        nonlocal warning
        meta = signed.signed
        if meta.direction != "in":
            raise BundleRefused(f"this is a bundle out, written by node {meta.node}, not a bundle in for a site")
        if meta.site != identity.site:
            raise BundleRefused(f"the bundle is for site {meta.site}, not for this node's site {identity.site}")
        verify_signature(signed, _signer(signed, identity))
        if meta.sequence <= floor.in_sequence:
            when = floor.in_imported_at.isoformat(timespec="seconds") if floor.in_imported_at else "before"
            if meta.sequence == floor.in_sequence and bundle_digest(signed) == floor.in_digest:
                raise BundleRefused(f"bundle {meta.sequence} was imported already ({when}): a replay changes nothing")
            raise BundleRefused(f"bundle {meta.sequence} is not newer than bundle {floor.in_sequence}, imported "
                                f"{when}: an older bundle is never applied (a rollback)")
        expired = check_fresh(meta, now=now)
        if expired is not None:
            if policy != "warn":
                raise BundleRefused(f"{expired}, and this site's policy refuses expired bundles")
            warning = f"{expired}; imported as the site's policy allows"
        if meta.member(own) is None:
            raise BundleRefused(f"the bundle holds nothing for this node ({identity.node_id}): it was made before "
                                "this node enrolled, or for its other nodes")

    shutil.rmtree(bundles.staging, ignore_errors=True)
    bundles.staging.mkdir(parents=True, mode=0o700)
    try:
        signed = read_bundle(path, check, _Sink(bundles.staging, own))
        entry, desired, key = _own_entry(bundles.staging, identity)
        staged = _check_artifacts(bundles.staging, desired, key)
        imported = _commit(state, bundles, signed, entry, staged, floor, now)
    finally:
        shutil.rmtree(bundles.staging, ignore_errors=True)
    imported.warning = warning
    if warning:
        floor = bundles.load()
        floor.in_warning = warning
        bundles.save(floor)
        logger.warning("bundle %d: %s", imported.sequence, warning)
    return imported


def _signer(signed: SignedMeta, identity: Identity) -> Ed25519PublicKey:
    """The key the bundle must verify with: the pinned one, or the newest one it endorsed in the key chain."""
    pinned = identity.public_key()
    keyids = [s.keyid for s in signed.signatures]
    if identity.signing_key_fingerprint in keyids:
        return pinned
    for keyid in keyids:
        try:
            path = signing.follow_key_chain(signed.signed.key_chain, pinned_key=pinned, target_fingerprint=keyid,
                                            pinned_fingerprint=identity.signing_key_fingerprint)
        except signing.SignatureError:
            continue
        return signing.public_key_from_b64(path[-1].public_key)
    raise BundleRefused(f"signed by key {keyids[0][:16]}, not by this node's pinned control plane key "
                        f"{identity.signing_key_fingerprint[:16]}, and no endorsement leads there from it")


class _Sink:
    """Where each member goes: this node's entry and the artifacts its desired state names to staging, the rest
    through the hash only."""

    def __init__(self, staging: Path, own: str) -> None:
        self.staging, self.own = staging, own
        self._wanted: set[str] | None = None

    def __call__(self, member: Member) -> BinaryIO:
        if member.name == self.own:
            return (self.staging / "node.json").open("xb")
        if member.name.startswith("artifacts/") and member.name.removeprefix("artifacts/") in self.wanted():
            return (self.staging / f"{member.sha256}.onnx").open("xb")
        return open(os.devnull, "wb")  # noqa: SIM115 - closed by the reader, as every sink is

    def wanted(self) -> set[str]:
        # Read once this node's entry is staged (it comes before the artifacts); verified after the whole file.
        if self._wanted is None:
            self._wanted = set()
            with contextlib.suppress(OSError, ValueError, ValidationError):
                entry = NodeBundle.model_validate_json((self.staging / "node.json").read_bytes())
                if entry.answer.desired is not None:
                    models = json.loads(entry.answer.desired.payload).get("models", [])
                    self._wanted = {m["sha256"] for m in models if isinstance(m, dict) and "sha256" in m}
        return self._wanted


def _own_entry(staging: Path, identity: Identity) -> tuple[NodeBundle, DesiredState, Ed25519PublicKey]:
    """This node's entry and its desired state, verified; with the key that signed it (its artifacts' key too)."""
    try:
        entry = NodeBundle.model_validate_json((staging / "node.json").read_bytes())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise BundleRefused(f"this node's entry is not valid: {'.'.join(map(str, first['loc']))}: {first['msg']}"
                            ) from None
    if entry.node_id != identity.node_id or entry.answer.desired is None:
        raise BundleRefused("this node's entry is not addressed to it or holds no desired state")
    try:
        desired, endorsement = signing.verify_with_chain(
            entry.answer.desired, pinned_fingerprint=identity.signing_key_fingerprint, pinned_key=identity.public_key())
    except signing.SignatureError as exc:
        raise BundleRefused(f"the desired state in the bundle does not verify: {exc}") from None
    if desired.node_id != identity.node_id:
        raise BundleRefused(f"the desired state in the bundle is for node {desired.node_id}, not this node")
    key = signing.public_key_from_b64(endorsement.public_key) if endorsement else identity.public_key()
    return entry, desired, key


def _check_artifacts(staging: Path, desired: DesiredState, key: Ed25519PublicKey) -> list[str]:
    """The staged artifacts, each one's signature checked against its desired model."""
    staged: list[str] = []
    for model in desired.models:
        path = staging / f"{model.sha256}.onnx"
        if not path.is_file() or model.sha256 in staged:
            continue
        try:
            signing.verify_artifact(model.sha256, model.signature, key)
        except signing.SignatureError as exc:
            raise BundleRefused(f"the artifact of model {model.name} version {model.version} is not signed by the "
                                f"control plane: {exc}") from None
        staged.append(model.sha256)
    return staged


def _commit(state: StateDir, bundles: Bundles, signed: SignedMeta, entry: NodeBundle, staged: list[str],
            floor: BundleState, now: dt.datetime) -> Imported:
    """Move what passed into place: artifacts, then the inbox entry, then the raised floor (all durable)."""
    artifacts = state.path / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    for sha256 in staged:
        source = bundles.staging / f"{sha256}.onnx"
        with source.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(source, artifacts / f"{sha256}.onnx")
    _fsync_dir(artifacts)
    meta = signed.signed
    bundles.inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(bundles.inbox / f"{meta.sequence:012d}.json", (entry.model_dump_json() + "\n").encode())
    floor.in_sequence, floor.in_digest = meta.sequence, bundle_digest(signed)
    floor.in_made_at, floor.in_imported_at = meta.created, now
    floor.in_warning = ""
    bundles.save(floor)
    assert entry.answer.desired is not None
    generation = json.loads(entry.answer.desired.payload).get("generation", 0)
    return Imported(sequence=meta.sequence, site=meta.site, made_at=meta.created, generation=generation,
                    artifacts=staged, queries=len(entry.answer.queries))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

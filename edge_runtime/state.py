"""The node's state directory: who it is, what it last verified, how it is doing.

Three files, each written atomically (a temporary file in the same directory,
flushed, then ``os.replace``), so a crash or a power cut leaves either the old
file or the new one, never half of either:

``identity.json`` (mode 0600)
    The node's id, site, credential, control-plane URL, and the control
    plane's public signing key pinned at enrollment with its fingerprint.
``desired_state.json``
    The last desired state the node *verified*, exactly as signed. It is
    verified again against the pinned key whenever it is loaded, so a file
    altered on disk is refused rather than applied.
``status.json``
    Applied generation, last successful sync, consecutive failures, refusals
    not yet reported, last error. Read by ``edge-runtime status``, which
    works without the control plane.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime import signing
from edge_runtime.protocol import DesiredState, NodeRole, Refusal, SignedDesiredState

IDENTITY_FILE = "identity.json"
DESIRED_FILE = "desired_state.json"
STATUS_FILE = "status.json"
LOCK_FILE = "agent.lock"
# How many refused documents the node remembers, so that the same refused
# document offered again on every sync is reported once, not once per sync.
REMEMBERED_REFUSALS = 50


class StateError(Exception):
    """A state file is missing, unreadable or refused; the message says which and why."""


class Identity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str
    site: str
    name: str
    role: NodeRole
    credential: str
    url: str
    signing_public_key: str
    signing_key_fingerprint: str
    sync_interval_s: float = Field(default=10.0, gt=0)
    enrolled_at: dt.datetime

    def public_key(self) -> Ed25519PublicKey:
        return signing.public_key_from_b64(self.signing_public_key)


class Status(BaseModel):
    model_config = ConfigDict(extra="ignore")

    applied_generation: int = 0
    # The floor a desired state must reach, from the network or from disk: the
    # highest generation applied in the epoch in force, and that epoch. It
    # survives a desired-state file that fails verification or is older, so
    # refusing one cannot open the door to an older one.
    highest_generation: int = 0
    epoch: str = ""
    epoch_started_at: dt.datetime | None = None
    # The desired state refused last, until one is applied: reported on every sync.
    refusing: Refusal | None = None
    last_sync_at: dt.datetime | None = None
    last_attempt_at: dt.datetime | None = None
    consecutive_failures: int = 0
    pending_refusals: list[Refusal] = Field(default_factory=list)
    # Digests of refused documents already reported (newest last).
    refused_digests: list[str] = Field(default_factory=list)
    last_error: str = ""
    last_error_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    # Where this node's inference API listens ("" when it serves no models).
    model_server_url: str = ""


def default_state_dir() -> Path:
    """``$EDGEWISE_STATE_DIR``, else ``/var/lib/edgewise`` for root, else ``~/.local/share/edgewise``."""
    env = os.environ.get("EDGEWISE_STATE_DIR")
    if env:
        return Path(env)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/edgewise")
    return Path.home() / ".local" / "share" / "edgewise"


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` in one step; readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and not fatal there.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _dump(model: BaseModel) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


class StateDir:
    """One node's state directory. Every method reads or writes whole files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def desired_path(self) -> Path:
        return self.path / DESIRED_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    # identity -----------------------------------------------------------

    def has_identity(self) -> bool:
        return self.identity_path.exists()

    def load_identity(self) -> Identity:
        try:
            raw = self.identity_path.read_bytes()
        except FileNotFoundError:
            raise StateError(
                f"this node is not enrolled: {self.identity_path} does not exist (run `edge-runtime enroll` first)"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot read {self.identity_path}: {exc.strerror}") from exc
        try:
            return Identity.model_validate_json(raw)
        except ValidationError as exc:
            raise StateError(f"{self.identity_path} is not a valid identity: {_first_error(exc)}") from exc

    def save_identity(self, identity: Identity) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.identity_path, _dump(identity), mode=0o600)

    # desired state ------------------------------------------------------

    def load_desired(self, identity: Identity) -> tuple[SignedDesiredState, DesiredState] | None:
        """The desired state on disk, verified again; None if there is none yet.

        Raises StateError if the file is there but does not verify against the
        pinned key or belongs to another node.
        """
        try:
            raw = self.desired_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.desired_path}: {exc.strerror}") from exc
        try:
            signed = SignedDesiredState.model_validate_json(raw)
        except ValidationError as exc:
            raise StateError(f"{self.desired_path} is not a signed desired state: {_first_error(exc)}") from exc
        try:
            desired, _ = signing.verify_with_chain(signed, pinned_fingerprint=identity.signing_key_fingerprint,
                                                   pinned_key=identity.public_key())
        except signing.SignatureError as exc:
            raise StateError(f"{self.desired_path} failed verification: {exc}") from exc
        if desired.node_id != identity.node_id:
            raise StateError(f"{self.desired_path} is for node {desired.node_id}, not this node {identity.node_id}")
        return signed, desired

    def save_desired(self, signed: SignedDesiredState) -> None:
        write_atomic(self.desired_path, _dump(signed), mode=0o600)

    # status -------------------------------------------------------------

    def load_status(self) -> Status:
        """The last status written; a fresh one if there is none or it is unreadable.

        status.json is a report, not a source of truth for what runs, so a
        damaged one costs only its counters.
        """
        try:
            return Status.model_validate_json(self.status_path.read_bytes())
        except (OSError, ValidationError):
            return Status()

    def save_status(self, status: Status, *, durable: bool = False) -> None:
        """Write the status; ``durable`` when the floor moved (a new state was applied).

        Rewritten on every sync; not worth an fsync each time (a lost update
        is rewritten on the next sync, a damaged file reads as a fresh one).
        The floor is written durably, so a power cut cannot lower it.
        """
        status.updated_at = dt.datetime.now(dt.UTC)
        write_atomic(self.status_path, _dump(status), mode=0o600, durable=durable)

    @contextlib.contextmanager
    def agent_lock(self) -> Iterator[None]:
        """Held by the running agent, so that two agents never share one identity and its files."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"another agent is already running with {self.path}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            # Closing the descriptor releases the lock, also when the process dies.
            os.close(fd)

    def clear(self) -> None:
        """Forget the desired state and status of a previous enrollment."""
        for path in (self.desired_path, self.status_path):
            path.unlink(missing_ok=True)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "document"
    return f"{where}: {first['msg']}"

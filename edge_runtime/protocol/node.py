"""What a node sends to enroll and to sync: its hardware, actual state, health and refusals (strict: an unknown
field is refused); and the enrollment's answer."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_runtime.canonical import canonical_json
from edge_runtime.protocol.audit import AuditUpload
from edge_runtime.protocol.base import INT32_MAX, INT64_MAX, NO_NUL, PROTOCOL_VERSION, NodeRole, Received, WireModel

# A report digest: sha256, hex ("" for none).
DIGEST_PATTERN = r"^([0-9a-f]{64})?$"


class Hardware(WireModel):
    """What a node found on the machine it runs on."""

    cpu_model: str = Field(default="", max_length=200)
    cpu_cores: int = Field(default=1, ge=1, le=4096)
    memory_mb: int = Field(default=0, ge=0, le=INT64_MAX)
    accelerators: list[str] = Field(default_factory=list, max_length=64)
    execution_providers: list[str] = Field(default_factory=list, max_length=64)
    os: str = Field(default="", max_length=100)
    arch: str = Field(default="", max_length=50)
    hostname: str = Field(default="", max_length=255)


def _ed25519_public_key(value: str) -> str:
    """A raw 32-byte Ed25519 public key in base64, in its one canonical spelling (so equal keys compare equal)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (the raw 32-byte Ed25519 public key, base64-encoded)") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    if base64.b64encode(raw).decode() != value:
        raise ValueError("not in canonical base64 (44 characters, with its padding)")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None
    return value


# The node's identity key (edge_runtime.identity_key): what it signs its audit log's checkpoints with.
IdentityKey = Annotated[str, Field(max_length=100), AfterValidator(_ed25519_public_key)]


class EnrollRequest(WireModel):
    protocol: Literal[1] = PROTOCOL_VERSION
    token: str = Field(min_length=8, max_length=200)
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: NodeRole = "device"
    runtime_version: str = Field(default="", max_length=50)
    hardware: Hardware = Field(default_factory=Hardware)
    # The node's own Ed25519 public key (raw, base64); absent from runtimes older than identity keys.
    identity_key: IdentityKey | None = None


class EnrollResponse(Received):
    protocol: Literal[1] = PROTOCOL_VERSION
    node_id: str
    site: str
    # Shown once; the control plane stores only its hash.
    credential: str
    # Ed25519 public key (raw, base64) that signs desired states; the node pins it.
    signing_public_key: str
    signing_key_fingerprint: str
    sync_interval_s: float


class Refusal(WireModel):
    """Something the node refused to apply, reported on its next sync."""

    generation: int = Field(ge=0, le=INT64_MAX)
    reason: str = Field(max_length=500)
    at: dt.datetime


class ModelStats(WireModel):
    """Cumulative serving counters of one model version since this node loaded it.

    The control plane turns successive reports into windowed deltas (a drop
    in ``requests`` means the process restarted and counting began again);
    rollout health gates compare them between versions.
    """

    # Stored in bigint columns (orchestrator.models.HealthSample).
    requests: int = Field(default=0, ge=0, le=INT64_MAX)
    errors: int = Field(default=0, ge=0, le=INT64_MAX)
    # Upper bounds in seconds; ``latency_counts`` has one more slot, for everything above the last.
    latency_bounds: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=list, max_length=64)
    latency_counts: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] = Field(default_factory=list, max_length=65)
    latency_sum_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class ModelStatus(WireModel):
    """What actually serves one model on a node (reported in every sync)."""

    name: str = Field(max_length=100)
    version: str = Field(max_length=50)
    sha256: str = Field(default="", max_length=64)
    variant: str = Field(default="original", max_length=20)
    # The execution provider that actually runs it: a silent fallback to CPU shows here.
    provider: str = Field(default="", max_length=60)
    state: Literal["downloading", "loading", "serving", "failed", "refused"] = "loading"
    error: str = Field(default="", max_length=1000)
    # Where the graph runs: "full" on the accelerator, "partial" (cpu_nodes of graph_nodes on CPU),
    # "cpu_fallback" (an accelerator was on offer; why not is in ``fallback``), "cpu" (nothing else to use);
    # "" from older runtimes and for a version that does not serve.
    placement: Literal["", "full", "partial", "cpu_fallback", "cpu"] = ""
    cpu_nodes: int = Field(default=0, ge=0, le=10_000_000)
    graph_nodes: int = Field(default=0, ge=0, le=10_000_000)
    # Each provider given up before the one that serves, with why ("OpenVINOExecutionProvider: ...").
    fallback: str = Field(default="", max_length=1000)
    # The version that keeps serving while this one failed, if any.
    serving_version: str | None = Field(default=None, max_length=50)
    # Serving counters of ``version`` while it serves (absent from older runtimes).
    stats: ModelStats | None = None

    def placement_text(self) -> str:
        """``full``, ``partial (N of M nodes on CPU)``, ``cpu fallback``, ``cpu``; "" when not known."""
        if self.placement == "partial":
            return f"partial ({self.cpu_nodes} of {self.graph_nodes} nodes on CPU)"
        return self.placement.replace("_", " ")


class DatasetEntry(BaseModel):
    """One dataset of a node's datasets report, as far as the control plane's catalog columns need it.

    The rest of the schema is checked by ``queries`` (an entry it
    cannot read is skipped there); unknown keys are kept for later runtimes.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=NO_NUL)
    row_count: int = Field(default=0, ge=0, le=INT64_MAX)


class DatasetsReport(BaseModel):
    """``actual.detail["datasets"]``: what a node's data engine reports (``edge_runtime.datasets``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    datasets: list[DatasetEntry] = Field(default_factory=list, max_length=1000)
    # Datasets the node could not read: their names and why.
    errors: dict[Annotated[str, Field(min_length=1, max_length=64, pattern=NO_NUL)],
                 Annotated[str, Field(pattern=NO_NUL)]] = Field(default_factory=dict, max_length=1000)


class ActualDetail(BaseModel):
    """The keys of ``ActualState.detail`` that the control plane reads, typed; the others stay free-form."""

    model_config = ConfigDict(extra="allow", frozen=True)

    datasets: DatasetsReport | None = None


class ActualState(WireModel):
    # The node's applied generation is stored in an integer column (sites.models.Node).
    applied_generation: int = Field(default=0, ge=0, le=INT32_MAX)
    # The epoch of the applied generation ("" before the node applied any epoch's state).
    applied_epoch: str = Field(default="", max_length=64)
    # The desired state the node refuses now, repeated on every sync until it
    # applies one: a node that refuses is never silent about it.
    refusing: Refusal | None = None
    models: list[ModelStatus] = Field(default_factory=list, max_length=500)
    # Free-form per-feature state (models loaded, datasets, ...). Later
    # features add typed fields; this keeps version 1 forwards compatible.
    detail: dict[str, Any] = Field(default_factory=dict)

    @field_validator("detail")
    @classmethod
    def _typed_detail(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked, not converted: the report is stored as the node sent it.
        ActualDetail.model_validate(value)
        return value


class Health(WireModel):
    status: Literal["ok", "degraded", "failing"] = "ok"
    uptime_s: float = Field(default=0.0, ge=0)
    # Syncs that failed since the last one that succeeded (the link's health).
    failed_syncs: int = Field(default=0, ge=0, le=INT64_MAX)
    message: str = Field(default="", max_length=500)


class SyncRequest(WireModel):
    protocol: Literal[1] = PROTOCOL_VERSION
    runtime_version: str = Field(default="", max_length=50)
    hardware: Hardware | None = None
    actual: ActualState = Field(default_factory=ActualState)
    health: Health = Field(default_factory=Health)
    refusals: list[Refusal] = Field(default_factory=list, max_length=100)
    # The node's audit log: its signed checkpoint and the entries the control plane lacks (absent before the
    # node has an identity key).
    audit: AuditUpload | None = None
    # The node's identity key, on every sync: how a node enrolled before identity keys registers one.
    identity_key: IdentityKey | None = None
    # The sha256 (hex) of this report (:func:`report_digest`). With ``brief`` the request carries only the
    # digest, the applied generation and epoch, and health: "the report you hold for me is unchanged".
    digest: str = Field(default="", pattern=DIGEST_PATTERN)
    brief: bool = False

    @model_validator(mode="after")
    def _brief_carries_no_report(self) -> SyncRequest:
        if not self.brief:
            return self
        if not self.digest:
            raise ValueError("a brief sync names the digest of the report it repeats")
        actual = self.actual
        carried = [name for name, present in (
            ("hardware", self.hardware is not None), ("refusals", bool(self.refusals)),
            ("audit", self.audit is not None), ("identity_key", self.identity_key is not None),
            ("runtime_version", bool(self.runtime_version)), ("actual.refusing", actual.refusing is not None),
            ("actual.models", bool(actual.models)), ("actual.detail", bool(actual.detail))) if present]
        if carried:
            raise ValueError(f"a brief sync carries no report, only its digest; this one carries {', '.join(carried)}")
        return self


# Fields of a sync request that are not part of the report its digest covers: health and the audit upload go
# with every sync, the rest describe the request itself.
_NOT_DIGESTED = frozenset({"health", "audit", "digest", "brief"})


def report_digest(request: SyncRequest) -> str:
    """The sha256 (hex) of what ``request`` reports: everything but health and the audit upload, canonical JSON.

    The node and the control plane compute it alike; the control plane answers a sync whose digest (and applied
    generation) it holds without reading or writing its database (``sites.quiet``).
    """
    data = request.model_dump(mode="json", exclude=set(_NOT_DIGESTED))
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


"""Versioned wire models of the agent protocol (``/agent/v1/``).

The node always dials out. Both sides import these models: the control plane
to validate what nodes send and to shape what it answers, the node to validate
what the control plane sends.

Compatibility (protocol version 1):

* What the control plane **accepts** is strict: an unknown field in what a
  node sends (:class:`WireModel`, ``extra="forbid"``) is a 400 naming the
  field, so a typo or a forged field is never silently ignored. A node may
  therefore send a new field only to a control plane that knows it: upgrade
  the control plane before the nodes.
* What a node **receives** (:class:`Received`: enroll and sync answers, the
  desired state and its models, stream messages) ignores fields it does not
  know, so a newer control plane can add fields without breaking nodes not yet
  upgraded. A signed document is verified over its exact bytes, unknown
  fields included, before it is parsed.
* A field may be added to version 1 when a node that ignores it still does the
  right thing (it is informational, or it has a safe default). Anything that
  restricts what a node may do is not such a field: policy bundles and query
  specs are parsed strictly by the node, which refuses (and reports) one it
  does not fully understand rather than enforce less than was asked. Renaming
  or removing a field, changing its meaning, or adding a restriction an old
  node would ignore needs protocol version 2 (a new ``/agent/v2/``).

Endpoints (all JSON, all under ``/agent/v1/``):

``POST enroll``
    :class:`EnrollRequest` -> :class:`EnrollResponse`. Trades a one-time site
    token for a per-node credential.
``POST nodes/<node_id>/sync``
    :class:`SyncRequest` -> :class:`SyncResponse`. Reports actual state and
    health; carries the signed desired state only when the generation moved.
``GET nodes/<node_id>/desired-state``
    -> :class:`SignedDesiredState`. The current signed desired state.
``GET nodes/<node_id>/artifacts/<sha256>``
    The bytes of a model artifact in this node's desired state (HTTP Range
    supported, so an interrupted download resumes).
``POST nodes/<node_id>/queries/<query_id>/result``
    ``edge_runtime.data.wire.QueryResult`` -> ``{"status": ...}``. A node's
    answer to a federated query it received in a :class:`SyncResponse`
    (``queries``). Idempotent: an answer posted again is stored once, and a
    query that is closed or unknown answers 404, so the node stops retrying.
``WS nodes/<node_id>/stream``
    The control plane pushes :class:`Nudge` messages ("sync now"). The node
    sends :class:`TelemetryFrame` messages; the control plane answers each
    with a :class:`TelemetryAck` once its items are committed, carrying the
    highest sequence number it holds for the node (which may be beyond the
    frame: items it already had are skipped). A frame it cannot accept is
    answered with :class:`StreamError` and the stream is closed.

Errors are ``{"error": "...", "field": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOL_VERSION: Final = 1
API_PREFIX = "/agent/v1"

# Largest body an agent endpoint accepts. Sync and enroll bodies are small
# (hardware profile, actual state); anything larger is refused with 413.
MAX_AGENT_BODY_BYTES = 256 * 1024
# JSON a node sends is nested at most this deep (a dataset's column in a sync body sits 8 deep).
MAX_JSON_DEPTH = 32

# What a node reports lands in PostgreSQL columns: an integer is bounded by the
# column it is written to (bigint, integer), so that a hostile value is a 400
# naming the field rather than an overflow in the database.
INT64_MAX: Final = 2**63 - 1
INT32_MAX: Final = 2**31 - 1
# PostgreSQL text cannot hold NUL: strings that are stored refuse it.
NO_NUL: Final = r"^[^\x00]*$"
# Times a node reports: any plausible node clock, and far enough from datetime's
# limits that no UTC offset can carry them out of range.
TIME_MIN: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
TIME_MAX: Final = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)
# The largest figure (a latency, megabytes, a load) a node reports: sums of many stay finite.
MAX_FIGURE: Final = 1e15

NodeRole = Literal["device", "gateway", "server"]


class WireModel(BaseModel):
    """What the control plane accepts from a node: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Received(BaseModel):
    """What a node receives from the control plane: unknown fields are ignored (see the module docstring)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


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


class EnrollRequest(WireModel):
    protocol: Literal[1] = PROTOCOL_VERSION
    token: str = Field(min_length=8, max_length=200)
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    role: NodeRole = "device"
    runtime_version: str = Field(default="", max_length=50)
    hardware: Hardware = Field(default_factory=Hardware)


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
    # The version that keeps serving while this one failed, if any.
    serving_version: str | None = Field(default=None, max_length=50)
    # Serving counters of ``version`` while it serves (absent from older runtimes).
    stats: ModelStats | None = None


class DatasetEntry(BaseModel):
    """One dataset of a node's datasets report, as far as the control plane's catalog columns need it.

    The rest of the schema is checked by ``policies.queries`` (an entry it
    cannot read is skipped there); unknown keys are kept for later runtimes.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=NO_NUL)
    row_count: int = Field(default=0, ge=0, le=INT64_MAX)


class DatasetsReport(BaseModel):
    """``actual.detail["datasets"]``: what a node's data engine reports (``edge_runtime.queries``)."""

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


SHA256_PATTERN = r"^[0-9a-f]{64}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"


class DesiredModel(Received):
    """One model version a node should serve, and how."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: str = Field(min_length=1, max_length=50)
    # The artifact this node gets (the original or a hardware variant).
    variant: str = Field(default="original", max_length=20)
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=1)
    # Ed25519 over signing.artifact_message(sha256), base64: checked before
    # onnxruntime sees a byte of the file.
    signature: str
    classification: int = Field(default=0, ge=0, le=3)
    # Execution providers in order of preference; empty: the node's own order.
    providers: list[str] = Field(default_factory=list, max_length=16)
    # Providers the model cannot run without; a node lacking one refuses it.
    required_providers: list[str] = Field(default_factory=list, max_length=16)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000)


class DesiredState(Received):
    """What one node should be doing. Signed by the control plane.

    Generations count up within an **epoch**. The control plane starts a new
    epoch when its signing key changes, when it runs on another database, and
    when an operator says so after restoring a backup (``manage.py
    epoch_start``); a node orders epochs by ``epoch_started_at`` and accepts a
    later epoch's state whatever its generation, so a control plane whose
    generations went back can always reach its nodes again. Both fields are
    inside the signed payload: an epoch change is as signed as the state.
    """

    node_id: str
    generation: int = Field(ge=1)
    # The epoch's id ("" from a control plane older than epochs) and when it started.
    epoch: str = Field(default="", max_length=64)
    epoch_started_at: dt.datetime | None = None
    issued_at: dt.datetime
    sync_interval_s: float = Field(gt=0)
    site: str
    labels: dict[str, str] = Field(default_factory=dict)
    models: list[DesiredModel] = Field(default_factory=list)
    policy: dict[str, Any] = Field(default_factory=dict)


class KeyEndorsement(Received):
    """A new signing key, signed by the key before it: how a node learns of a key rotation.

    ``signature`` is the previous key's Ed25519 signature over
    :func:`edge_runtime.signing.endorsement_message` of the other fields. A
    node that pinned ``previous_fingerprint`` verifies it and pins the new key.
    """

    public_key: str
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    previous_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    issued_at: dt.datetime
    signature: str


class SignedDesiredState(Received):
    # The desired state exactly as signed: canonical JSON of DesiredState.
    payload: str
    # Ed25519 signature over the payload's UTF-8 bytes, base64.
    signature: str
    key_fingerprint: str
    # Every key rotation of this control plane, oldest first: the path from
    # whatever key a node pinned to the key that signed this document.
    key_chain: list[KeyEndorsement] = Field(default_factory=list, max_length=64)


# A query's id: the control plane's uuid for the query at one site.
QUERY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Largest query answer the control plane accepts (a site's policy caps its output far lower by default).
MAX_QUERY_RESULT_BYTES = 16 * 1024 * 1024


class QueryRequest(Received):
    """A federated query waiting for this node (see ``edge_runtime.data``)."""

    query_id: str = Field(pattern=QUERY_ID_PATTERN)
    # The query document (edge_runtime.data.spec.QuerySpec), validated by the node.
    spec: dict[str, Any]
    # After this the node does not start (or finish) the query; its answer would be too late.
    deadline: dt.datetime | None = None


class SyncResponse(Received):
    protocol: Literal[1] = PROTOCOL_VERSION
    generation: int
    # Only present when the node's applied generation differs from ``generation``.
    desired: SignedDesiredState | None = None
    sync_interval_s: float
    # Queries waiting for this node's answer. Offered on every sync until the
    # answer arrives; the node runs each query id at most once.
    queries: list[QueryRequest] = Field(default_factory=list, max_length=100)


class Nudge(Received):
    type: Literal["sync"] = "sync"
    generation: int = 0


class ErrorBody(WireModel):
    error: str
    field: str | None = None


# -- telemetry over the stream ------------------------------------------------

# A frame carries at most this many items; a backlog goes out in several.
MAX_TELEMETRY_ITEMS = 200
# Largest telemetry frame the control plane accepts (the node aims for far less).
MAX_TELEMETRY_FRAME_BYTES = 1024 * 1024


class ModelTelemetry(WireModel):
    """One model version's figures over one telemetry interval (deltas, not totals).

    Bounded so that the history's sums stay inside their columns: counters
    per interval fit an integer (summed into bigint), figures are finite.
    """

    model: str = Field(max_length=100, pattern=NO_NUL)
    version: str = Field(max_length=50, pattern=NO_NUL)
    requests: int = Field(default=0, ge=0, le=INT32_MAX)
    errors: int = Field(default=0, ge=0, le=INT32_MAX)
    # From the latency histogram's buckets in this interval; None when nothing was served.
    latency_p50_ms: float | None = Field(default=None, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    latency_p95_ms: float | None = Field(default=None, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    batches: int = Field(default=0, ge=0, le=INT32_MAX)
    batch_size_mean: float | None = Field(default=None, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    # Requests waiting for the model's next batch at the end of the interval.
    queue_depth: int = Field(default=0, ge=0, le=INT32_MAX)


class NodeResources(WireModel):
    """The node's machine at the end of one telemetry interval."""

    # All cores together, 0-100.
    cpu_percent: float = Field(default=0.0, ge=0, le=100, allow_inf_nan=False)
    load1: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    memory_used_mb: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    memory_total_mb: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    # The file system that holds the node's state directory.
    disk_used_mb: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    disk_total_mb: float = Field(default=0.0, ge=0, le=MAX_FIGURE, allow_inf_nan=False)
    # Requests waiting in every model's batcher.
    inference_queue_depth: int = Field(default=0, ge=0, le=INT32_MAX)
    # Telemetry points waiting in the node's store-and-forward queue.
    telemetry_backlog: int = Field(default=0, ge=0, le=INT32_MAX)


class TelemetryPoint(WireModel):
    kind: Literal["point"] = "point"
    # Assigned by the node, one higher for every point it ever produced.
    seq: int = Field(ge=1, le=INT64_MAX)
    at: AwareDatetime = Field(ge=TIME_MIN, le=TIME_MAX)
    interval_s: float = Field(gt=0, le=3600, allow_inf_nan=False)
    resources: NodeResources
    models: list[ModelTelemetry] = Field(default_factory=list, max_length=200)

    @property
    def last_seq(self) -> int:
        return self.seq


class TelemetryGap(WireModel):
    """Points the node produced but could not keep (its disk budget ran out): said, not silently dropped."""

    kind: Literal["gap"] = "gap"
    # The first and last sequence numbers lost; every number in between was lost too.
    seq: int = Field(ge=1, le=INT64_MAX)
    last_seq: int = Field(ge=1, le=INT64_MAX)
    count: int = Field(ge=1, le=INT64_MAX)
    # When the first and the last lost point were taken.
    start: AwareDatetime = Field(ge=TIME_MIN, le=TIME_MAX)
    end: AwareDatetime = Field(ge=TIME_MIN, le=TIME_MAX)
    reason: Literal["disk_budget"] = "disk_budget"

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryGap:
        if self.last_seq < self.seq:
            raise ValueError(f"gap ends at seq {self.last_seq}, before it starts at {self.seq}")
        if self.count != self.last_seq - self.seq + 1:
            raise ValueError(f"gap {self.seq}-{self.last_seq} holds {self.last_seq - self.seq + 1} points, "
                             f"not {self.count}")
        return self


TelemetryItem = Annotated[TelemetryPoint | TelemetryGap, Field(discriminator="kind")]


class TelemetryFrame(WireModel):
    """Node to control plane: items in increasing sequence order."""

    type: Literal["telemetry"] = "telemetry"
    items: list[TelemetryItem] = Field(min_length=1, max_length=MAX_TELEMETRY_ITEMS)

    @model_validator(mode="after")
    def _in_order(self) -> TelemetryFrame:
        last = 0
        for item in self.items:
            if item.seq <= last:
                raise ValueError(f"items must be in increasing seq order: {item.seq} follows {last}")
            last = item.last_seq
        return self


class TelemetryAck(Received):
    """Control plane to node: every item up to ``seq`` is committed; the node may forget them."""

    type: Literal["telemetry.ack"] = "telemetry.ack"
    seq: int = Field(ge=0)


class StreamError(Received):
    """Control plane to node: the last frame was refused, and why; the stream closes after it."""

    type: Literal["error"] = "error"
    error: str = Field(max_length=1000)


# What the control plane sends down the stream.
StreamMessage = Annotated[Nudge | TelemetryAck | StreamError, Field(discriminator="type")]

"""What the control plane answers a node's sync: the signed desired state with its key chain, federated
queries and nudges (lenient: a field the node does not know is ignored)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import Field

from edge_runtime.protocol.audit import AuditAck
from edge_runtime.protocol.base import PROTOCOL_VERSION, Received, WireModel

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
    # Providers the version must not run on (never CPU), and options per provider (OpenVINO's
    # device_type and precision, CUDA's device_id, TensorRT's settings), as strings.
    forbidden_providers: list[str] = Field(default_factory=list, max_length=16)
    provider_options: dict[str, dict[str, str]] = Field(default_factory=dict, max_length=16)
    # How far an accelerator's outputs may be from CPU's on the probe inputs; past it, CPU serves.
    rtol: float = Field(default=1e-4, ge=0, le=1)
    atol: float = Field(default=1e-5, ge=0, le=1e6)
    # The version's inputs are never NaN or infinite, so the probes send none.
    finite_inputs: bool = False


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
    # What the control plane made of the node's audit upload (absent when the sync carried none).
    audit: AuditAck | None = None
    # The digest of the node's report that the control plane holds (``SyncRequest.digest``): while the node's
    # report has this digest it may send brief syncs. Absent from control planes that take none.
    report_digest: str | None = None
    # The answer to a brief sync whose digest (or applied generation) the control plane does not hold: nothing
    # was recorded, and the node syncs again at once with its whole report.
    report_wanted: bool = False


# The largest nudge a control plane sends: a node's stream takes messages of at most 64 KiB
# (``edge_runtime.agent.runner``); a desired state too large for one goes by the next sync instead.
MAX_NUDGE_BYTES = 60 * 1024
# The longest a control plane asks a node to spread the report of a state it applied from a nudge.
MAX_REPORT_WITHIN_S = 3600.0


class Nudge(Received):
    """"Something changed for you", pushed on the node's stream.

    With ``desired`` it carries the node's new signed desired state, which the node verifies and applies as it
    would from a sync's answer, and then reports at a random moment within ``report_within_s`` (the control
    plane spreads the reports of a change to many nodes over time it sized for them). Without, the node syncs
    at once (a query waits for it, or the state was too large to push).
    """

    type: Literal["sync"] = "sync"
    generation: int = 0
    desired: SignedDesiredState | None = None
    report_within_s: float = Field(default=0.0, ge=0, le=MAX_REPORT_WITHIN_S)


class ErrorBody(WireModel):
    error: str
    field: str | None = None


# -- telemetry over the stream ------------------------------------------------

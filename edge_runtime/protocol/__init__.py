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
    A node whose report is unchanged since the control plane last said it
    holds it (``SyncResponse.report_digest``) may send a brief sync: the
    digest (:func:`report_digest`), its applied generation and health. It is
    answered without the control plane's database, or with
    ``report_wanted`` when the control plane does not hold that report.
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
    The control plane pushes :class:`Nudge` messages ("sync now", or the
    node's new signed desired state with the time to report it in). The node
    sends :class:`TelemetryFrame` messages; the control plane answers each
    with a :class:`TelemetryAck` once its items are committed, carrying the
    highest sequence number it holds for the node (which may be beyond the
    frame: items it already had are skipped). A frame it cannot accept is
    answered with :class:`StreamError` and the stream is closed.

Errors are ``{"error": "...", "field": "..."}`` with a 4xx status.

The models live in :mod:`.base` (the strictness classes and bounds),
:mod:`.node` (enroll and sync bodies), :mod:`.desired` (what the control plane
answers), :mod:`.audit` (a node's audit log upload and its cosigned answer) and
:mod:`.stream` (the websocket's messages); every name is
importable from ``edge_runtime.protocol`` itself, as nodes of every version
and the control plane import them.
"""

from __future__ import annotations

from edge_runtime.protocol.audit import (
    AUDIT_BATCH_BYTES,
    AUDIT_BATCH_MAX,
    MAX_ENTRY_DETAIL,
    AuditAck,
    AuditUpload,
    LogEntry,
)
from edge_runtime.protocol.base import (
    API_PREFIX,
    INT32_MAX,
    INT64_MAX,
    MAX_AGENT_BODY_BYTES,
    MAX_FIGURE,
    MAX_JSON_DEPTH,
    NO_NUL,
    PROTOCOL_VERSION,
    SYNC_PATH_HEADER,
    TIME_MAX,
    TIME_MIN,
    NodeRole,
    Received,
    WireModel,
)
from edge_runtime.protocol.desired import (
    MAX_NUDGE_BYTES,
    MAX_QUERY_RESULT_BYTES,
    MAX_REPORT_WITHIN_S,
    MODEL_NAME_PATTERN,
    QUERY_ID_PATTERN,
    SHA256_PATTERN,
    DesiredModel,
    DesiredState,
    ErrorBody,
    KeyEndorsement,
    Nudge,
    QueryRequest,
    SignedDesiredState,
    SyncResponse,
)
from edge_runtime.protocol.node import (
    ActualDetail,
    ActualState,
    DatasetEntry,
    DatasetsReport,
    EnrollRequest,
    EnrollResponse,
    Hardware,
    Health,
    ModelStats,
    ModelStatus,
    Refusal,
    SyncRequest,
    report_digest,
)
from edge_runtime.protocol.stream import (
    MAX_TELEMETRY_FRAME_BYTES,
    MAX_TELEMETRY_ITEMS,
    ModelTelemetry,
    NodeResources,
    StreamError,
    StreamMessage,
    TelemetryAck,
    TelemetryFrame,
    TelemetryGap,
    TelemetryItem,
    TelemetryPoint,
)

__all__ = [
    "API_PREFIX",
    "AUDIT_BATCH_BYTES",
    "AUDIT_BATCH_MAX",
    "AuditAck",
    "AuditUpload",
    "ActualDetail",
    "ActualState",
    "DatasetEntry",
    "DatasetsReport",
    "DesiredModel",
    "DesiredState",
    "EnrollRequest",
    "EnrollResponse",
    "ErrorBody",
    "Hardware",
    "Health",
    "INT32_MAX",
    "INT64_MAX",
    "KeyEndorsement",
    "LogEntry",
    "MAX_ENTRY_DETAIL",
    "MAX_AGENT_BODY_BYTES",
    "MAX_FIGURE",
    "MAX_NUDGE_BYTES",
    "MAX_REPORT_WITHIN_S",
    "MAX_JSON_DEPTH",
    "MAX_QUERY_RESULT_BYTES",
    "MAX_TELEMETRY_FRAME_BYTES",
    "MAX_TELEMETRY_ITEMS",
    "MODEL_NAME_PATTERN",
    "ModelStats",
    "ModelStatus",
    "ModelTelemetry",
    "NO_NUL",
    "NodeResources",
    "NodeRole",
    "Nudge",
    "PROTOCOL_VERSION",
    "SYNC_PATH_HEADER",
    "QUERY_ID_PATTERN",
    "QueryRequest",
    "Received",
    "Refusal",
    "SHA256_PATTERN",
    "SignedDesiredState",
    "StreamError",
    "StreamMessage",
    "SyncRequest",
    "report_digest",
    "SyncResponse",
    "TIME_MAX",
    "TIME_MIN",
    "TelemetryAck",
    "TelemetryFrame",
    "TelemetryGap",
    "TelemetryItem",
    "TelemetryPoint",
    "WireModel",
]

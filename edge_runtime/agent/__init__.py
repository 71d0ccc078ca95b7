"""The agent: keeps this node in step with the control plane.

:class:`Agent` is assembled with its plug-ins by :mod:`edge_runtime.node`;
its parts: :mod:`.desired` (what it accepts), :mod:`.sync`, :mod:`.runner`
(the stream and the loops), :mod:`.plugins`, :mod:`.backoff`.

Two tasks run side by side:

* the **sync loop** POSTs a :class:`~edge_runtime.protocol.SyncRequest`
  (hardware, actual state, health, refusals) every sync interval (±10 %
  jitter, so a fleet restarted together does not sync in lockstep) and
  applies the signed desired state the answer carries when the generation
  moved;
* the **stream** keeps a websocket open to the control plane, which pushes a
  nudge the moment this node's desired state changes; each nudge wakes the
  sync loop at once. The stream is an accelerator only: when it cannot
  connect, polling carries on unchanged;
* with :mod:`edge_runtime.telemetry`, a **collect loop** takes a telemetry
  point every few seconds into the node's store-and-forward queue, whether
  or not the control plane is reachable, and the stream session sends what
  waits there (acknowledged points leave the queue).

What the node accepts: a desired state signed by the key pinned at
enrollment (or by a key that key endorsed when the control plane rotated it,
which the node then pins), addressed to this node, and not older than what it
already applied: a later epoch, or the same epoch at the same or a higher
generation (see :class:`~edge_runtime.protocol.DesiredState`). The state on
disk is held to the same floor at start-up. Anything else is refused: the
node keeps serving what it has, logs the refusal, audits it once per refused
document, and reports it as ``actual.refusing`` (and in its health) on every
sync until it applies a state again.

Failures (no connection, timeout, 5xx) are retried with exponential back-off
and full jitter: ``uniform(0, min(cap, 1 s * 2**attempt))`` with the cap at
``min(60 s, 6 * sync interval)``. A refused credential (401/403/404: the node
was revoked or is unknown) is logged as such and retried at the cap, so a
revoked node neither crash-loops nor hammers the control plane.

The last verified desired state lives on disk (:mod:`edge_runtime.state`),
so a node that starts while the control plane is out of reach carries on
with it.
"""


from __future__ import annotations

from edge_runtime.agent.backoff import (
    BACKOFF_BASE_S,
    BACKOFF_FACTOR,
    BACKOFF_INTERVALS,
    BACKOFF_MAX_S,
    INTERVAL_JITTER,
    backoff_cap,
    backoff_ceiling,
    backoff_delay,
    jittered_interval,
)
from edge_runtime.agent.base import stream_url
from edge_runtime.agent.desired import MAX_PENDING_REFUSALS, claimed_generation, document_digest
from edge_runtime.agent.plugins import AnswersQueries, PinsKey, Reconciler, ReportsModels
from edge_runtime.agent.runner import STREAM_MAX_MESSAGE_BYTES, STREAM_OPEN_TIMEOUT_S, Agent
from edge_runtime.agent.sync import CREDENTIAL_REFUSED, HTTP_TIMEOUT, CredentialRefused, SyncFailed

__all__ = [
    "BACKOFF_BASE_S", "BACKOFF_FACTOR", "BACKOFF_INTERVALS", "BACKOFF_MAX_S", "CREDENTIAL_REFUSED", "HTTP_TIMEOUT",
    "INTERVAL_JITTER", "MAX_PENDING_REFUSALS", "STREAM_MAX_MESSAGE_BYTES", "STREAM_OPEN_TIMEOUT_S", "Agent",
    "AnswersQueries", "CredentialRefused", "PinsKey", "Reconciler", "ReportsModels", "SyncFailed", "backoff_cap",
    "backoff_ceiling", "backoff_delay", "claimed_generation", "document_digest", "jittered_interval", "stream_url",
]

"""The members of a bundle (``edge_runtime.airgap``): a sync's answer and report, carried as files.

A bundle **in** holds, for each node of the site, ``nodes/<node_id>.json``: a
:class:`NodeBundle`, the answer the node would have had from a sync
(its signed desired state always, the queries waiting for it, the control
plane's audit answer) and the :class:`BundleReceipt` of the last bundle the
node sent out; then ``artifacts/<sha256>``, the model files the site has not
confirmed holding.

A bundle **out**, written by one node, holds ``report.json`` (the
:class:`~edge_runtime.protocol.SyncRequest` it would have sent, without its
audit upload), ``audit/<n>.json`` (the audit log's uploads, in order),
``telemetry/<n>.json`` (frames), ``answers/<n>.json`` (query answers) and
``inventory.json``
(:class:`NodeInventory`: what the node holds).
"""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from edge_runtime.protocol.base import INT64_MAX, Received, WireModel
from edge_runtime.protocol.desired import QUERY_ID_PATTERN, SHA256_PATTERN, SyncResponse

# The most query answers one receipt acknowledges (a site answers far fewer between two bundles).
MAX_RECEIPT_ANSWERS = 10_000


class BundleReceipt(Received):
    """What the control plane took from one node's bundle out: the node may forget all of it."""

    # The sequence of the node's bundle out that this receipt answers.
    sequence: int = Field(ge=1, le=INT64_MAX)
    ingested_at: dt.datetime
    # Every telemetry item up to this sequence number is stored.
    telemetry_seq: int = Field(default=0, ge=0, le=INT64_MAX)
    # The queries whose answers are stored.
    answers: list[str] = Field(default_factory=list, max_length=MAX_RECEIPT_ANSWERS)


class NodeBundle(Received):
    """``nodes/<node_id>.json`` of a bundle in: what one node takes from it."""

    node_id: str = Field(min_length=1, max_length=64)
    # The answer a sync would have given, its desired state always present.
    answer: SyncResponse
    receipt: BundleReceipt | None = None


class HeldArtifact(WireModel):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0, le=INT64_MAX)


class NodeInventory(WireModel):
    """``inventory.json`` of a bundle out: what the node holds, so the next bundle in carries only what it lacks."""

    artifacts: list[HeldArtifact] = Field(default_factory=list, max_length=10_000)
    # The last bundle in the node imported (0: none yet).
    bundle_in_sequence: int = Field(default=0, ge=0, le=INT64_MAX)
    # Queries it holds an answer for but the control plane has not acknowledged.
    answers: list[str] = Field(default_factory=list, max_length=MAX_RECEIPT_ANSWERS)


__all__ = ["MAX_RECEIPT_ANSWERS", "QUERY_ID_PATTERN", "BundleReceipt", "HeldArtifact", "NodeBundle", "NodeInventory"]

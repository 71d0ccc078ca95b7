"""The messages of the always-open stream: telemetry frames from the node, acks, nudges and errors from the
control plane."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, model_validator

from edge_runtime.protocol.base import (
    INT32_MAX,
    INT64_MAX,
    MAX_FIGURE,
    NO_NUL,
    TIME_MAX,
    TIME_MIN,
    Received,
    WireModel,
)
from edge_runtime.protocol.desired import Nudge

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

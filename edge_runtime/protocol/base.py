"""What every wire model of the agent protocol shares: the two strictness classes and the bounds on what a node
reports (so that a hostile value is a 400 naming the field, never an overflow in the database)."""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

PROTOCOL_VERSION: Final = 1
API_PREFIX = "/agent/v1"
# The header naming the path a sync's answer took: quiet (from Redis), full, or report-wanted.
SYNC_PATH_HEADER = "Edgewise-Sync"

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


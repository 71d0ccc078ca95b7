"""Back-off and jitter of the agent's retries: full jitter under an exponential ceiling."""

from __future__ import annotations

import random

BACKOFF_BASE_S = 1.0
BACKOFF_FACTOR = 2.0
BACKOFF_MAX_S = 60.0
# The cap is also bounded by the sync interval, so a fleet on a short interval
# finds its control plane again soon after it comes back.
BACKOFF_INTERVALS = 6
INTERVAL_JITTER = 0.1


def backoff_ceiling(attempt: int, *, base: float = BACKOFF_BASE_S, factor: float = BACKOFF_FACTOR,
                    cap: float = BACKOFF_MAX_S) -> float:
    """The largest delay before retry number ``attempt`` (0 for the first retry)."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    # min() on the exponent keeps factor**attempt finite however long the outage.
    return float(min(cap, base * factor ** min(attempt, 64)))


def backoff_delay(attempt: int, rng: random.Random, *, base: float = BACKOFF_BASE_S,
                  factor: float = BACKOFF_FACTOR, cap: float = BACKOFF_MAX_S) -> float:
    """Exponential back-off with full jitter: uniform between 0 and the attempt's ceiling."""
    return rng.uniform(0.0, backoff_ceiling(attempt, base=base, factor=factor, cap=cap))


def backoff_cap(sync_interval_s: float) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_INTERVALS * sync_interval_s)


def jittered_interval(interval: float, rng: random.Random, *, jitter: float = INTERVAL_JITTER) -> float:
    return interval * rng.uniform(1.0 - jitter, 1.0 + jitter)

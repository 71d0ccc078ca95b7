"""Settings of node timing (sync interval, liveness thresholds, quiet syncs) and telemetry retention.

Read from the environment by ``orchestrator.settings``, which lists every variable; kept here, together, because
each is checked against the others.
"""

from __future__ import annotations

from orchestrator.env import ConfigError, env_bool, env_float

__all__ = ["HEARTBEAT_FLUSH_S", "NODE_OFFLINE_AFTER_S", "NODE_STALE_AFTER_S", "NUDGE_REPORTS_PER_S", "QUIET_SYNC",
           "QUIET_SYNC_TTL_S", "SYNC_INTERVAL_S", "TELEMETRY_COARSE_RETENTION_S", "TELEMETRY_FINE_RETENTION_S"]

SYNC_INTERVAL_S = env_float("EDGEWISE_SYNC_INTERVAL", 10.0)
NODE_STALE_AFTER_S = env_float("EDGEWISE_NODE_STALE_AFTER", 3 * SYNC_INTERVAL_S)
NODE_OFFLINE_AFTER_S = env_float("EDGEWISE_NODE_OFFLINE_AFTER", 12 * SYNC_INTERVAL_S)
if NODE_OFFLINE_AFTER_S <= NODE_STALE_AFTER_S:
    raise ConfigError("EDGEWISE_NODE_OFFLINE_AFTER must be longer than EDGEWISE_NODE_STALE_AFTER")

# Quiet syncs (orchestrator.quiet): a sync that reports nothing new is answered from Redis; every node still
# takes the whole path at least every QUIET_SYNC_TTL_S. Heartbeats reach PostgreSQL every HEARTBEAT_FLUSH_S.
QUIET_SYNC = env_bool("EDGEWISE_QUIET_SYNC", True)
QUIET_SYNC_TTL_S = env_float("EDGEWISE_QUIET_SYNC_TTL", 3600.0)
HEARTBEAT_FLUSH_S = env_float("EDGEWISE_HEARTBEAT_FLUSH_INTERVAL", 1.0)
if QUIET_SYNC_TTL_S < SYNC_INTERVAL_S:
    raise ConfigError("EDGEWISE_QUIET_SYNC_TTL must be at least EDGEWISE_SYNC_INTERVAL")
if HEARTBEAT_FLUSH_S >= NODE_STALE_AFTER_S:
    raise ConfigError("EDGEWISE_HEARTBEAT_FLUSH_INTERVAL must be shorter than EDGEWISE_NODE_STALE_AFTER, or "
                      "quiet nodes would look stale between flushes")

# A desired state pushed to many nodes at once is reported back by each of them (a whole sync): the nudges
# spread those reports over len(nodes) / NUDGE_REPORTS_PER_S seconds (at most one interval), the rate of whole
# syncs the control plane is sized to take on top of its steady load.
NUDGE_REPORTS_PER_S = env_float("EDGEWISE_NUDGE_REPORTS_PER_S", 100.0)
if NUDGE_REPORTS_PER_S <= 0:
    raise ConfigError("EDGEWISE_NUDGE_REPORTS_PER_S must be positive")

TELEMETRY_FINE_RETENTION_S = env_float("EDGEWISE_TELEMETRY_FINE_RETENTION", 6 * 3600.0)
TELEMETRY_COARSE_RETENTION_S = env_float("EDGEWISE_TELEMETRY_COARSE_RETENTION", 30 * 86400.0)
if not 0 < TELEMETRY_FINE_RETENTION_S <= TELEMETRY_COARSE_RETENTION_S:
    raise ConfigError("EDGEWISE_TELEMETRY_FINE_RETENTION must be positive and at most "
                      "EDGEWISE_TELEMETRY_COARSE_RETENTION")

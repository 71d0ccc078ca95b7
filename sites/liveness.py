"""Node status from the time of its last sync.

With the default sync interval of 10 s (``EDGEWISE_SYNC_INTERVAL``):

* **online**: the last sync is at most 30 s old (3 intervals,
  ``EDGEWISE_NODE_STALE_AFTER``);
* **stale**: older than that but at most 120 s (12 intervals,
  ``EDGEWISE_NODE_OFFLINE_AFTER``): a few syncs went missing;
* **offline**: older still;
* **pending**: enrolled but never synced; **revoked**: credential revoked.

A node of an air-gapped site has no link: the console shows it, and its site,
as **air-gapped** with the time its last bundle out was written
(:func:`shown_status`), never as stale or offline.

Pages derive the status from ``last_seen_at`` each time they render, so they
are never behind; the periodic liveness sweep stores transitions and writes
them to the audit trail.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.conf import settings

from sites.models import Connectivity, NodeStatus


def node_status(
    *, last_seen_at: dt.datetime | None, revoked: bool, now: dt.datetime,
    stale_after: float | None = None, offline_after: float | None = None,
) -> str:
    if revoked:
        return NodeStatus.REVOKED
    if last_seen_at is None:
        return NodeStatus.PENDING
    stale_after = settings.NODE_STALE_AFTER_S if stale_after is None else stale_after
    offline_after = settings.NODE_OFFLINE_AFTER_S if offline_after is None else offline_after
    age = (now - last_seen_at).total_seconds()
    if age <= stale_after:
        return NodeStatus.ONLINE
    if age <= offline_after:
        return NodeStatus.STALE
    return NodeStatus.OFFLINE


def site_status(node_statuses: list[str]) -> str:
    """One word for a site: every node online, some, none, or no node yet."""
    live = [s for s in node_statuses if s != NodeStatus.REVOKED]
    if not live:
        return "empty"
    online = sum(1 for s in live if s == NodeStatus.ONLINE)
    if online == len(live):
        return "online"
    if online == 0:
        return "offline"
    return "degraded"


# What the console shows for an air-gapped site or node in place of online, stale or offline: it has no link,
# so the time since its last sync says nothing about its health. Revoked stays revoked; a site without a
# live node stays "empty".
AIR_GAPPED = "air-gapped"


def shown_status(status: str, *, connectivity: str) -> str:
    """The status the console shows for a node's or site's ``status`` at a site of ``connectivity``."""
    if connectivity == Connectivity.AIR_GAPPED and status not in (NodeStatus.REVOKED, "empty"):
        return AIR_GAPPED
    return status


def shown_confirmed_at(*, connectivity: str, last_seen: Iterable[dt.datetime | None],
                       telemetry: Iterable[dt.datetime | None]) -> dt.datetime | None:
    """When a site's link was last confirmed, as the console shows it: its newest sync or telemetry.

    For an air-gapped site only the syncs count: importing a bundle out records the node's report as of the
    time the bundle was written, but its telemetry as received at the import, which confirms nothing new.
    """
    times = [t for t in last_seen if t is not None]
    if connectivity != Connectivity.AIR_GAPPED:
        times += [t for t in telemetry if t is not None]
    return max(times) if times else None

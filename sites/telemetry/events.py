"""Typed payloads of the telemetry events: what the channel layer carries and browsers receive.

Channel-layer events (``orchestrator.realtime.broadcast``):

``site.telemetry`` to ``site-<uuid>``: :class:`SiteTelemetry`, the points
    just committed for that site's nodes (taken in the last 15 minutes).
``fleet.telemetry`` to ``fleet``: :class:`FleetTelemetry`, per site and node
    the highest sequence number committed and when.
``fleet.changed`` to ``fleet`` (from ``sites.services``): ``{"site": uuid}``,
    something about that site changed (a node enrolled, was revoked, changed
    status).

The committer merges the ``*.telemetry`` events of one group over a short
interval into one (:func:`coalesce`), so a browser may get the points of
several commits in one ``telemetry`` message, and a node's mark in
``confirmed`` may move by more than one.

Browser messages (JSON, from ``sites.consumers``), each with a ``type``:
``hello`` (connected; ``server_time``), ``telemetry`` (points of the site
page's site, :class:`SiteTelemetry`), ``confirmed`` (:class:`FleetTelemetry`
narrowed to the sites the user may see) and ``changed`` (``{"site": uuid}``).
"""

from __future__ import annotations

from typing import Any, TypedDict

from edge_runtime import protocol


class PointEvent(TypedDict):
    node: str
    seq: int
    at: str
    interval_s: float
    resources: dict[str, Any]
    models: list[dict[str, Any]]


class SiteTelemetry(TypedDict):
    site: str
    points: list[PointEvent]


class NodeConfirmation(TypedDict):
    seq: int
    confirmed_at: str
    # Points newly reported lost in this commit.
    lost: int


class SiteConfirmation(TypedDict):
    confirmed_at: str
    nodes: dict[str, NodeConfirmation]


class FleetTelemetry(TypedDict):
    sites: dict[str, SiteConfirmation]


def point_event(node_uuid: str, point: protocol.TelemetryPoint) -> PointEvent:
    return {
        "node": node_uuid,
        "seq": point.seq,
        "at": point.at.isoformat(),
        "interval_s": point.interval_s,
        "resources": point.resources.model_dump(mode="json"),
        "models": [m.model_dump(mode="json") for m in point.models],
    }



def coalesce(kind: str, held: dict[str, Any] | None, later: dict[str, Any]) -> dict[str, Any]:
    """One payload that says what ``held`` and then ``later`` (two events of ``kind`` to one group) said.

    ``site.telemetry``: every point of both, in order. Points are history
    (each one a chart sample), so none is dropped; the live window bounds how
    many a commit carries.

    ``fleet.telemetry``: per node the later mark and confirmation, the points
    reported lost in both summed. Marks only grow (they are committed
    high-water marks, and a process hands its commits over in order), so the
    later one is the state to show; the lost points of each commit are new
    ones, so they add up.

    ``held`` is the outbox's own copy and is updated in place; ``later`` is
    never modified.
    """
    if kind == "site.telemetry":
        if held is None:
            return {"site": later["site"], "points": list(later["points"])}
        held["points"].extend(later["points"])
        return held
    if kind == "fleet.telemetry":
        held = held if held is not None else {"sites": {}}
        for site_uuid, site in later["sites"].items():
            mine = held["sites"].setdefault(site_uuid, {"confirmed_at": site["confirmed_at"], "nodes": {}})
            mine["confirmed_at"] = site["confirmed_at"]
            for node_uuid, node in site["nodes"].items():
                before = mine["nodes"].get(node_uuid)
                mine["nodes"][node_uuid] = {**node, "lost": node["lost"] + (before["lost"] if before else 0)}
        return held
    raise ValueError(f"no rule to coalesce {kind!r} events")

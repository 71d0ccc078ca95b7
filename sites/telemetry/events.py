"""Typed payloads of the telemetry events: what the channel layer carries and browsers receive.

Channel-layer events (``orchestrator.realtime.broadcast``):

``site.telemetry`` to ``site-<uuid>``: :class:`SiteTelemetry`, the points
    just committed for that site's nodes (taken in the last 15 minutes).
``fleet.telemetry`` to ``fleet``: :class:`FleetTelemetry`, per site and node
    the highest sequence number committed and when.
``fleet.changed`` to ``fleet`` (from ``sites.services``): ``{"site": uuid}``,
    something about that site changed (a node enrolled, was revoked, changed
    status).

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

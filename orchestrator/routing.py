"""Websocket routes. Agent routes sit under ``/agent/`` (credential auth, no
origin check); browser routes get the session and the origin check."""

from __future__ import annotations

from typing import Any

from django.urls import path

from sites.consumers import FleetConsumer, NodeStreamConsumer, SiteConsumer

agent_websocket_urlpatterns: list[Any] = [
    path("v1/nodes/<uuid:node_id>/stream", NodeStreamConsumer.as_asgi()),
]

browser_websocket_urlpatterns: list[Any] = [
    path("ws/fleet/", FleetConsumer.as_asgi()),
    path("ws/sites/<uuid:site_id>/", SiteConsumer.as_asgi()),
]

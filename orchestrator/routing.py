from __future__ import annotations

from django.urls import path

from sites.consumers import NodeStreamConsumer

websocket_urlpatterns = [
    path("agent/v1/nodes/<uuid:node_id>/stream", NodeStreamConsumer.as_asgi()),
]

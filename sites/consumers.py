"""Websocket consumers of the sites app.

:class:`NodeStreamConsumer` is the node's always-open channel
(``/agent/v1/nodes/<id>/stream``): the control plane pushes a "sync now"
nudge the moment a node's desired state changes, so nodes need not poll
fast. The node authenticates with the same bearer credential as over HTTP.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from edge_runtime import protocol
from orchestrator.realtime import node_group
from sites import services
from sites.models import Node


@database_sync_to_async
def _authenticate(credential: str) -> Node | None:
    return services.node_authenticate(credential)


class NodeStreamConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    async def connect(self) -> None:
        headers = dict(self.scope.get("headers") or [])
        scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        node = await _authenticate(credential.strip()) if scheme.lower() == "bearer" else None
        node_id = str(self.scope["url_route"]["kwargs"]["node_id"])
        if node is None or node.revoked_at is not None or str(node.uuid) != node_id:
            await self.close(code=4403)
            return
        self.group = node_group(node.uuid)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Nodes speak over HTTP; the stream only carries nudges to them.
        return None

    async def node_nudge(self, message: dict[str, Any]) -> None:
        nudge = protocol.Nudge(generation=int(message["payload"].get("generation", 0)))
        await self.send_json(nudge.model_dump(mode="json"))

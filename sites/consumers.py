"""Websocket consumers of the sites app.

:class:`NodeStreamConsumer` is the node's always-open channel
(``/agent/v1/nodes/<id>/stream``): the control plane pushes a nudge (the
node's new signed desired state, or "sync now") the moment something changes
for the node, handed to the stream by its process's ``sites.nudges``
dispatcher, so nodes need not poll fast, and the node sends its telemetry (``edge_runtime.protocol``'s
``TelemetryFrame``). Each frame is committed with the other streams' frames
of this process (``sites.telemetry.committer``) and acknowledged only after
that commit, with the highest sequence number held for the node. The node authenticates with the same
bearer credential as over HTTP.

The browsers' live surfaces (session auth, origin checked by
``orchestrator.asgi``):

* :class:`FleetConsumer` (``/ws/fleet/``): the fleet table and map. Which
  sites' links were confirmed just now (``confirmed``) and which sites
  changed (``changed``), narrowed to the sites the user may see.
* :class:`SiteConsumer` (``/ws/sites/<uuid>/``): one site page: its nodes'
  telemetry points as they are committed, and its changes. Refused unless the
  user may see the site.

Permissions are checked when a browser connects and again for every message
sent to it, against the set of sites the user may see. That set is read from
the database at most every :data:`PERMISSION_TTL_S` seconds, so a grant
revoked (or an account deactivated) stops the feed within that time without
a query per message; a site page whose site the user may no longer see is
closed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model
from django.utils import timezone
from pydantic import ValidationError

from edge_runtime import protocol
from orchestrator.realtime import FLEET_GROUP, site_group
from sites import nudges, services
from sites.models import Node, Site
from sites.telemetry.committer import committer
from sites.telemetry.services import Submission

PERMISSION_TTL_S = 2.0
# Close codes (4000-4999 are the application's): answered as HTTP 403 before accept.
CLOSE_FORBIDDEN = 4403
CLOSE_BAD_FRAME = 4400
CLOSE_SERVER_ERROR = 1011


@database_sync_to_async
def _authenticate(credential: str) -> Node | None:
    return services.node_authenticate(credential)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """A websocket consumer whose messages do not each wait for the process's database thread.

    Channels closes stale database connections before handling every message
    (``aclose_old_connections``) by running that on the one thread all
    ``database_sync_to_async`` calls of the process share. A node stream
    receives a frame a second and a browser a message per broadcast, so each
    of those queued behind whatever database work the process was doing.
    These consumers touch the database only through ``database_sync_to_async``
    (and the committer's thread), which closes stale connections itself
    before and after each call, so the hop per message guards nothing here.
    """

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)


class NodeStreamConsumer(LiveConsumer):
    node: Node | None = None
    nudged: bool = False

    async def connect(self) -> None:
        headers = dict(self.scope.get("headers") or [])
        scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        node = await _authenticate(credential.strip()) if scheme.lower() == "bearer" else None
        node_id = str(self.scope["url_route"]["kwargs"]["node_id"])
        if node is None or node.revoked_at is not None or str(node.uuid) != node_id:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.node = node
        # Before the accept: every nudge sent once the node is connected reaches it (sites.nudges).
        await nudges.dispatcher().add(str(node.uuid), id(self), self._send_nudge)
        self.nudged = True
        await self.accept()

    async def _send_nudge(self, text: str) -> None:
        await self.send(text_data=text)

    async def disconnect(self, code: int) -> None:
        if self.nudged and self.node is not None:
            self.nudged = False
            await nudges.dispatcher().remove(str(self.node.uuid), id(self))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if self.node is None:
            return
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw) > protocol.MAX_TELEMETRY_FRAME_BYTES:
            await self._refuse(f"telemetry frame of {len(raw)} bytes exceeds the limit of "
                               f"{protocol.MAX_TELEMETRY_FRAME_BYTES} bytes")
            return
        try:
            # Pydantic's JSON reader: bounded nesting, no unpaired surrogates; the wire model bounds every
            # value by the column it is committed to, so one node's frame cannot fail a commit shared with others.
            frame = protocol.TelemetryFrame.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            await self._refuse(f"invalid telemetry frame: {where}: {first['msg']}" if where
                               else f"invalid telemetry frame: {first['msg']}")
            return
        except (ValueError, RecursionError) as exc:
            await self._refuse(f"invalid telemetry frame: {type(exc).__name__}: {exc}")
            return
        submission = Submission(node_id=self.node.pk, node_uuid=str(self.node.uuid),
                                site_uuid=str(self.node.site.uuid), frame=frame)
        try:
            mark = await committer().commit(submission)
        except Exception:  # noqa: BLE001 - nothing was acknowledged; the node sends it again after reconnecting
            await self.close(code=CLOSE_SERVER_ERROR)
            return
        await self.send(protocol.TelemetryAck(seq=mark).model_dump_json())

    async def _refuse(self, message: str) -> None:
        await self.send(protocol.StreamError(error=message[:1000]).model_dump_json())
        await self.close(code=CLOSE_BAD_FRAME)


# -- browsers ---------------------------------------------------------------------


@database_sync_to_async
def _visible_sites(user_id: int) -> set[str] | None:
    """The uuids of the sites the user may see now; None if the account is gone or inactive."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return None
    return {str(u) for u in Site.objects.all().restrict(user).values_list("uuid", flat=True)}


class BrowserConsumer(LiveConsumer):
    """Session-authenticated live surface; keeps the user's visible sites fresh within PERMISSION_TTL_S."""

    groups_joined: tuple[str, ...] = ()
    user_id: int | None = None
    _visible: set[str] | None = None
    _checked_at: float = 0.0

    async def _authenticated(self) -> bool:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return False
        self.user_id = user.pk
        return True

    async def visible(self) -> set[str]:
        """The sites this user may see, as of at most PERMISSION_TTL_S ago; empty once the account is gone."""
        if self.user_id is None:
            return set()
        if self._visible is None or time.monotonic() - self._checked_at > PERMISSION_TTL_S:
            visible = await _visible_sites(self.user_id)
            self._checked_at = time.monotonic()
            if visible is None:
                self._visible = set()
                await self.close(code=CLOSE_FORBIDDEN)
            else:
                self._visible = visible
        return self._visible

    async def join(self, *groups: str) -> None:
        self.groups_joined = groups
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Browsers only listen; anything they send is ignored.
        return None

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Other features broadcast to the groups joined here too; an event
        # this surface does not show is not an error that should close it.
        if getattr(self, get_handler_name(message), None) is None:
            return
        await super().dispatch(message)

    async def hello(self) -> None:
        await self.send_json({"type": "hello", "server_time": timezone.now().isoformat()})

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, separators=(",", ":"))


class FleetConsumer(BrowserConsumer):
    async def connect(self) -> None:
        if not await self._authenticated():
            return
        await self.visible()
        await self.join(FLEET_GROUP)
        await self.accept()
        await self.hello()

    async def fleet_telemetry(self, message: dict[str, Any]) -> None:
        visible = await self.visible()
        sites = {k: v for k, v in message["payload"]["sites"].items() if k in visible}
        if sites:
            await self.send_json({"type": "confirmed", "sites": sites})

    async def fleet_changed(self, message: dict[str, Any]) -> None:
        site = str(message["payload"].get("site", ""))
        if site in await self.visible():
            await self.send_json({"type": "changed", "site": site})


class SiteConsumer(BrowserConsumer):
    site: str = ""

    async def connect(self) -> None:
        if not await self._authenticated():
            return
        self.site = str(self.scope["url_route"]["kwargs"]["site_id"])
        if self.site not in await self.visible():
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.join(site_group(self.site), FLEET_GROUP)
        await self.accept()
        await self.hello()

    async def _may_see(self) -> bool:
        if self.site in await self.visible():
            return True
        await self.close(code=CLOSE_FORBIDDEN)
        return False

    async def site_telemetry(self, message: dict[str, Any]) -> None:
        if message["payload"].get("site") == self.site and await self._may_see():
            await self.send_json({"type": "telemetry", **message["payload"]})

    async def fleet_telemetry(self, message: dict[str, Any]) -> None:
        mine = message["payload"]["sites"].get(self.site)
        if mine and await self._may_see():
            await self.send_json({"type": "confirmed", "sites": {self.site: mine}})

    async def fleet_changed(self, message: dict[str, Any]) -> None:
        if str(message["payload"].get("site", "")) == self.site and await self._may_see():
            await self.send_json({"type": "changed", "site": self.site})

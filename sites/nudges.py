"""Nudges handed to the node streams a process holds, from batched messages (``orchestrator.realtime``).

A change for many nodes is sent as a few messages to one group, :data:`~orchestrator.realtime.NUDGE_GROUP`,
each carrying the nudges of up to a thousand nodes. Every serving process joins that group once, through
its :class:`Dispatcher` (one per event loop), which keeps the node streams of its process by node uuid and
sends each stream in a message the nudge meant for it. A process holding none of a message's nodes drops
it after a dictionary lookup per node.

A dispatcher starts with the first stream its process accepts and stops when the last one closes (leaving
the group). It joins the group before that first stream is accepted, so a stream sees every nudge sent
after it was accepted. Channels forgets a group member after the layer's ``group_expiry`` (a day by
default), so a dispatcher that lives longer joins again every :data:`REJOIN_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import get_channel_layer

from orchestrator.realtime import NUDGE_GROUP, NUDGE_MESSAGE_TYPE

logger = logging.getLogger("edgewise.nudges")

REJOIN_S = 3600.0
# After a failed receive (Redis gone), the pause before the next.
RETRY_S = 1.0

Send = Callable[[str], Awaitable[None]]


class Dispatcher:
    """This event loop's node streams by node uuid, and the one receiver of the nudge group for them."""

    def __init__(self, layer: Any = None) -> None:
        self.streams: dict[str, dict[int, Send]] = {}
        # The settings' channel layer unless given one (a test's process of its own).
        self._given_layer = layer
        self.layer: Any = layer
        # Batched messages received, and nudges handed to streams.
        self.messages = 0
        self.delivered = 0
        self.channel: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    async def add(self, node_uuid: str, key: int, send: Send) -> None:
        """Hand ``send`` (one stream's text sender) the nudges for ``node_uuid`` from now on."""
        async with self._lock:
            if self.channel is None:
                await self._start()
            self.streams.setdefault(node_uuid, {})[key] = send

    async def remove(self, node_uuid: str, key: int) -> None:
        async with self._lock:
            held = self.streams.get(node_uuid, {})
            held.pop(key, None)
            if not held:
                self.streams.pop(node_uuid, None)
            if not self.streams and self.channel is not None:
                await self._stop()

    async def _start(self) -> None:
        self.layer = self._given_layer or get_channel_layer()
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(NUDGE_GROUP, self.channel)
        self._tasks = [asyncio.create_task(self._receive(self.channel), name="nudge-receive"),
                       asyncio.create_task(self._rejoin(self.channel), name="nudge-rejoin")]

    async def _stop(self) -> None:
        channel, self.channel = self.channel, None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(Exception):  # noqa: BLE001 - the membership expires anyway
            await self.layer.group_discard(NUDGE_GROUP, channel)

    async def _rejoin(self, channel: str) -> None:
        while True:
            await asyncio.sleep(REJOIN_S)
            try:
                await self.layer.group_add(NUDGE_GROUP, channel)
            except Exception:  # noqa: BLE001 - tried again in REJOIN_S, well within the group expiry
                logger.warning("could not renew this process's place in the nudge group", exc_info=True)

    async def _receive(self, channel: str) -> None:
        while True:
            try:
                message = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis away: the streams' nodes still sync on their interval
                logger.warning("could not receive nudges; trying again in %ss", RETRY_S, exc_info=True)
                await asyncio.sleep(RETRY_S)
                continue
            if message.get("type") == NUDGE_MESSAGE_TYPE:
                self.messages += 1
                await self.deliver(message.get("nudges") or [])

    async def deliver(self, nudges: list[list[str]]) -> int:
        """Send each held stream its nudge; how many were sent."""
        sends = [send(text) for node_uuid, text in nudges for send in self.streams.get(node_uuid, {}).values()]
        if not sends:
            return 0
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # A stream closing as its nudge goes: its node syncs when it reconnects.
            logger.info("%d of %d nudges not sent (%s)", len(failed), len(sends), failed[0])
        self.delivered += len(sends) - len(failed)
        return len(sends) - len(failed)


_dispatchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dispatcher] = weakref.WeakKeyDictionary()


def dispatcher() -> Dispatcher:
    """The running event loop's dispatcher."""
    loop = asyncio.get_running_loop()
    held = _dispatchers.get(loop)
    if held is None:
        held = _dispatchers[loop] = Dispatcher()
    return held

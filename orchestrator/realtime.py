"""The one helper for every realtime send (Channels groups).

Sends happen after the surrounding transaction commits, so nobody is told of
a change that then rolls back. Group names are ``<entity>-<uuid>`` or
``fleet`` for the estate-wide feed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def broadcast(group: str, event_type: str, payload: dict[str, Any]) -> None:
    message = {"type": event_type.replace(".", "_"), "event": event_type, "payload": payload}

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:  # noqa: BLE001 - a lost notification must never fail the change
            logger.warning("could not broadcast %s to %s", event_type, group, exc_info=True)

    transaction.on_commit(send)


async def broadcast_committed(group: str, event_type: str, payload: dict[str, Any]) -> None:
    """:func:`broadcast` for async code whose change has already committed (the telemetry committer).

    Sends at once from the event loop, the same message as :func:`broadcast`;
    never call it before the commit it reports.
    """
    layer = get_channel_layer()
    if layer is None:
        return
    message = {"type": event_type.replace(".", "_"), "event": event_type, "payload": payload}
    try:
        await layer.group_send(group, message)
    except Exception:  # noqa: BLE001 - a lost notification must never fail the change
        logger.warning("could not broadcast %s to %s", event_type, group, exc_info=True)


def node_group(node_uuid: Any) -> str:
    return f"node-{node_uuid}"


def site_group(site_uuid: Any) -> str:
    return f"site-{site_uuid}"


FLEET_GROUP = "fleet"


def broadcast_many(sends: list[tuple[str, str, dict[str, Any]]]) -> None:
    """:func:`broadcast` for many (group, event type, payload) at once, after commit.

    One hop into the event loop for all of them instead of one per message:
    publishing a wave of desired states nudges hundreds of nodes.
    """
    if not sends:
        return
    messages = [(group, {"type": kind.replace(".", "_"), "event": kind, "payload": payload})
                for group, kind, payload in sends]

    async def send_all() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        results = await asyncio.gather(*(layer.group_send(group, message) for group, message in messages),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning("could not broadcast %d of %d messages: %s", len(failed), len(messages), failed[0])

    def send() -> None:
        try:
            async_to_sync(send_all)()
        except Exception:  # noqa: BLE001 - a lost notification must never fail the change
            logger.warning("could not broadcast %d messages", len(messages), exc_info=True)

    transaction.on_commit(send)

"""The one helper for every realtime send (Channels groups).

Sends happen after the surrounding transaction commits, so nobody is told of
a change that then rolls back. Group names are ``<entity>-<uuid>`` or
``fleet`` for the estate-wide feed; nodes' nudges go in batches to
:data:`NUDGE_GROUP` (:func:`nudge_nodes`).

However many messages a change sends, at most :data:`SEND_CONCURRENCY`
``group_send`` calls run at once in a process's event loop, so a burst shares
a few Redis connections (docs/decisions/0010). A message that fails is retried
once; what fails twice is logged with its count, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from edge_runtime import protocol

logger = logging.getLogger(__name__)

# group_send calls in flight at once per event loop; each holds one Redis connection.
SEND_CONCURRENCY = 8
# Pause before the one retry of what failed: long enough for a connection to free up.
RETRY_DELAY_S = 0.2

Message = tuple[str, dict[str, Any]]

_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _limit() -> asyncio.Semaphore:
    """The running loop's bound on concurrent sends (every caller in that loop shares it)."""
    loop = asyncio.get_running_loop()
    semaphore = _limits.get(loop)
    if semaphore is None:
        semaphore = _limits[loop] = asyncio.Semaphore(SEND_CONCURRENCY)
    return semaphore


def _message(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": event_type.replace(".", "_"), "event": event_type, "payload": payload}


async def _send_bounded(layer: Any, messages: list[Message]) -> list[tuple[Message, BaseException]]:
    """Send every message, at most SEND_CONCURRENCY at once; the ones that failed, with why."""
    limit = _limit()

    async def one(group: str, message: dict[str, Any]) -> None:
        async with limit:
            await layer.group_send(group, message)

    results = await asyncio.gather(*(one(group, message) for group, message in messages), return_exceptions=True)
    return [(m, r) for m, r in zip(messages, results, strict=True) if isinstance(r, BaseException)]


async def send_messages(messages: list[Message]) -> int:
    """Send ``(group, message)`` pairs now; retry what fails once. Returns how many were lost.

    Never raises for a failed send: a lost notification must never fail the
    change it reports (nodes still find it on their next sync).
    """
    layer = get_channel_layer()
    if layer is None or not messages:
        return 0
    failed = await _send_bounded(layer, messages)
    if not failed:
        return 0
    logger.warning("could not broadcast %d of %d messages (%s); retrying them once",
                   len(failed), len(messages), failed[0][1])
    await asyncio.sleep(RETRY_DELAY_S)
    lost = await _send_bounded(layer, [m for m, _ in failed])
    if lost:
        logger.error("could not broadcast %d of %d messages after a retry (%s); their receivers learn of the "
                     "change on their next sync", len(lost), len(messages), lost[0][1])
    else:
        logger.info("broadcast the %d messages that had failed on the retry", len(failed))
    return len(lost)


def _send_after_commit(messages: list[Message]) -> None:
    def send() -> None:
        try:
            async_to_sync(send_messages)(messages)
        except Exception:  # noqa: BLE001 - a lost notification must never fail the change
            logger.warning("could not broadcast %d messages", len(messages), exc_info=True)

    transaction.on_commit(send)


def broadcast(group: str, event_type: str, payload: dict[str, Any]) -> None:
    _send_after_commit([(group, _message(event_type, payload))])


async def broadcast_committed(group: str, event_type: str, payload: dict[str, Any]) -> None:
    """:func:`broadcast` for async code whose change has already committed (the telemetry committer).

    Sends at once from the event loop, the same message as :func:`broadcast`,
    under the same bound and retry; never call it before the commit it reports.
    """
    await send_messages([(group, _message(event_type, payload))])


def site_group(site_uuid: Any) -> str:
    return f"site-{site_uuid}"


FLEET_GROUP = "fleet"


def broadcast_many(sends: list[tuple[str, str, dict[str, Any]]]) -> None:
    """:func:`broadcast` for many (group, event type, payload) at once, after commit.

    One hop into the event loop for all of them instead of one per message:
    publishing a wave of desired states nudges hundreds of nodes.
    """
    if sends:
        _send_after_commit([(group, _message(kind, payload)) for group, kind, payload in sends])


# Node nudges go to one group that every process holding node streams joins (sites.nudges), in messages of
# many nodes each: a publish to ten thousand nodes is a few dozen messages, not ten thousand group sends.
NUDGE_GROUP = "node-nudges"
NUDGE_MESSAGE_TYPE = "nodes.nudge"
# What one message carries at most: this many nudges, or about this many bytes of them.
NUDGE_BATCH = 1000
NUDGE_BATCH_BYTES = 512 * 1024


def nudge_texts(nudges: dict[str, protocol.Nudge]) -> dict[str, str]:
    """Each node's nudge as its stream sends it; one too large to push loses its desired state (the node then
    syncs for it)."""
    texts = {}
    for node_uuid, nudge in nudges.items():
        text = nudge.model_dump_json()
        if len(text.encode()) > protocol.MAX_NUDGE_BYTES:
            text = nudge.model_copy(update={"desired": None, "report_within_s": 0.0}).model_dump_json()
        texts[str(node_uuid)] = text
    return texts


def nudge_messages(texts: dict[str, str]) -> list[Message]:
    """The messages to :data:`NUDGE_GROUP` carrying ``texts`` (node uuid: nudge JSON), in batches."""
    messages: list[Message] = []
    batch: list[list[str]] = []
    size = 0
    for node_uuid, text in texts.items():
        if batch and (len(batch) >= NUDGE_BATCH or size + len(text) > NUDGE_BATCH_BYTES):
            messages.append((NUDGE_GROUP, {"type": NUDGE_MESSAGE_TYPE, "nudges": batch}))
            batch, size = [], 0
        batch.append([node_uuid, text])
        size += len(text) + len(node_uuid)
    if batch:
        messages.append((NUDGE_GROUP, {"type": NUDGE_MESSAGE_TYPE, "nudges": batch}))
    return messages


def nudge_nodes(nudges: dict[str, protocol.Nudge]) -> None:
    """Push each node its nudge through its stream, after commit (by node uuid)."""
    if nudges:
        _send_after_commit(nudge_messages(nudge_texts(nudges)))

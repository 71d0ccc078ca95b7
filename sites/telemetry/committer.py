"""Group commit of telemetry frames: one transaction for every node stream of a process.

A thousand nodes reporting every second are a thousand small transactions a
second if each stream commits its own frames. Instead every
:class:`~sites.consumers.NodeStreamConsumer` of an event loop hands its frame
to that loop's :class:`Committer` and waits; the committer commits whatever
has gathered in one :func:`~sites.telemetry.services.telemetry_commit` call,
then wakes each waiter with its node's high-water mark, sends the round's
events to the channel layer from the event loop (after the commit, beside
the next round rather than before it), and starts the next round with
whatever arrived meanwhile. No timer: a frame arriving at an idle
committer is committed at once, and under load rounds grow by themselves.

A round that fails (the database went away) fails each of its frames; their
streams close and the nodes send them again after reconnecting, which is
harmless since commits are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from channels.db import database_sync_to_async

from orchestrator.realtime import broadcast_committed
from sites.telemetry.services import Submission, telemetry_commit

logger = logging.getLogger(__name__)

# Frames per round at most; more wait for the next round.
MAX_ROUND = 500


class Committer:
    def __init__(self) -> None:
        self._waiting: list[tuple[Submission, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def commit(self, submission: Submission) -> int:
        """Commit ``submission`` with the others of its round; the node's high-water mark after the commit."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((submission, future))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="telemetry-committer")
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                round_, self._waiting = self._waiting[:MAX_ROUND], self._waiting[MAX_ROUND:]
                live = [(s, f) for s, f in round_ if not f.done()]  # a waiter cancelled (its stream closed)
                if not live:
                    continue
                try:
                    committed = await database_sync_to_async(telemetry_commit)(submissions=[s for s, _ in live])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter; the committer lives on
                    logger.warning("telemetry commit of %d frame(s) failed: %s", len(live), exc)
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for submission, future in live:
                    if not future.done():
                        future.set_result(committed.marks[submission.node_id])
                send = asyncio.create_task(self._broadcast(committed.events))
                self._sending.add(send)
                send.add_done_callback(self._sending.discard)

    async def _broadcast(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        await asyncio.gather(*(broadcast_committed(group, kind, payload) for group, kind, payload in events))


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Committer] = weakref.WeakKeyDictionary()


def committer() -> Committer:
    """The committer of the running event loop (one per process under uvicorn)."""
    loop = asyncio.get_running_loop()
    found = _committers.get(loop)
    if found is None:
        found = _committers[loop] = Committer()
    return found

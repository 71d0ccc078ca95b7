"""Group commit of telemetry frames: one transaction for every node stream of a process.

Every :class:`~sites.consumers.NodeStreamConsumer` of an event loop hands its frame
to that loop's :class:`Committer` and waits; the committer commits whatever
has gathered in one :func:`~sites.telemetry.services.telemetry_commit` call,
then wakes each waiter with its node's high-water mark, hands the round's
events to the outbox (sent from the event loop after the commit, beside the
next round rather than before it), and starts the next round with whatever
arrived meanwhile. No timer: a frame arriving at an idle
committer is committed at once, and under load rounds grow by themselves.

A round that fails (the database went away) fails each of its frames; their
streams close and the nodes send them again after reconnecting, which is
harmless since commits are idempotent.

The rounds run on a thread of the committer's own, so no other consumer of
the process waits on a commit; the events go through an :class:`Outbox` that
merges them per group (:func:`~sites.telemetry.events.coalesce`) and sends at
most once per :data:`BROADCAST_INTERVAL_S`, at once when it was idle for
longer (docs/decisions/0011).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from channels.db import database_sync_to_async

from orchestrator.realtime import broadcast_committed
from sites.telemetry.events import coalesce
from sites.telemetry.services import Submission, telemetry_commit

logger = logging.getLogger(__name__)

# Frames per round at most; more wait for the next round.
MAX_ROUND = 500
# Seconds between two messages to one group from one process, at least: the
# most a browser's view lags behind a commit on this account.
BROADCAST_INTERVAL_S = 0.1


class Outbox:
    """Events to the channel layer, merged per group and sent at most once per ``interval`` seconds.

    What it guarantees: every event put is sent, merged with the others of
    its group and kind, at the latest ``interval`` after the previous send
    began (or once it has finished, if it took longer); a group's messages
    leave one send at a time, in the order of the commits they report. Only
    events that :func:`~sites.telemetry.events.coalesce` knows may be put.
    """

    def __init__(self, interval: float = BROADCAST_INTERVAL_S) -> None:
        self.interval = interval
        self._held: dict[tuple[str, str], dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._sent_at = float("-inf")

    def put(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Hold ``events`` (already committed) for the next send."""
        for group, kind, payload in events:
            self._held[(group, kind)] = coalesce(kind, self._held.get((group, kind)), payload)
        if self._held and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="telemetry-outbox")

    async def _run(self) -> None:
        while self._held:
            wait = self._sent_at + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            held, self._held = self._held, {}
            self._sent_at = time.monotonic()
            await asyncio.gather(*(broadcast_committed(group, kind, payload)
                                   for (group, kind), payload in held.items()))


class Committer:
    def __init__(self) -> None:
        self._waiting: list[tuple[Submission, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.outbox = Outbox()
        # One thread: rounds stay one at a time, as their locks in node order assume.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry-commit")
        self._commit = database_sync_to_async(telemetry_commit, thread_sensitive=False, executor=self._thread)

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
                    committed = await self._commit(submissions=[s for s, _ in live])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter; the committer lives on
                    logger.warning("telemetry commit of %d frame(s) failed: %s", len(live), exc)
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for submission, future in live:
                    if not future.done():
                        future.set_result(committed.marks[submission.node_id])
                self.outbox.put(committed.events)


_committers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Committer] = weakref.WeakKeyDictionary()


def committer() -> Committer:
    """The committer of the running event loop (one per process under uvicorn)."""
    loop = asyncio.get_running_loop()
    found = _committers.get(loop)
    if found is None:
        found = _committers[loop] = Committer()
    return found

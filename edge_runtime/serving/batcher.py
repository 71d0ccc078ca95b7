"""Dynamic batching: one queue and one runner per served model version.

Requests are put on the version's queue from the event loop. The runner
takes whatever is queued (up to ``max_batch_size`` rows), runs one
``session.run`` in a worker thread and hands each request its own slice of
the outputs. While a run is in progress, new requests queue up, so under
load batches grow by themselves; a request that arrives alone runs at once.
``max_queue_delay_ms`` > 0 lets a lone request wait up to that long for
company, trading its latency for throughput.

Requests are stacked along dimension 0 only when every input and output of
the model has a dynamic first dimension and the requests agree on the other
dimensions; otherwise they run one after another in the same worker call.
If a stacked run fails, each request of that batch is run on its own, so a
request that the model cannot process fails alone and its neighbours get
their answers.

Everything here except ``_execute`` runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from edge_runtime.serving.loader import LoadedModel
from edge_runtime.serving.metrics import ModelMetrics
from edge_runtime.serving.tensors import Array


class ModelUnavailable(Exception):
    """The version was retired before this request reached it."""


@dataclass
class Pending:
    feeds: dict[str, Array]
    rows: int
    # Requests with equal keys can be stacked: the shapes past dimension 0.
    key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[list[Array]]
    enqueued: float


Outcome = list[Array] | BaseException


class Batcher:
    def __init__(self, model: LoadedModel, *, executor: Executor, metrics: ModelMetrics,
                 max_batch_size: int = 8, max_queue_delay_ms: float = 0.0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")
        self.model = model
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.stackable = model.batchable
        self._queue: collections.deque[Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.model.path.name}")

    def submit(self, feeds: dict[str, Array]) -> asyncio.Future[list[Array]]:
        """Queue one request; the future resolves to its outputs, in the model's output order.

        Synchronous on purpose: looking a version up and queueing on it happen
        with no await in between, so a swap cannot slip between them.
        """
        if self._closing:
            raise ModelUnavailable("this model version is being unloaded")
        if self.stackable:
            first = next(iter(feeds.values()))
            rows = int(first.shape[0])
            key = tuple(a.shape[1:] for a in feeds.values())
        else:
            rows, key = 1, ()
        future: asyncio.Future[list[Array]] = asyncio.get_running_loop().create_future()
        self._queue.append(Pending(feeds, rows, key, future, time.monotonic()))
        self.metrics.queue_depth = len(self._queue)
        self._wakeup.set()
        return future

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_queue_delay_s > 0:
                await self._gather_more()
            batch = self._take()
            self.metrics.queue_depth = len(self._queue)
            self.metrics.batches += 1
            self.metrics.batch_size.observe(len(batch))
            try:
                outcomes = await loop.run_in_executor(self.executor, self._execute, batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting request must get an answer
                outcomes = [exc] * len(batch)
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():
                    continue  # the client went away
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    async def _gather_more(self) -> None:
        deadline = self._queue[0].enqueued + self.max_queue_delay_s
        while sum(p.rows for p in self._queue) < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[Pending]:
        first = self._queue.popleft()
        batch = [first]
        if not self.stackable:
            # Not stackable: still take several, run back to back in one
            # worker call, which saves a thread hop per request.
            while self._queue and len(batch) < self.max_batch_size:
                batch.append(self._queue.popleft())
            return batch
        rows = first.rows
        skipped: list[Pending] = []
        while self._queue and rows < self.max_batch_size:
            item = self._queue.popleft()
            if item.key != first.key or rows + item.rows > self.max_batch_size:
                skipped.append(item)
                continue
            batch.append(item)
            rows += item.rows
        # Requests that did not fit keep their place at the head of the queue.
        self._queue.extendleft(reversed(skipped))
        return batch

    def _execute(self, batch: list[Pending]) -> list[Outcome]:
        """Runs in a worker thread; never raises, each request gets its outputs or its error."""
        if len(batch) > 1 and self.stackable:
            try:
                return self._run_stacked(batch)
            except Exception:  # noqa: BLE001, S110 - fall back to one run per request, which reports each error
                pass
        outcomes: list[Outcome] = []
        for item in batch:
            try:
                outcomes.append(self.model.run(item.feeds))
            except Exception as exc:  # noqa: BLE001 - reported to that request alone
                outcomes.append(exc)
        return outcomes

    def _run_stacked(self, batch: list[Pending]) -> list[Outcome]:
        names = list(batch[0].feeds)
        feeds = {name: np.concatenate([item.feeds[name] for item in batch], axis=0) for name in names}
        outputs = self.model.run(feeds)
        total = sum(item.rows for item in batch)
        if any(out.ndim == 0 or out.shape[0] != total for out in outputs):
            # The model declared a dynamic first dimension but does not map
            # rows to rows; never stack for it again.
            self.stackable = False
            raise ValueError("outputs are not row-aligned with inputs")
        outcomes: list[Outcome] = []
        start = 0
        for item in batch:
            end = start + item.rows
            outcomes.append([out[start:end] for out in outputs])
            start = end
        return outcomes

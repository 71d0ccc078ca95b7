"""Dynamic batching: one queue per served model version, one batch in flight at a time.

A request is put on its version's queue from the event loop. When no batch
is running, it starts at once, without waiting for company (as Triton does
by default); while a batch runs, new requests queue up and the next batch
takes all of them (up to ``max_batch_size`` rows) the moment it finishes, so
under load batches grow by themselves. ``max_queue_delay_ms`` > 0 lets a
batch wait up to that long for company, trading latency for throughput.

Where a batch runs depends on what it costs. A model whose batches take
less than a thread handoff (``inline_below_ms``; a small MLP takes a few
microseconds, waking a worker thread and then the loop again takes tens)
runs on the event loop itself, at the end of the loop's current turn so
that every request that arrived in that turn joins the batch. Anything
slower runs in the inference thread pool while the loop keeps serving HTTP:
the loop also carries the agent and every other model, which must not wait
behind a batch. (Running a small CNN's batches of a few milliseconds on the
loop was measured at about 7% less CPU per request; not worth that wait.)
The cost is learnt from the model's own runs (a moving average, seeded with
the loader's warm run), so a model that turns out slower moves to the pool.

Requests are stacked along dimension 0 only when every input and output of
the model has a dynamic first dimension and the requests agree on the other
dimensions; otherwise they run one after another in the same call. If a
stacked run fails, each request of that batch is run on its own, so a
request that the model cannot process fails alone and its neighbours get
their answers.

Everything here except ``_execute`` (and what it calls) runs on the event
loop thread; the queue and the flags need no lock.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass

import numpy as np

from edge_runtime.serving.loader import LoadedModel
from edge_runtime.serving.metrics import ModelMetrics
from edge_runtime.serving.tensors import Array

DEFAULT_INLINE_BELOW_MS = 0.1
# Weight of the newest run in the moving average of a batch's cost.
COST_SMOOTHING = 0.2


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
                 max_batch_size: int = 8, max_queue_delay_ms: float = 0.0,
                 inline_below_ms: float = DEFAULT_INLINE_BELOW_MS) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")
        if inline_below_ms < 0:
            raise ValueError("inline_below_ms must not be negative")
        self.model = model
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.inline_below_s = inline_below_ms / 1000.0
        self.stackable = model.batchable
        # Seconds one batch takes; written by whichever thread ran it (a
        # float store is atomic), read on the loop to choose where to run.
        self.batch_seconds = model.warm_run_seconds
        self._queue: collections.deque[Pending] = collections.deque()
        self._queued_rows = 0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def runs_inline(self) -> bool:
        """True while batches run on the event loop (they cost less than a thread handoff)."""
        return self.batch_seconds < self.inline_below_s

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

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
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[list[Array]] = loop.create_future()
        self._queue.append(Pending(feeds, rows, key, future, time.monotonic()))
        self._queued_rows += rows
        self.metrics.queue_depth = len(self._queue)
        self._idle.clear()
        if not self._busy:
            self._start_batch()
        return future

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then return."""
        self._closing = True
        if self._queue and not self._busy:
            self._start_batch()
        await self._idle.wait()

    # scheduling (event loop) -------------------------------------------------

    def _start_batch(self, *, waited: bool = False) -> None:
        """Start the next batch now, or arm the queue-delay timer; only while no batch runs."""
        loop = self._loop or asyncio.get_running_loop()
        if (self.max_queue_delay_s > 0 and not waited and not self._closing
                and self._queued_rows < self.max_batch_size):
            remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
            if remaining > 0:
                if self._timer is None:
                    self._timer = loop.call_later(remaining, self._delay_over)
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._busy = True
        if self.runs_inline:
            # At the end of this turn of the loop: requests parsed in the
            # same turn are queued by then and run in the same batch.
            loop.call_soon(self._run_inline)
            return
        batch = self._take()
        try:
            work = self.executor.submit(self._execute, batch)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            self._finish(batch, [ModelUnavailable(f"the server is stopping: {exc}")] * len(batch))
            return
        work.add_done_callback(lambda done: self._from_worker(loop, batch, done))

    def _delay_over(self) -> None:
        self._timer = None
        if self._queue and not self._busy:
            self._start_batch(waited=True)

    def _run_inline(self) -> None:
        batch = self._take()
        self._finish(batch, self._execute(batch))

    def _from_worker(self, loop: asyncio.AbstractEventLoop, batch: list[Pending], done: Future[list[Outcome]]) -> None:
        # On the worker thread (or on the loop, if the pool cancelled the work).
        try:
            loop.call_soon_threadsafe(self._settle, batch, done)
        except RuntimeError:  # the loop is closed: no one is waiting any more
            pass

    def _settle(self, batch: list[Pending], done: Future[list[Outcome]]) -> None:
        try:
            outcomes = done.result()
        except CancelledError:
            outcomes = [ModelUnavailable("the server is stopping")] * len(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiting request must get an answer
            outcomes = [exc] * len(batch)
        self._finish(batch, outcomes)

    def _finish(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue  # the client went away
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)
        self._busy = False
        if self._queue:
            self._start_batch()
        else:
            self._idle.set()

    def _take(self) -> list[Pending]:
        first = self._queue.popleft()
        batch = [first]
        rows = first.rows
        if not self.stackable:
            # Not stackable: still take several, run back to back in one
            # call, which saves a handoff per request.
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                batch.append(item)
                rows += item.rows
        else:
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
        self._queued_rows -= rows
        self.metrics.queue_depth = len(self._queue)
        self.metrics.batches += 1
        self.metrics.batch_size.observe(len(batch))
        return batch

    # running (worker thread, or the loop for cheap models) -------------------

    def _execute(self, batch: list[Pending]) -> list[Outcome]:
        """Never raises: each request gets its outputs or its own error."""
        started = time.perf_counter()
        try:
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
        finally:
            elapsed = time.perf_counter() - started
            self.batch_seconds += COST_SMOOTHING * (elapsed - self.batch_seconds)

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

"""Dynamic batching: one queue per served model version, up to ``instances`` batches in flight.

A request is put on its version's queue from the event loop. When fewer
than ``instances`` batches are running, it starts at once, without waiting
for company (as Triton does by default); otherwise it queues, and the next
batch takes everything queued (up to ``max_batch_size`` rows) the moment a
running one finishes, so under load batches grow by themselves. ``max_queue_delay_ms`` > 0 lets a
batch wait up to that long for company, trading latency for throughput.

Where a batch runs depends on what it costs. A model whose batches take
less than ``inline_below_ms`` (half a millisecond by default; a small MLP
takes tens of microseconds for dozens of rows) runs on the event loop
itself, at the end of the loop's current turn so that every request that
arrived in that turn joins the batch. Anything slower runs in the inference
thread pool while the loop keeps serving HTTP: the loop also carries the
agent and every other model, which must not wait behind a batch (the
measurements: docs/decisions/0004-model-server-where-batches-run.md).
The cost is learnt from the model's own runs (a moving average, seeded with
the loader's warm run), so a model that turns out slower moves to the pool.

Several instances (``instances`` > 1, as Triton's instance groups) run
batches of one session side by side, each on its share of the CPUs (see
:func:`~edge_runtime.serving.loader.instance_threads`), so that a run does
not wait at each operator for a thread the event loop displaced.

In the pool, the worker thread that finished a batch takes the next one
from the queue itself and runs it at once; only the answers go back to the
loop, so the model is not idle while the loop parses the requests of the
next batch. A worker gives its thread back after ``DRAIN_SLICE_S`` of
back-to-back batches and queues itself again behind whatever else waits for
the pool, so that one busy model cannot starve the others.

Requests are stacked along dimension 0 only when every input and output of
the model has a dynamic first dimension and the requests agree on the other
dimensions; otherwise they run one after another in the same call. If a
stacked run fails, each request of that batch is run on its own, so a
request that the model cannot process fails alone and its neighbours get
their answers.

The queue, its counters and the batch and queue metrics are shared by the
loop and the workers and change only under the batcher's lock; requests are
answered (their callbacks called) and the idle event is set on the loop only.

A batch's cost is timed in CPU time of the thread that runs it, not wall
time: on a busy machine a run that was descheduled, or a worker that waited
for the GIL while the loop parsed requests, would otherwise look slow and
move a cheap model off the loop for good.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from edge_runtime.serving.loader import LoadedModel
from edge_runtime.serving.metrics import ModelMetrics
from edge_runtime.serving.tensors import Array

logger = logging.getLogger("edge_runtime.serving")

DEFAULT_INLINE_BELOW_MS = 0.5
# Weight of the newest run in the moving average of a batch's cost.
COST_SMOOTHING = 0.2
# Seconds of back-to-back batches after which a worker lets other models have its thread.
DRAIN_SLICE_S = 0.05


class ModelUnavailable(Exception):
    """The version was retired before this request reached it."""


@dataclass(slots=True)
class Pending:
    feeds: dict[str, Array]
    rows: int
    # Requests with equal keys can be stacked: the shapes past dimension 0.
    key: tuple[tuple[int, ...], ...]
    # Called on the loop with the request's outputs (in the model's output order) or its error.
    on_done: Callable[[Outcome], object]
    enqueued: float


Outcome = list[Array] | BaseException


class Batcher:
    def __init__(self, model: LoadedModel, *, executor: Executor, metrics: ModelMetrics,
                 max_batch_size: int = 8, max_queue_delay_ms: float = 0.0,
                 inline_below_ms: float = DEFAULT_INLINE_BELOW_MS, instances: int = 1) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue_delay_ms < 0:
            raise ValueError("max_queue_delay_ms must not be negative")
        if inline_below_ms < 0:
            raise ValueError("inline_below_ms must not be negative")
        if instances < 1:
            raise ValueError("instances must be at least 1")
        self.model = model
        self.executor = executor
        self.metrics = metrics
        metrics.provider = model.provider
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.inline_below_s = inline_below_ms / 1000.0
        self.instances = instances
        self.stackable = model.batchable
        # Seconds one batch takes; written by whichever thread ran it (a
        # float store is atomic), read on the loop to choose where to run.
        self.batch_seconds = model.warm_run_seconds
        # Guards _queue, _queued_rows, _running and the batch and queue
        # metrics (a plain lock: taking it costs no Python call); a worker
        # waiting out the queue delay waits for more rows on _lock, a
        # condition on the same lock.
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        self._queue: collections.deque[Pending] = collections.deque()
        self._queued_rows = 0
        # Batches running or about to (on the loop, or drains in the pool).
        self._running = 0
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
        """Queue one request; the future resolves to its outputs, in the model's output order."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[list[Array]] = loop.create_future()

        def settle(outcome: Outcome) -> None:
            if future.done():
                return  # the caller went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.submit_callback(feeds, settle)
        return future

    def submit_callback(self, feeds: dict[str, Array], on_done: Callable[[Outcome], object]) -> None:
        """Queue one request; ``on_done`` gets its outputs or its error, on the loop, when its batch is done.

        No future and no extra turn of the loop per request: the server's own
        path. Synchronous on purpose: looking a version up and queueing on it
        happen with no await in between, so a swap cannot slip between them.
        Raises :class:`ModelUnavailable` if the version is being unloaded.
        """
        if self._closing:
            raise ModelUnavailable("this model version is being unloaded")
        key: tuple[tuple[int, ...], ...]
        if self.stackable:
            if len(feeds) == 1:
                (array,) = feeds.values()
                shape = array.shape
                rows, key = shape[0], (shape[1:],)
            else:
                arrays = list(feeds.values())
                rows = int(arrays[0].shape[0])
                key = tuple([a.shape[1:] for a in arrays])
        else:
            rows, key = 1, ()
        with self._mutex:
            self._queue.append(Pending(feeds, rows, key, on_done, time.monotonic()))
            self._queued_rows += rows
            self.metrics.queue_depth = len(self._queue)
            start = self._running < self._slots()
            if start:
                self._running += 1
            full = self._queued_rows >= self.max_batch_size
            if full:
                self._lock.notify()  # a worker waiting out the queue delay has a full batch
        self._idle.clear()
        if start:
            self._start()
        elif full:
            self._run_inline_now()

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then return."""
        self._closing = True
        with self._mutex:
            self._lock.notify()  # a worker waiting out the queue delay runs what it has
            start = bool(self._queue) and not self._running
            if start:
                self._running += 1
        if start:
            self._start()
        else:
            self._run_inline_now()
        await self._idle.wait()

    # scheduling --------------------------------------------------------------

    def _wait_for_company(self) -> float:
        """Seconds the head of the queue may still wait for more rows (0: run now). Under the lock."""
        if self.max_queue_delay_s <= 0 or self._closing or self._queued_rows >= self.max_batch_size:
            return 0.0
        return max(0.0, self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic())

    def _slots(self) -> int:
        # Batches on the loop run one at a time.
        return 1 if self.runs_inline else self.instances

    def _start(self) -> None:
        """Start running batches; on the loop, with ``_running`` just counted up by the caller."""
        loop = self._loop or asyncio.get_running_loop()
        if self.runs_inline:
            # At the end of this turn of the loop (or once the queue delay is
            # over): requests parsed in the same turn join the batch.
            with self._mutex:
                delay = self._wait_for_company() if self._queue else 0.0
            if delay > 0:
                self._timer = loop.call_later(delay, self._run_inline)
            else:
                loop.call_soon(self._run_inline)
            return
        batch: list[Pending] | None = None
        with self._mutex:
            if self._queue and not self._wait_for_company():
                # Taken here, so that a lone request is on its way before submit returns.
                batch = self._take()
        self._to_pool(loop, batch)

    def _to_pool(self, loop: asyncio.AbstractEventLoop, batch: list[Pending] | None) -> None:
        """Queue a drain on the pool; from the loop or from a worker."""
        try:
            work = self.executor.submit(self._drain, loop, batch)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            _post(loop, self._abandon, batch, f"the server is stopping: {exc}")
            return
        work.add_done_callback(lambda done: self._drain_done(loop, batch, done))

    def _run_inline_now(self) -> None:
        """On the loop: an inline batch waiting out the queue delay runs at the end of this turn instead."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            (self._loop or asyncio.get_running_loop()).call_soon(self._run_inline)

    def _run_inline(self) -> None:
        self._timer = None
        with self._mutex:
            if self._queue and self._wait_for_company() > 0:
                # The timer fired early by a hair, or the delay was re-armed: wait out the rest.
                self._timer = (self._loop or asyncio.get_running_loop()).call_later(
                    self._wait_for_company(), self._run_inline)
                return
            batch = self._take() if self._queue else []
        if batch:
            self._finish(batch, self._execute(batch))
        if not self.runs_inline:
            # The model turned out slow: the rest goes to the pool.
            with self._mutex:
                more = bool(self._queue)
            if more:
                self._to_pool(self._loop or asyncio.get_running_loop(), None)
                return
        self._next_inline()

    def _next_inline(self) -> None:
        with self._mutex:
            more = bool(self._queue)
            if not more:
                self._running -= 1
        if more:
            self._start()
        else:
            self._check_idle()

    def _drain(self, loop: asyncio.AbstractEventLoop, batch: list[Pending] | None) -> None:
        """Worker thread: run ``batch``, then whatever queued meanwhile, until the queue is empty."""
        until = time.monotonic() + DRAIN_SLICE_S
        while True:
            if batch:
                outcomes = self._execute(batch)
                if not _post(loop, self._finish, batch, outcomes):
                    return  # the loop is closed: no one is waiting any more
            with self._mutex:
                while self._queue and (delay := self._wait_for_company()) > 0:
                    self._lock.wait(delay)
                if not self._queue:
                    self._running -= 1
                    break
                if time.monotonic() > until:
                    # Let whatever else waits for the pool have this thread; queue up behind it.
                    batch = None
                    yielded = True
                else:
                    batch = self._take()
                    yielded = False
            if yielded:
                self._to_pool(loop, None)
                return
        _post(loop, self._check_idle)

    def _drain_done(self, loop: asyncio.AbstractEventLoop, batch: list[Pending] | None,
                    done: Future[None]) -> None:
        # The drain never raises; it can only have been cancelled before it ran (the pool shut down).
        if done.cancelled():
            _post(loop, self._abandon, batch, "the server is stopping")
        elif done.exception() is not None:
            _post(loop, self._abandon, batch, f"inference failed: {done.exception()!r}")

    def _abandon(self, batch: list[Pending] | None, reason: str) -> None:
        """On the loop: nothing will run; fail the batch in hand and everything queued."""
        with self._mutex:
            items = [*(batch or []), *self._queue]
            self._queue.clear()
            self._queued_rows = 0
            self.metrics.queue_depth = 0
            self._running -= 1
        error = ModelUnavailable(reason)
        self._finish(items, [error] * len(items))
        self._check_idle()

    def _finish(self, batch: list[Pending], outcomes: list[Outcome]) -> None:
        """On the loop: hand each request its outputs or its error."""
        for item, outcome in zip(batch, outcomes, strict=True):
            try:
                item.on_done(outcome)
            except Exception:  # noqa: BLE001 - one request's answer must not cost the others theirs
                logger.exception("answering a request of %s failed", self.model.path.name)

    def _check_idle(self) -> None:
        with self._mutex:
            idle = not self._running and not self._queue
        if idle:
            self._idle.set()

    def _take(self) -> list[Pending]:
        """The next batch off the queue; under the lock."""
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
        self.metrics.inferences += rows
        self.metrics.batch_size.observe(len(batch))
        return batch

    # running (worker thread, or the loop for cheap models) -------------------
    def _execute(self, batch: list[Pending]) -> list[Outcome]:
        """Never raises: each request gets its outputs or its own error.

        Two clock reads for the batch's queue and compute time (see :mod:`.metrics`), none per request.
        """
        begun = time.monotonic()
        started = time.thread_time()
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
            elapsed = time.thread_time() - started
            ended = time.monotonic()
            self.batch_seconds += COST_SMOOTHING * (elapsed - self.batch_seconds)
            rows = 0
            enqueued = 0.0
            for item in batch:
                rows += item.rows
                enqueued += item.enqueued
            with self._mutex:
                self.metrics.observe_batch(rows, len(batch), len(batch) * begun - enqueued, ended - begun, ended)

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


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> bool:
    """Call ``callback(*args)`` on ``loop`` from another thread; False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True

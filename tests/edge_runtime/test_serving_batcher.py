"""The batcher on its own: when a batch starts, where it runs, and that each request gets its own rows.

Real onnxruntime sessions and a real thread pool; each test drives the
batcher from its own event loop, so it can look at what happened before
the loop turned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.serving.batcher import DRAIN_SLICE_S, Batcher, ModelUnavailable
from edge_runtime.serving.loader import LoadedModel, load_model
from edge_runtime.serving.metrics import ModelMetrics
from tests.edge_runtime import onnx_models as om


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(om.mlp(tmp_path_factory.mktemp("m") / "mlp.onnx"))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    # About 180 M multiply-adds a call: a millisecond or more on a small node, and
    # still far above the inline threshold on a machine many times faster.
    return load_model(om.cnn(tmp_path_factory.mktemp("c") / "cnn.onnx", size=256, filters=64))


def rows(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, 4)).astype(np.float32) for _ in range(n)]


def run(test: Callable[[ThreadPoolExecutor], Awaitable[Any]]) -> Any:
    pool = ThreadPoolExecutor(2, thread_name_prefix="inference")
    try:
        return asyncio.run(test(pool))
    finally:
        pool.shutdown(wait=True)


def make(model: LoadedModel, pool: ThreadPoolExecutor, **options: Any) -> Batcher:
    batcher = Batcher(model, executor=pool, metrics=ModelMetrics(), **options)
    batcher.start()
    return batcher


def test_it_runs_a_cheap_model_on_the_loop_and_a_costly_one_in_the_pool(mlp: LoadedModel, cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        cheap, costly = make(mlp, pool), make(cnn, pool)
        assert cheap.runs_inline
        assert not costly.runs_inline
        # With no thread to run on, only the inline batcher can answer.
        pool.shutdown(wait=True)
        [x] = rows(1)
        [y] = await cheap.submit({"x": x})
        np.testing.assert_allclose(y, om.mlp_expected(x), rtol=1e-5)
        image = np.zeros((1, 3, 256, 256), dtype=np.float32)
        with pytest.raises(ModelUnavailable, match="stopping"):
            await costly.submit({"x": image})

    run(go)


def test_it_starts_a_lone_request_in_the_pool_before_submit_returns(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(cnn, pool, max_queue_delay_ms=0, inline_below_ms=0)
        image = np.random.default_rng(3).normal(size=(1, 3, 256, 256)).astype(np.float32)
        future = batcher.submit({"x": image})
        # Already handed to a worker thread: no queue hop, no waiting for company.
        assert batcher.metrics.batches == 1
        assert batcher.metrics.queue_depth == 0
        [y] = await future
        np.testing.assert_allclose(y, cnn.run({"x": image})[0], rtol=1e-4, atol=1e-5)

    run(go)


def test_it_runs_a_lone_request_on_the_loop_in_the_same_turn(mlp: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(mlp, pool, max_queue_delay_ms=0)
        [x] = rows(1)
        future = batcher.submit({"x": x})
        await asyncio.sleep(0)  # one turn of the loop
        assert future.done()
        np.testing.assert_allclose(future.result()[0], om.mlp_expected(x), rtol=1e-5)

    run(go)


def test_it_batches_what_arrives_while_a_batch_runs(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(cnn, pool, max_batch_size=8, inline_below_ms=0)
        rng = np.random.default_rng(5)
        images = [rng.normal(size=(1, 3, 256, 256)).astype(np.float32) for _ in range(6)]
        futures = [batcher.submit({"x": image}) for image in images]
        outputs = await asyncio.gather(*futures)
        # The first started alone at once; the five that queued behind it ran as one batch.
        assert batcher.metrics.batches == 2
        assert batcher.metrics.batch_size.total == 6
        for image, [y] in zip(images, outputs, strict=True):
            np.testing.assert_allclose(y, cnn.run({"x": image})[0], rtol=1e-4, atol=1e-5)

    run(go)


def test_it_batches_the_requests_of_one_turn_on_the_loop(mlp: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(mlp, pool, max_batch_size=4)
        xs = rows(6, seed=1)
        outputs = await asyncio.gather(*(batcher.submit({"x": x}) for x in xs))
        # All six arrived in one turn: one full batch of four, then the other two.
        assert batcher.metrics.batches == 2
        assert batcher.metrics.batch_size.counts[batcher.metrics.batch_size.buckets.index(4)] == 1
        for x, [y] in zip(xs, outputs, strict=True):
            np.testing.assert_allclose(y, om.mlp_expected(x), rtol=1e-5)

    run(go)


def test_it_moves_a_model_off_the_loop_once_its_batches_turn_slow(mlp: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(mlp, pool, inline_below_ms=0.5)
        assert batcher.runs_inline
        big = np.random.default_rng(2).normal(size=(400_000, 4)).astype(np.float32)
        for _ in range(4):
            [y] = await batcher.submit({"x": big})
        assert y.shape == (400_000, 3)
        assert not batcher.runs_inline, f"a batch takes {batcher.batch_seconds * 1000:.2f} ms"

    run(go)


def test_it_holds_a_lone_request_for_the_queue_delay_and_no_longer(mlp: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(mlp, pool, max_queue_delay_ms=200, max_batch_size=4)
        loop = asyncio.get_running_loop()
        started = loop.time()
        [x] = rows(1)
        await batcher.submit({"x": x})
        assert 0.19 <= loop.time() - started < 1.0
        # A full batch does not wait for the delay.
        started = loop.time()
        await asyncio.gather(*(batcher.submit({"x": x}) for x in rows(4)))
        assert loop.time() - started < 0.15
        assert batcher.metrics.batches == 2

    run(go)


def test_it_finishes_queued_requests_on_close_and_then_refuses(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(cnn, pool, inline_below_ms=0)
        image = np.zeros((1, 3, 256, 256), dtype=np.float32)
        futures = [batcher.submit({"x": image}) for _ in range(3)]
        await batcher.close()
        assert all(f.done() and f.exception() is None for f in futures)
        with pytest.raises(ModelUnavailable):
            batcher.submit({"x": image})

    run(go)


def test_it_fails_only_the_request_the_model_cannot_process(tmp_path: Path) -> None:
    model = load_model(om.gather(tmp_path / "gather.onnx"))

    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(model, pool)
        x = np.arange(16, dtype=np.float32).reshape(4, 4)
        futures = [batcher.submit({"x": x[i:i + 1], "idx": np.array([[7 if i == 2 else i]], dtype=np.int64)})
                   for i in range(4)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[2], Exception)
        for i in (0, 1, 3):
            assert not isinstance(results[i], BaseException)
            assert results[i][0].tolist() == [[x[i, i]]]

    run(go)


def test_it_runs_up_to_instances_batches_side_by_side(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        image = np.random.default_rng(7).normal(size=(1, 3, 256, 256)).astype(np.float32)
        one, two = make(cnn, pool, inline_below_ms=0, instances=1), make(cnn, pool, inline_below_ms=0, instances=2)
        futures = [one.submit({"x": image}), one.submit({"x": image})]
        # One instance: the second request waits for the first batch.
        assert one.metrics.batches == 1 and one.metrics.queue_depth == 1
        futures += [two.submit({"x": image}), two.submit({"x": image})]
        # Two instances: both requests are on their way at once.
        assert two.metrics.batches == 2 and two.metrics.queue_depth == 0
        expected = cnn.run({"x": image})[0]
        for [y] in await asyncio.gather(*futures):
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)

    run(go)


def test_a_worker_starts_the_next_batch_while_the_loop_is_busy(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(cnn, pool, inline_below_ms=0, max_batch_size=1)
        image = np.zeros((1, 3, 256, 256), dtype=np.float32)
        futures = [batcher.submit({"x": image}) for _ in range(3)]
        assert batcher.metrics.batches == 1
        # The loop does not turn while it sleeps: whatever ran meanwhile was
        # started by the worker that finished the batch before it.
        deadline = time.monotonic() + 30
        while batcher.metrics.batches < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.metrics.batches == 3 and batcher.metrics.queue_depth == 0
        assert not any(f.done() for f in futures)  # answers are handed over on the loop only
        await asyncio.gather(*futures)

    run(go)


def test_a_busy_model_lets_another_have_the_pool(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        busy, other = make(cnn, pool, inline_below_ms=0, max_batch_size=1), make(cnn, pool, inline_below_ms=0)
        image = np.zeros((1, 3, 256, 256), dtype=np.float32)
        finished: list[str] = []
        # Enough one-row batches to outlast many drain slices on any machine, also
        # when a loaded machine makes the thread's CPU time lag its wall time.
        assert DRAIN_SLICE_S <= 0.05
        count = max(8, int(1.0 / max(cnn.warm_run_seconds, 1e-4)))
        queued = [busy.submit({"x": image}) for _ in range(count)]
        queued[-1].add_done_callback(lambda _: finished.append("busy"))
        await asyncio.sleep(0)
        await other.submit({"x": image})
        finished.append("other")
        await asyncio.gather(*queued)
        # The other model did not wait for the whole queue of the busy one.
        assert finished == ["other", "busy"]

    one_thread = ThreadPoolExecutor(1, thread_name_prefix="inference")
    try:
        asyncio.run(go(one_thread))
    finally:
        one_thread.shutdown(wait=True)


def test_close_answers_what_every_instance_holds(cnn: LoadedModel) -> None:
    async def go(pool: ThreadPoolExecutor) -> None:
        batcher = make(cnn, pool, inline_below_ms=0, instances=2)
        image = np.zeros((1, 3, 256, 256), dtype=np.float32)
        futures = [batcher.submit({"x": image}) for _ in range(5)]
        await batcher.close()
        assert all(f.done() and f.exception() is None for f in futures)

    run(go)


def test_instances_must_be_at_least_one(mlp: LoadedModel) -> None:
    with pytest.raises(ValueError, match="instances must be at least 1"):
        Batcher(mlp, executor=ThreadPoolExecutor(1), metrics=ModelMetrics(), instances=0)

"""The node's telemetry: figures from real metrics and /proc, the SQLite store-and-forward queue with its
disk budget and gap records, and the send session against a real loopback websocket server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import serve

from edge_runtime import protocol
from edge_runtime.serving.metrics import Metrics, read_series
from edge_runtime.telemetry import (
    ModelSampler,
    ResourceSampler,
    Telemetry,
    TelemetryQueue,
    histogram_quantile,
    read_queue_stats,
)

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _point(seq: int, at: dt.datetime | None = None) -> protocol.TelemetryPoint:
    return protocol.TelemetryPoint(seq=seq, at=at or T0 + dt.timedelta(seconds=seq), interval_s=1.0,
                                   resources=protocol.NodeResources(cpu_percent=50.0))


def _put(queue: TelemetryQueue, n: int) -> list[int]:
    return [queue.put(lambda seq: _point(seq)).seq for _ in range(n)]


def test_it_numbers_points_on_from_where_it_stopped_after_a_restart(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "t.sqlite3")
    assert _put(queue, 3) == [1, 2, 3]
    queue.ack(2)
    queue.close()

    queue = TelemetryQueue(tmp_path / "t.sqlite3")
    assert _put(queue, 2) == [4, 5]
    assert [i.seq for i in queue.pending(after=queue.acked_seq)] == [3, 4, 5]
    assert [json.loads(i.body)["seq"] for i in queue.pending(after=3, max_items=1)] == [4]


def test_it_moves_past_numbers_the_control_plane_already_holds(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "t.sqlite3")
    _put(queue, 2)
    # A state directory restored from an old backup: the control plane has seen up to 40.
    queue.ack(40)
    assert queue.pending(after=0) == []
    assert _put(queue, 1) == [41]


def test_it_replaces_the_oldest_points_by_a_gap_when_the_budget_runs_out(tmp_path: Path) -> None:
    size = len(_point(1).model_dump_json())
    queue = TelemetryQueue(tmp_path / "t.sqlite3", budget_bytes=max(4096, 10 * size))
    produced = queue.budget_bytes // size + 7
    _put(queue, produced)

    stats = queue.stats()
    lost = produced - stats.pending_points
    # Every point not held is counted in the one gap, and as many as the budget demanded (points grow a
    # byte as their numbers get longer, so a few more than 7 may have had to go).
    assert 7 <= lost <= 9 and stats.lost_points == lost
    assert stats.gaps == [(1, lost, lost)]
    assert stats.pending_bytes <= queue.budget_bytes < stats.pending_bytes + size
    items = [json.loads(i.body) for i in queue.pending(after=0, max_items=500, max_bytes=10**9)]
    gap = protocol.TelemetryGap.model_validate(items[0])
    assert (gap.seq, gap.last_seq, gap.count) == (1, lost, lost)
    assert (gap.start, gap.end) == (T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=lost))
    # The points that stayed follow the gap, in order, with none missing.
    assert [i["seq"] for i in items[1:]] == list(range(lost + 1, produced + 1))
    queue.close()
    assert read_queue_stats(tmp_path / "elsewhere") is None
    assert read_queue_stats(tmp_path) is None  # the status command looks for telemetry.sqlite3 only
    assert TelemetryQueue(tmp_path / "t.sqlite3", budget_bytes=4096).stats().lost_points == lost


def test_it_starts_a_new_gap_after_one_was_delivered(tmp_path: Path) -> None:
    size = len(_point(1).model_dump_json())
    queue = TelemetryQueue(tmp_path / "t.sqlite3", budget_bytes=max(4096, 10 * size))
    first = queue.budget_bytes // size + 2
    _put(queue, first)
    lost_before = queue.stats().lost_points
    queue.ack(first)  # all delivered, the gap with them
    _put(queue, first)
    stats = queue.stats()
    [(start, end, count)] = stats.gaps
    assert start == first + 1 and count == first - stats.pending_points
    assert stats.lost_points == lost_before + count


def test_it_refuses_a_budget_too_small_to_hold_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 4096 bytes"):
        TelemetryQueue(tmp_path / "t.sqlite3", budget_bytes=100)


def test_it_reads_percentiles_from_histogram_buckets() -> None:
    bounds = (0.001, 0.01, 0.1)
    assert histogram_quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.0055)
    assert histogram_quantile(0.95, bounds, [90, 0, 10, 0]) == pytest.approx(0.055)
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 4]) == 0.1  # past the last bound: the last bound
    assert histogram_quantile(0.5, bounds, [0, 0, 0, 0]) is None


def test_it_reports_each_interval_of_a_model_from_the_servers_own_metrics() -> None:
    metrics = Metrics()
    series = metrics.of("resnet", "1")
    sampler = ModelSampler(lambda: read_series(metrics))
    for _ in range(10):
        series.requests += 1
        series.latency.observe(0.004)
    series.errors += 2
    series.batches += 2
    series.batch_size.observe(4)
    series.batch_size.observe(6)
    series.queue_depth = 3
    [first] = sampler.sample()
    assert (first.requests, first.errors, first.batches, first.queue_depth) == (10, 2, 2, 3)
    assert first.batch_size_mean == 5.0
    assert first.latency_p50_ms is not None and 2.5 <= first.latency_p50_ms <= 5.0

    series.requests += 1
    series.latency.observe(0.2)
    [second] = sampler.sample()
    # Only what happened since the previous sample.
    assert (second.requests, second.errors, second.batches) == (1, 0, 0)
    assert second.latency_p95_ms is not None and second.latency_p95_ms > 100
    assert metrics.snapshot("other", "1") is None  # reading created no series


def test_it_measures_the_machine_from_proc(tmp_path: Path) -> None:
    sampler = ResourceSampler(tmp_path)
    sum(i * i for i in range(200_000))  # some CPU time between the two readings
    r = sampler.sample(inference_queue_depth=2, telemetry_backlog=5)
    assert 0 <= r.cpu_percent <= 100
    assert 0 < r.memory_used_mb < r.memory_total_mb
    assert 0 < r.disk_used_mb < r.disk_total_mb
    assert (r.inference_queue_depth, r.telemetry_backlog) == (2, 5)


def test_it_sends_what_waits_in_order_and_forgets_it_once_acknowledged(tmp_path: Path) -> None:
    """Against a real websocket server playing the control plane: it already holds up to 2, acks each frame."""
    queue = TelemetryQueue(tmp_path / "t.sqlite3")
    telemetry = Telemetry(queue, interval_s=0.1, disk_path=tmp_path)
    for _ in range(5):
        telemetry.collect_once()
    received: list[int] = []

    async def control_plane(ws: Any) -> None:
        held = 2
        async for message in ws:
            frame = protocol.TelemetryFrame.model_validate_json(message)
            received.extend(item.seq for item in frame.items if item.seq > held)
            held = max(held, frame.items[-1].last_seq)
            await ws.send(protocol.TelemetryAck(seq=held).model_dump_json())

    async def scenario() -> None:
        async with serve(control_plane, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
                async def receive() -> None:
                    async for message in ws:
                        telemetry.on_ack(protocol.TelemetryAck.model_validate_json(message))

                tasks = [asyncio.create_task(receive()), asyncio.create_task(telemetry.run_session(ws.send))]
                deadline = asyncio.get_running_loop().time() + 10
                while queue.acked_seq < 5 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
                telemetry.collect_once()  # a point taken while connected goes at once
                while queue.acked_seq < 6 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert received == [3, 4, 5, 6]
    assert queue.stats().pending_points == 0 and queue.acked_seq == 6

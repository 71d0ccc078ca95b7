"""Realtime sends on the real Redis channel layer: a publish to many nodes nudges every one of them, in batches."""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import threading
from typing import Any, ClassVar

import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from audit.services import Actor
from edge_runtime import protocol, signing
from orchestrator import keys
from orchestrator.desired_state import desired_state_publish_many
from orchestrator.realtime import (
    NUDGE_BATCH,
    SEND_CONCURRENCY,
    broadcast,
    broadcast_many,
    nudge_messages,
    nudge_texts,
)
from sites.models import Node, Site
from sites.nudges import Dispatcher

NODES = 1200  # more than one batch (NUDGE_BATCH)
# A deployment bounds its Redis connections (the pool's max_connections, the
# server's maxclients); well above what the sends may hold at once, far below
# one connection per node.
POOL_LIMIT = 32


def _capped(config: dict[str, Any]) -> dict[str, Any]:
    capped = copy.deepcopy(config)
    capped["default"]["CONFIG"]["hosts"] = [{**host, "max_connections": POOL_LIMIT}
                                            for host in capped["default"]["CONFIG"]["hosts"]]
    return capped


class StreamProcess(threading.Thread):
    """Another control-plane process holding some nodes' streams, through the real dispatcher (sites.nudges).

    It receives while the publish sends, as a running ASGI server does, and keeps every text each stream is
    handed until it is told to stop.
    """

    def __init__(self, config: dict[str, Any], node_uuids: list[str]) -> None:
        super().__init__(daemon=True)
        self.config, self.node_uuids = config, node_uuids
        self.ready = threading.Event()
        self.received: dict[str, list[str]] = {node_uuid: [] for node_uuid in node_uuids}
        self.error: BaseException | None = None
        self.dispatcher: Dispatcher | None = None
        self._stop_at: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop, self._stop_at = asyncio.get_running_loop(), asyncio.Event()
        layer = RedisChannelLayer(**self.config["default"]["CONFIG"])
        self.dispatcher = Dispatcher(layer)
        for key, node_uuid in enumerate(self.node_uuids):
            async def send(text: str, node_uuid: str = node_uuid) -> None:
                self.received[node_uuid].append(text)

            await self.dispatcher.add(node_uuid, key, send)
        self.ready.set()
        await self._stop_at.wait()
        for key, node_uuid in enumerate(self.node_uuids):
            await self.dispatcher.remove(node_uuid, key)
        assert self.dispatcher.channel is None  # the last stream gone, it left the group
        await layer.close_pools()

    def stop(self) -> None:
        assert self._loop is not None and self._stop_at is not None
        self._loop.call_soon_threadsafe(self._stop_at.set)
        self.join(timeout=30)


def _nodes(site: Site, count: int) -> list[Node]:
    Node.objects.bulk_create(Node(site=site, name=f"pos-{i}", credential_hash=secrets.token_hex(32))
                             for i in range(count))
    return list(Node.objects.filter(site=site).select_related("site"))


def _settled(streams: list[StreamProcess], expected: int, timeout: float = 30) -> None:
    deadline = threading.Event()
    waited = 0.0
    while sum(len(v) for s in streams for v in s.received.values()) < expected and waited < timeout:
        deadline.wait(0.05)
        waited += 0.05
    # Anything sent twice would arrive right behind the first copy.
    deadline.wait(0.5)


@pytest.mark.django_db
def test_it_nudges_every_node_of_a_large_publish_exactly_once_in_batches(
    site_berlin: Site, settings: Any, caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: Any,
) -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert SEND_CONCURRENCY < POOL_LIMIT
    config = _capped(settings.CHANNEL_LAYERS)
    settings.CHANNEL_LAYERS = config
    nodes = _nodes(site_berlin, NODES)
    uuids = [str(node.uuid) for node in nodes]
    # Two serving processes, each holding half the streams (and one node with a second stream of its own).
    streams = [StreamProcess(config, uuids[0::2] + uuids[1:2]), StreamProcess(config, uuids[1::2])]
    for stream in streams:
        stream.start()
        assert stream.ready.wait(60) and stream.error is None, stream.error
    caplog.set_level(logging.INFO, logger="orchestrator.realtime")
    caplog.set_level(logging.INFO, logger="channels_redis")
    try:
        with django_capture_on_commit_callbacks(execute=True):
            published = desired_state_publish_many(nodes=nodes, actor=Actor.system("test"))
        _settled(streams, NODES + 1)
    finally:
        for stream in streams:
            stream.stop()
    assert all(stream.error is None for stream in streams), [s.error for s in streams]

    key = signing.public_key_from_b64(keys.public_key_b64())
    for stream in streams:
        missing = [u for u, texts in stream.received.items() if not texts]
        assert not missing, f"{len(missing)} of {len(stream.received)} streams got no nudge"
        for node_uuid, texts in stream.received.items():
            assert len(texts) == 1, f"{node_uuid} got {len(texts)} nudges"
            nudge = protocol.Nudge.model_validate_json(texts[0])
            assert nudge.desired is not None
            state = signing.verify_desired_state(nudge.desired, key)
            assert state.node_id == node_uuid and nudge.generation == state.generation
            # Their reports spread at the rate set, within one interval.
            assert nudge.report_within_s == pytest.approx(min(NODES / settings.NUDGE_REPORTS_PER_S,
                                                              settings.SYNC_INTERVAL_S))
    # Every process got every batch, not a message per node: a few messages for the whole publish.
    texts = {u: t[0] for stream in reversed(streams) for u, t in stream.received.items()}
    batches = len(nudge_messages({u: texts[u] for u in uuids}))
    assert -(-NODES // NUDGE_BATCH) <= batches <= 5
    assert all(stream.dispatcher is not None and stream.dispatcher.messages == batches for stream in streams)
    assert {n.pk: n for n in nodes}.keys() == published.keys()
    sends = [r.getMessage() for r in caplog.records if r.name.startswith(("orchestrator.realtime", "channels_redis"))]
    assert sends == []


def test_a_nudge_too_large_to_push_goes_without_its_state() -> None:
    big = protocol.SignedDesiredState(payload="x" * protocol.MAX_NUDGE_BYTES, signature="s", key_fingerprint="f")
    texts = nudge_texts({"a": protocol.Nudge(generation=3, desired=big, report_within_s=4.0),
                         "b": protocol.Nudge(generation=5)})
    a = protocol.Nudge.model_validate_json(texts["a"])
    assert a.generation == 3 and a.desired is None and a.report_within_s == 0  # the node syncs for it at once
    assert len(nudge_messages(texts)) == 1
    many = {f"n{i}": protocol.Nudge(generation=i).model_dump_json() for i in range(2 * NUDGE_BATCH + 1)}
    batches = [m["nudges"] for _, m in nudge_messages(many)]
    assert [len(b) for b in batches] == [NUDGE_BATCH, NUDGE_BATCH, 1]
    assert [pair for b in batches for pair in b] == [[k, v] for k, v in many.items()]


class FlakyLayer(InMemoryChannelLayer):
    """A channel layer whose sends to some groups fail: a fault the real Redis cannot be made to show on cue."""

    fail_times: ClassVar[dict[str, int]] = {}
    delivered: ClassVar[list[str]] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if self.fail_times.get(group, 0) > 0:
            self.fail_times[group] -= 1
            raise ConnectionError("Too many connections")
        self.delivered.append(group)


@pytest.fixture
def flaky(settings: Any) -> type[FlakyLayer]:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": f"{__name__}.FlakyLayer"}}
    FlakyLayer.fail_times, FlakyLayer.delivered = {}, []
    return FlakyLayer


@pytest.mark.django_db
@pytest.mark.parametrize("fails", [1, 2])
def test_it_retries_a_failed_send_once_and_logs_what_is_lost_with_counts(
    flaky: type[FlakyLayer], caplog: pytest.LogCaptureFixture, fails: int, django_capture_on_commit_callbacks: Any
) -> None:
    groups = [f"node-{i}" for i in range(10)]
    flaky.fail_times = {"node-3": fails, "node-7": fails}
    caplog.set_level(logging.INFO, logger="orchestrator.realtime")
    with django_capture_on_commit_callbacks(execute=True):
        broadcast_many([(group, "node.nudge", {"generation": 1}) for group in groups])
    records = [r for r in caplog.records if r.name == "orchestrator.realtime"]
    messages = [r.getMessage() for r in records]
    assert messages[0].startswith("could not broadcast 2 of 10 messages (Too many connections); retrying them once")
    if fails == 1:
        assert sorted(flaky.delivered) == sorted(groups)
        assert messages[1:] == ["broadcast the 2 messages that had failed on the retry"]
    else:
        assert sorted(flaky.delivered) == sorted(set(groups) - {"node-3", "node-7"})
        assert messages[1].startswith("could not broadcast 2 of 10 messages after a retry (Too many connections)")
        assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR]


@pytest.mark.django_db
def test_it_retries_a_single_broadcast_too(flaky: type[FlakyLayer], django_capture_on_commit_callbacks: Any) -> None:
    flaky.fail_times = {"fleet": 1}
    with django_capture_on_commit_callbacks(execute=True):
        broadcast("fleet", "fleet.changed", {"site": "x"})
    assert flaky.delivered == ["fleet"]

"""Realtime sends on the real Redis channel layer: a publish to many nodes nudges every one of them."""

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
from orchestrator.desired_state import desired_state_publish_many
from orchestrator.realtime import SEND_CONCURRENCY, broadcast, broadcast_many, node_group
from sites.models import Node, Site

NODES = 500
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
    """Another control-plane process holding every node's stream: one channel per node, in its node's group.

    It receives while the publish sends, as a running ASGI server does, and
    keeps every message that arrives on each channel until it is told to stop.
    """

    def __init__(self, config: dict[str, Any], groups: list[str]) -> None:
        super().__init__(daemon=True)
        self.config, self.groups = config, groups
        self.ready = threading.Event()
        self.received: dict[str, list[dict[str, Any]]] = {group: [] for group in groups}
        self.error: BaseException | None = None
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
        channels = {}
        for group in self.groups:
            channels[group] = await layer.new_channel()
            await layer.group_add(group, channels[group])
        self.ready.set()

        async def listen(group: str) -> None:
            while True:
                self.received[group].append(await layer.receive(channels[group]))

        tasks = [asyncio.create_task(listen(group)) for group in self.groups]
        await self._stop_at.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for group in self.groups:
            await layer.group_discard(group, channels[group])
        await layer.close_pools()

    def stop(self) -> None:
        assert self._loop is not None and self._stop_at is not None
        self._loop.call_soon_threadsafe(self._stop_at.set)
        self.join(timeout=30)


def _nodes(site: Site, count: int) -> list[Node]:
    Node.objects.bulk_create(Node(site=site, name=f"pos-{i}", credential_hash=secrets.token_hex(32))
                             for i in range(count))
    return list(Node.objects.filter(site=site).select_related("site"))


def _settled(stream: StreamProcess, expected: int, timeout: float = 30) -> None:
    deadline = threading.Event()
    waited = 0.0
    while sum(len(v) for v in stream.received.values()) < expected and waited < timeout:
        deadline.wait(0.05)
        waited += 0.05
    # Anything sent twice would arrive right behind the first copy.
    deadline.wait(0.5)


@pytest.mark.django_db
def test_it_nudges_every_node_of_a_large_publish_exactly_once(
    site_berlin: Site, settings: Any, caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: Any,
) -> None:
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert SEND_CONCURRENCY < POOL_LIMIT
    config = _capped(settings.CHANNEL_LAYERS)
    settings.CHANNEL_LAYERS = config
    nodes = _nodes(site_berlin, NODES)
    stream = StreamProcess(config, [node_group(node.uuid) for node in nodes])
    stream.start()
    assert stream.ready.wait(60) and stream.error is None, stream.error
    caplog.set_level(logging.INFO, logger="orchestrator.realtime")
    caplog.set_level(logging.INFO, logger="channels_redis")
    try:
        with django_capture_on_commit_callbacks(execute=True):
            published = desired_state_publish_many(nodes=nodes, actor=Actor.system("test"))
        _settled(stream, NODES)
    finally:
        stream.stop()
    assert stream.error is None, stream.error

    expected = {node_group(node.uuid): [{"type": "node_nudge", "event": "node.nudge",
                                         "payload": {"generation": published[node.pk].generation}}]
                for node in nodes}
    received = {group: [{k: v for k, v in m.items() if k != "__asgi_channel__"} for m in messages]
                for group, messages in stream.received.items()}
    missing = [group for group, messages in received.items() if not messages]
    assert not missing, f"{len(missing)} of {NODES} nodes got no nudge"
    assert received == expected
    sends = [r.getMessage() for r in caplog.records if r.name.startswith(("orchestrator.realtime", "channels_redis"))]
    assert sends == []


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

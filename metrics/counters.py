"""Counters shared by every control-plane process: requests handled and node syncs.

Several ASGI processes serve behind a load balancer, and Prometheus scrapes
whichever one it reaches: a counter kept in a process's memory would show that
process's share only, and start again from zero whenever the process does. So
the counters are Redis hashes (``REDIS_URL``), added to with ``HINCRBY`` and
``HINCRBYFLOAT`` (atomic, so no increment of one process overwrites another's)
in one pipelined round trip per request, and read in one round trip per scrape.
Their keys sit under the installation's Celery queue name
(``EDGEWISE_CELERY_QUEUE``), which is already unique to each installation that
shares a Redis (two sharing one queue would take each other's tasks).

An embedded install (no ``REDIS_URL``) runs a single web process, so its
counters live in that process's memory and start from zero when it restarts.

Counting never fails a request: when Redis cannot be reached the increment is
dropped and logged (at most once a minute), and a scrape answers 503 instead
of showing counters that went backwards.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import threading
import time
import weakref
from collections import defaultdict
from typing import Protocol

import redis
import redis.asyncio
from django.conf import settings

logger = logging.getLogger("edgewise.metrics")

HTTP = "http"  # field "<route>|<status class>": requests handled
SYNC = "sync"  # fields "outcome:<outcome>", "le:<bound>" (one bucket, not cumulative) and "sum": node syncs
SYNC_ROUTE = "agent:node-sync"  # the URL name of POST /agent/v1/nodes/<uuid>/sync
UNMATCHED = "unmatched"  # the route of a request no URL pattern matched (its path is never a label)
SYNC_OUTCOMES = ("ok", "refused", "error")
# Upper bounds, in seconds, of the sync duration histogram's buckets.
SYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INF = "+Inf"
# A Redis that does not answer must not hold every request up: fail fast, count nothing.
REDIS_TIMEOUT_S = 0.5
_WARN_EVERY_S = 60.0

Increment = tuple[str, str, int | float]  # (hash, field, amount)


class Store(Protocol):
    def add(self, increments: list[Increment]) -> None: ...

    def read(self, names: tuple[str, ...]) -> dict[str, dict[str, float]]: ...

    def clear(self) -> None: ...


def counter_key(prefix: str, name: str) -> str:
    return f"{prefix}:metrics:{name}"


class RedisStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    def _key(self, name: str) -> str:
        return counter_key(self.prefix, name)

    def add(self, increments: list[Increment]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, field, amount in increments:
            if isinstance(amount, int):
                pipe.hincrby(self._key(name), field, amount)
            else:
                pipe.hincrbyfloat(self._key(name), field, amount)
        pipe.execute()

    def read(self, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._key(name))
        rows = pipe.execute()
        return {name: {k.decode(): float(v) for k, v in row.items()} for name, row in zip(names, rows, strict=True)}

    def clear(self) -> None:
        self.client.delete(self._key(HTTP), self._key(SYNC))


class LocalStore:
    """The counters of an embedded install's one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, increments: list[Increment]) -> None:
        with self._lock:
            for name, field, amount in increments:
                self._hashes[name][field] += amount

    def read(self, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: dict(self._hashes.get(name, {})) for name in names}

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()


_local = LocalStore()
_last_warned = 0.0


@functools.cache
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL for the process; safe to share between threads."""
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)


def store() -> Store:
    if settings.REDIS_URL:
        return RedisStore(redis_client(settings.REDIS_URL), settings.CELERY_TASK_DEFAULT_QUEUE)
    return _local


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def sync_outcome(status: int) -> str:
    """ok: answered; refused: the node's request was turned down (4xx); error: the control plane failed (5xx)."""
    if status >= 500:
        return "error"
    return "refused" if status >= 400 else "ok"


def sync_bucket(seconds: float) -> str:
    """The field of the one bucket ``seconds`` falls in: the smallest bound at or above it."""
    i = bisect.bisect_left(SYNC_BUCKETS, seconds)
    return f"le:{SYNC_BUCKETS[i]}" if i < len(SYNC_BUCKETS) else f"le:{INF}"


# The paths a sync's answer names in its protocol.SYNC_PATH_HEADER (sites.agent_api).
SYNC_PATHS = ("quiet", "full", "report-wanted")


def _increments(*, route: str, status: int, seconds: float, sync_path: str) -> list[Increment]:
    increments: list[Increment] = [(HTTP, f"{route}|{status_class(status)}", 1)]
    if route == SYNC_ROUTE:
        increments += [(SYNC, f"outcome:{sync_outcome(status)}", 1), (SYNC, sync_bucket(seconds), 1),
                       (SYNC, "sum", float(seconds))]
        if sync_path in SYNC_PATHS:
            increments.append((SYNC, f"path:{sync_path}", 1))
    return increments


def _dropped(exc: Exception) -> None:
    global _last_warned
    if time.monotonic() - _last_warned > _WARN_EVERY_S:
        _last_warned = time.monotonic()
        logger.warning("metrics: counters not written, Redis cannot be reached (%s); dropping them", exc)


def request_count(*, route: str, status: int, seconds: float, sync_path: str = "") -> None:
    """Count one request answered ``status`` by ``route`` (a URL name), and, for a node's sync, its outcome and
    duration. Never raises for Redis: a lost increment is logged, the request goes on."""
    try:
        store().add(_increments(route=route, status=status, seconds=seconds, sync_path=sync_path))
    except redis.RedisError as exc:
        _dropped(exc)


# One asyncio client per event loop (its connections belong to the loop that opened them).
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, redis.asyncio.Redis]] = (
    weakref.WeakKeyDictionary())


def _async_client() -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    held = _async_clients.get(loop)
    if held is None or held[0] != settings.REDIS_URL:
        held = (settings.REDIS_URL, redis.asyncio.Redis.from_url(
            settings.REDIS_URL, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S))
        _async_clients[loop] = held
    return held[1]


async def quiet_sync_count(seconds: float) -> None:
    """:func:`request_count` for a sync answered quietly on the event loop (``sites.quiet_asgi``)."""
    increments = _increments(route=SYNC_ROUTE, status=200, seconds=seconds, sync_path="quiet")
    if not settings.REDIS_URL:
        _local.add(increments)
        return
    try:
        pipe = _async_client().pipeline(transaction=False)
        for name, field, amount in increments:
            key = counter_key(settings.CELERY_TASK_DEFAULT_QUEUE, name)
            if isinstance(amount, int):
                pipe.hincrby(key, field, amount)
            else:
                pipe.hincrbyfloat(key, field, amount)
        await pipe.execute()
    except (redis.RedisError, OSError) as exc:
        _dropped(exc)


def counters_read() -> dict[str, dict[str, float]]:
    """Every counter hash, as one scrape sees them. Raises redis.RedisError when Redis cannot be reached."""
    return store().read((HTTP, SYNC))

"""Quiet syncs: an unchanged sync answered from Redis, and heartbeats kept there until they are flushed.

A node's sync that reports what it reported last time (the same report digest, ``protocol.report_digest``),
has applied the desired state it was last answered with and was heard from recently changes nothing in
PostgreSQL but the time it was heard. So after every sync that took the whole path, the control plane keeps a
*snapshot* of what that sync settled in a Redis hash per node; the next sync that matches it in every part is
answered by one Lua script (:func:`quiet_answer`), which also records its heartbeat. Heartbeats are written to
PostgreSQL in batches (``sites.heartbeats``).

The snapshot is trusted only while nothing changed for the node since it was taken:

* every change that concerns a node (a desired state published, a query for it, its revocation, a status the
  liveness sweep stored) calls :func:`attention` after its commit, which bumps the node's version ``v``;
* a snapshot is written only if ``v`` is what it was when the sync that takes it began (:func:`begin` and
  :func:`remember`), so a change that commits while a sync is under way is never covered by that sync's
  snapshot;
* :func:`forget_all` (new epoch, new signing key) bumps one estate-wide version every snapshot names;
* a node's hash expires ``QUIET_SYNC_TTL_S`` after its last full sync, so every node takes the whole path at
  least that often whatever was missed.

Without Redis (``REDIS_URL`` unset), or when Redis cannot be reached, every sync takes the whole path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import weakref
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio
from django.conf import settings
from django.db import transaction

logger = logging.getLogger("edgewise.quiet")

REDIS_TIMEOUT_S = 0.5

# KEYS: node hash, heartbeat hash, estate-wide version. ARGV: credential hash, digest, applied generation,
# applied epoch, now (epoch seconds), stale after (s), heartbeat payload, node uuid.
# Returns the snapshot's generation when the sync is quiet (its heartbeat recorded), else false.
_ANSWER = """
local s = redis.call('HMGET', KEYS[1], 'c', 'd', 'g', 'e', 'sv', 'v', 'sa', 't')
if not s[1] then return false end
local all = redis.call('GET', KEYS[3]) or '0'
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] or s[3] ~= ARGV[3] or s[4] ~= ARGV[4] then return false end
if s[5] ~= (s[6] or '0') or s[7] ~= all then return false end
if tonumber(ARGV[5]) - tonumber(s[8] or '0') > tonumber(ARGV[6]) then return false end
redis.call('HSET', KEYS[1], 't', ARGV[5])
redis.call('HSET', KEYS[2], ARGV[8], ARGV[7])
return s[3]
"""

# KEYS: node hash, estate-wide version. ARGV: the version begin() read, then field/value pairs, then the TTL.
# Writes the snapshot only if the node's version is still the one read when its sync began.
_REMEMBER = """
local v = redis.call('HGET', KEYS[1], 'v') or '0'
if v ~= ARGV[1] then return 0 end
local fields = {'sv', v, 'sa', redis.call('GET', KEYS[2]) or '0'}
for i = 2, #ARGV - 1 do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[#ARGV])
return 1
"""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What a full sync settled for a node, which a quiet sync must match in every part."""

    credential_hash: str
    digest: str
    generation: int
    epoch: str


@dataclasses.dataclass(frozen=True)
class Begun:
    """What :func:`begin` read: the node's version, and when it was last heard from (None: not in Redis)."""

    version: str
    heard_at: float | None


def enabled() -> bool:
    return bool(settings.REDIS_URL) and settings.QUIET_SYNC


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                decode_responses=True)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


def _prefix() -> str:
    return f"{settings.CELERY_TASK_DEFAULT_QUEUE}:quiet"


def node_key(node_uuid: Any) -> str:
    return f"{_prefix()}:n:{node_uuid}"


def heartbeats_key() -> str:
    return f"{_prefix()}:hb"


def _all_key() -> str:
    return f"{_prefix()}:all"


@functools.cache
def _scripts(url: str) -> tuple[Any, Any]:
    c = _client(url)
    return c.register_script(_ANSWER), c.register_script(_REMEMBER)


def _answer_call(*, node_uuid: str, snapshot: Snapshot, now: float, heartbeat: dict[str, Any]) -> dict[str, list]:
    return {"keys": [node_key(node_uuid), heartbeats_key(), _all_key()],
            "args": [snapshot.credential_hash, snapshot.digest, snapshot.generation, snapshot.epoch,
                     repr(now), settings.NODE_STALE_AFTER_S, json.dumps(heartbeat), node_uuid]}


def quiet_answer(*, node_uuid: str, snapshot: Snapshot, now: float, heartbeat: dict[str, Any]) -> int | None:
    """The generation to answer a quiet sync with (its heartbeat recorded), or None: take the whole path."""
    answer, _ = _scripts(settings.REDIS_URL)
    try:
        result = answer(**_answer_call(node_uuid=node_uuid, snapshot=snapshot, now=now, heartbeat=heartbeat))
    except redis.RedisError as exc:
        logger.warning("quiet sync check failed (%s); taking the whole path", exc)
        return None
    return None if result is None else int(result)


# One asyncio client per event loop (a client's connections belong to the loop that opened them).
_async_scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, Any]] = weakref.WeakKeyDictionary()


def _async_answer_script() -> Any:
    loop = asyncio.get_running_loop()
    held = _async_scripts.get(loop)
    if held is None or held[0] != settings.REDIS_URL:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=REDIS_TIMEOUT_S,
                                              socket_connect_timeout=REDIS_TIMEOUT_S, decode_responses=True)
        held = (settings.REDIS_URL, client.register_script(_ANSWER))
        _async_scripts[loop] = held
    return held[1]


async def quiet_answer_async(*, node_uuid: str, snapshot: Snapshot, now: float,
                             heartbeat: dict[str, Any]) -> int | None:
    """:func:`quiet_answer` for an event loop: the same script, through an asyncio client."""
    try:
        result = await _async_answer_script()(
            **_answer_call(node_uuid=node_uuid, snapshot=snapshot, now=now, heartbeat=heartbeat))
    except (redis.RedisError, OSError) as exc:
        logger.warning("quiet sync check failed (%s); taking the whole path", exc)
        return None
    return None if result is None else int(result)


def begin(node_uuid: Any) -> Begun | None:
    """Read the node's version (and last heartbeat) before a full sync reads the database; None without Redis."""
    if not enabled():
        return None
    try:
        version, heard = client().hmget(node_key(node_uuid), ["v", "t"])
    except redis.RedisError as exc:
        logger.warning("quiet sync state unreadable (%s); this sync leaves no snapshot", exc)
        return None
    return Begun(version=str(version or "0"), heard_at=float(heard) if heard else None)


def remember(*, node_uuid: Any, begun: Begun, snapshot: Snapshot, heard_at: float) -> bool:
    """After a full sync committed: keep its snapshot, unless something changed for the node since it began."""
    _, remember_script = _scripts(settings.REDIS_URL)
    fields = ["c", snapshot.credential_hash, "d", snapshot.digest, "g", snapshot.generation,
              "e", snapshot.epoch, "t", repr(heard_at)]
    try:
        return bool(remember_script(keys=[node_key(node_uuid), _all_key()],
                                    args=[begun.version, *fields, int(settings.QUIET_SYNC_TTL_S)]))
    except redis.RedisError as exc:
        logger.warning("quiet sync snapshot not kept (%s)", exc)
        return False


def bump(node_uuids: list[str]) -> None:
    """:func:`attention` at once, for a caller whose reason to call it is already committed."""
    try:
        pipe = client().pipeline(transaction=False)
        for node_uuid in node_uuids:
            key = node_key(node_uuid)
            pipe.hincrby(key, "v", 1)
            pipe.expire(key, int(settings.QUIET_SYNC_TTL_S))
        pipe.execute()
    except redis.RedisError as exc:
        # Those nodes' snapshots may be kept until they expire: say so loudly.
        logger.error("could not mark %d node(s) as changed for quiet syncs (%s); their next syncs may be "
                     "answered from a snapshot until it expires (%ss)", len(node_uuids), exc,
                     int(settings.QUIET_SYNC_TTL_S))


def attention(node_uuids: Iterable[Any]) -> None:
    """These nodes' next syncs take the whole path: called for every change that concerns them, after commit."""
    uuids = [str(u) for u in node_uuids]
    if uuids and enabled():
        transaction.on_commit(lambda: bump(uuids))


def forget_all() -> None:
    """Every node's next sync takes the whole path (a new epoch or signing key), after commit."""
    if not enabled():
        return

    def retire() -> None:
        try:
            client().incr(_all_key())
        except redis.RedisError as exc:
            logger.error("could not retire the quiet sync snapshots (%s); they expire within %ss", exc,
                         int(settings.QUIET_SYNC_TTL_S))

    transaction.on_commit(retire)

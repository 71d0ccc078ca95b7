"""The answer to a sync that reports nothing new, from Redis alone (``orchestrator.quiet``).

A sync is quiet when the snapshot its node's last full sync left still holds and the request matches it: the
same credential (by its hash), the same report digest (the one a brief sync names, or the digest of the full
report it carries), the generation and epoch the node was last answered with, no refusals and no audit
upload, and a node heard from recently enough to be online. Its answer is the generation and no desired
state; its heartbeat (time, address, health) waits in Redis for ``sites.heartbeats``. Anything else takes the
whole path (``sites.sync``), which reads and writes PostgreSQL and audits what changed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from django.conf import settings

from edge_runtime import protocol
from orchestrator import quiet
from orchestrator.models import DesiredState
from sites.models import Node
from sites.services import CREDENTIAL_PREFIX, secret_hash

# The ASGI scope key by which ``sites.quiet_asgi`` tells the view that a sync was checked and is not quiet.
TRIED = "edgewise.quiet_tried"


@dataclasses.dataclass(frozen=True)
class Check:
    """What the quiet answer's Redis script is asked for one sync."""

    node_uuid: str
    snapshot: quiet.Snapshot
    now: float
    heartbeat: dict[str, Any]


def check_for(*, node_id: str, credential: str, request: protocol.SyncRequest, ip: str | None) -> Check | None:
    """The check that could answer ``request`` quietly, or None: it can only take the whole path."""
    if not quiet.enabled() or request.audit is not None or request.refusals:
        return None
    if not credential.startswith(CREDENTIAL_PREFIX):
        return None
    digest = request.digest if request.brief else protocol.report_digest(request)
    snapshot = quiet.Snapshot(credential_hash=secret_hash(credential), digest=digest,
                              generation=request.actual.applied_generation, epoch=request.actual.applied_epoch)
    now = time.time()
    heartbeat = {"t": now, "ip": ip, "health": request.health.model_dump(mode="json")}
    return Check(node_uuid=node_id, snapshot=snapshot, now=now, heartbeat=heartbeat)


def quiet_response(check: Check, generation: int) -> dict[str, Any]:
    return protocol.SyncResponse(generation=generation, sync_interval_s=settings.SYNC_INTERVAL_S,
                                 report_digest=check.snapshot.digest).model_dump(mode="json")


def answer(*, node_id: str, credential: str, request: protocol.SyncRequest, ip: str | None) -> dict[str, Any] | None:
    """The quiet answer to ``request`` (its heartbeat recorded), or None: the whole path must answer it."""
    check = check_for(node_id=node_id, credential=credential, request=request, ip=ip)
    if check is None:
        return None
    generation = quiet.quiet_answer(node_uuid=check.node_uuid, snapshot=check.snapshot, now=check.now,
                                    heartbeat=check.heartbeat)
    return None if generation is None else quiet_response(check, generation)


async def answer_async(*, node_id: str, credential: str, request: protocol.SyncRequest,
                       ip: str | None) -> dict[str, Any] | None:
    """:func:`answer` for an event loop (``sites.quiet_asgi``)."""
    check = check_for(node_id=node_id, credential=credential, request=request, ip=ip)
    if check is None:
        return None
    generation = await quiet.quiet_answer_async(node_uuid=check.node_uuid, snapshot=check.snapshot,
                                                now=check.now, heartbeat=check.heartbeat)
    return None if generation is None else quiet_response(check, generation)


def report_wanted(node: Node) -> dict[str, Any]:
    """The answer to a brief sync that is not quiet: nothing recorded; the node sends its whole report at once."""
    generation = DesiredState.objects.filter(node=node).values_list("generation", flat=True).first() or 0
    return protocol.SyncResponse(generation=generation, sync_interval_s=settings.SYNC_INTERVAL_S,
                                 report_wanted=True).model_dump(mode="json")

"""The agent's state: identity, status, applied desired state, plug-ins; and how its status is saved."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from edge_runtime.agent.plugins import Reconciler
from edge_runtime.audit import NodeAudit
from edge_runtime.identity_key import NodeKey
from edge_runtime.protocol import (
    API_PREFIX,
    DesiredState,
    Hardware,
    SignedDesiredState,
)
from edge_runtime.state import Identity, StateDir, Status
from edge_runtime.telemetry import Telemetry

logger = logging.getLogger("edge_runtime.agent")


def stream_url(base_url: str, node_id: str) -> str:
    """The node's websocket URL: ws:// for http://, wss:// for https://, same host and path prefix."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"control-plane URL must be http:// or https://, not {base_url!r}")
    path = f"{parts.path.rstrip('/')}{API_PREFIX}/nodes/{node_id}/stream"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def one_line(value: object) -> str:
    return " ".join(str(value).split())


class AgentBase:
    """The agent's state and bookkeeping, shared by its desired-state, sync and stream parts."""

    def __init__(self, state: StateDir, *, reconcilers: Sequence[Reconciler] = (),
                 rng: random.Random | None = None, hardware: Hardware | None = None,
                 telemetry: Telemetry | None = None, audit: NodeAudit | None = None, offline: bool = False) -> None:
        self.state = state
        # Offline: never dials the control plane; desired states, queries and receipts come by bundle only.
        self.offline = offline
        self.telemetry = telemetry
        # The node's audit log, shared with the plug-ins that write to it; None: this agent audits nothing.
        self.audit = audit
        self.identity: Identity = state.load_identity()
        self.public_key = self.identity.public_key()
        # The node's own key (created on the first start of a node enrolled before identity keys);
        # every sync carries its public half, so the control plane registers it.
        self.node_key: NodeKey = NodeKey.load_or_create(state.path)
        self.status: Status = state.load_status()
        self.status.highest_generation = max(self.status.highest_generation, self.status.applied_generation)
        self.reconcilers = list(reconcilers)
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.hardware = hardware
        self.signed: SignedDesiredState | None = None
        self.desired: DesiredState | None = None
        self.detail: dict[str, Any] = {}
        self.problems: dict[str, str] = {}
        self.interval = self.identity.sync_interval_s
        self.base_url = self.identity.url.rstrip("/")
        self.sync_url = f"{self.base_url}{API_PREFIX}/nodes/{self.identity.node_id}/sync"
        self.stream_url = stream_url(self.base_url, self.identity.node_id)
        self.started = time.monotonic()
        self.synced_once = False
        # The digest of this node's report that the control plane said it holds (None: send the whole report).
        self.held_digest: str | None = None
        # Set by a nudge (something changed for this node): the next sync carries the whole report.
        self.full_next = False
        self.wake = asyncio.Event()
        # A sync's answer and a bundle's are applied one at a time.
        self.applying = asyncio.Lock()
        self.stopping = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        # The sync that reports a state applied from a nudge, at the moment the nudge gave (agent.runner).
        self._report_task: asyncio.Task[None] | None = None


    def record(self, action: str, detail: dict[str, Any]) -> None:
        """Write ``action`` to the node's audit log; a log that cannot be written is logged, never fatal here."""
        if self.audit is not None:
            self.audit.record(action, detail)

    def _note_error(self, message: str) -> None:
        self.status.last_error = one_line(message)[:500]
        self.status.last_error_at = dt.datetime.now(dt.UTC)

    def _save_status(self, *, durable: bool = False) -> None:
        try:
            self.state.save_status(self.status, durable=durable)
        except OSError as exc:
            # The report is lost, the node keeps running; the next write may succeed.
            logger.error("cannot write %s: %s", self.state.status_path, one_line(exc))

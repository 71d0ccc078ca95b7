"""The running agent: the sync loop, the stream beside it, telemetry collection; stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus, WebSocketException

from edge_runtime import __version__
from edge_runtime.agent.backoff import backoff_cap, backoff_delay
from edge_runtime.agent.base import one_line
from edge_runtime.agent.bundles import BundleIntake
from edge_runtime.agent.sync import HTTP_TIMEOUT
from edge_runtime.hardware import detect_hardware
from edge_runtime.protocol import (
    Nudge,
    StreamError,
    StreamMessage,
    TelemetryAck,
)
from edge_runtime.telemetry import TelemetryStalled

logger = logging.getLogger("edge_runtime.agent")


STREAM_OPEN_TIMEOUT_S = 10.0
# Nudges are tiny; anything large on the stream is not from a sane control plane.
STREAM_MAX_MESSAGE_BYTES = 64 * 1024
STREAM_MESSAGE: TypeAdapter[Nudge | TelemetryAck | StreamError] = TypeAdapter(StreamMessage)


class Agent(BundleIntake):
    """Keeps this node in step with the control plane (see the package doc)."""

    async def stream_loop(self) -> None:
        attempt = 0
        headers = {"Authorization": f"Bearer {self.identity.credential}"}
        while True:
            try:
                # The bearer credential authenticates the node; agent routes
                # take no browser Origin check, so the node sends none.
                async with ws_connect(
                    self.stream_url, additional_headers=headers,
                    open_timeout=STREAM_OPEN_TIMEOUT_S,
                    max_size=STREAM_MAX_MESSAGE_BYTES, user_agent_header=f"edgewise-edge-runtime/{__version__}",
                ) as ws:
                    logger.info("stream connected")
                    attempt = 0
                    # Catch up with anything published while the stream was down.
                    self.wake.set()
                    await self._stream_session(ws)
                reason = "closed by the control plane"
            except InvalidStatus as exc:
                reason = f"refused with HTTP {exc.response.status_code}"
            except (OSError, TimeoutError, WebSocketException, TelemetryStalled) as exc:
                reason = one_line(exc) or type(exc).__name__
            cap = backoff_cap(self.interval)
            delay = backoff_delay(attempt, self.rng, cap=cap)
            attempt += 1
            logger.warning("stream disconnected: %s; reconnecting in %.1fs", reason, delay)
            await asyncio.sleep(delay)

    async def _stream_session(self, ws: Any) -> None:
        """Receive on ``ws`` and, with telemetry, send beside it; returns when either side ends."""
        tasks = [asyncio.create_task(self._receive(ws), name="stream-receive")]
        if self.telemetry is not None:
            tasks.append(asyncio.create_task(self.telemetry.run_session(ws.send), name="telemetry-send"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            failure = task.exception()
            if failure is not None:
                raise failure

    async def _receive(self, ws: Any) -> None:
        async for message in ws:
            try:
                parsed = STREAM_MESSAGE.validate_json(message)
            except ValidationError:
                logger.warning("stream message ignored: not one this node understands")
                continue
            if isinstance(parsed, Nudge):
                await self._nudged(parsed)
            elif isinstance(parsed, TelemetryAck):
                if self.telemetry is not None:
                    self.telemetry.on_ack(parsed)
            else:
                logger.error("the control plane refused this node's telemetry: %s", one_line(parsed.error))

    async def _nudged(self, nudge: Nudge) -> None:
        """Apply the state a nudge carries and report it within the time it gives; without one, sync now."""
        logger.info("nudge generation=%d%s", nudge.generation, " with its desired state" if nudge.desired else "")
        if nudge.desired is None or not await self.consider(nudge.desired):
            # Nothing pushed, or refused (the refusal is reported at once): the sync answers it.
            self.full_next = True
            self.wake.set()
            return
        self._save_status()
        delay = self.rng.uniform(0, nudge.report_within_s)
        if self._report_task is not None:
            self._report_task.cancel()
        self._report_task = asyncio.create_task(self._report_after(delay), name="report-applied")

    async def _report_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.full_next = True
        self.wake.set()

    def stop(self, reason: str = "") -> None:
        if not self.stopping.is_set():
            logger.info("stopping%s", f" on {reason}" if reason else "")
        self.stopping.set()

    async def run(self) -> None:
        """Run until stop() (SIGTERM or SIGINT); the state on disk is consistent at every await."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        if self.hardware is None:
            # nvidia-smi may take a moment; the loop stays responsive meanwhile.
            self.hardware = await asyncio.to_thread(detect_hardware)
        logger.info("starting node=%s site=%s url=%s", self.identity.node_id, self.identity.site,
                    "none (offline: bundles only)" if self.offline else self.base_url)
        self.record("node.started", {"runtime_version": __version__})
        await self.load()
        self._save_status()
        headers = {"Authorization": f"Bearer {self.identity.credential}",
                   "User-Agent": f"edgewise-edge-runtime/{__version__}"}
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers=headers) as client:
            self._client = client
            tasks = [asyncio.create_task(self.bundle_loop(), name="bundles")]
            if not self.offline:
                tasks += [asyncio.create_task(self.sync_loop(), name="sync"),
                          asyncio.create_task(self.stream_loop(), name="stream")]
            if self.telemetry is not None:
                tasks.append(asyncio.create_task(self.telemetry.collect_loop(), name="telemetry"))
            stopper = asyncio.create_task(self.stopping.wait(), name="stop")
            try:
                done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in [stopper, *tasks]:
                    task.cancel()
                await asyncio.gather(stopper, *tasks, return_exceptions=True)
                self._client = None
                self._save_status()
            for task in tasks:
                if task in done and task.exception() is not None:
                    raise RuntimeError(f"the {task.get_name()} task died") from task.exception()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logger.info("stopped")

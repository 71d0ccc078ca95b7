"""The simulated fleet of the end-to-end query benchmark: one node per site, speaking the real protocol (no Django).

The nodes run in one asyncio loop (a thread beside Django in the benchmark's
child process) exactly as ``edge-runtime run`` does: they enroll, pin the
signing key, sync every few seconds reporting their dataset catalog, keep the
node stream (websocket) open so a nudge makes them sync at once, run each
query they are offered with :func:`edge_runtime.data.engine.run_query` (in a
thread pool, as the agent does) and post the answer. A failure is recorded in
``Fleet.error`` for the measuring thread, never raised across threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.sync.fleet import SimNode, node_hardware
from edge_runtime import protocol, signing
from edge_runtime.agent import stream_url
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.datasets import data_policy_from_bundle

SYNC_EVERY_S = 5.0


@dataclass
class Fleet:
    url: str
    tokens: list[tuple[str, str]]  # (site slug, enrollment token)
    folders: list[Path]
    pool: ThreadPoolExecutor
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    error: list[str] = field(default_factory=list)
    idle_rtts: list[float] = field(default_factory=list)
    measuring: bool = False
    answers: int = 0
    # Requests that failed in transit (a keep-alive connection the server had just closed) and were retried,
    # as the agent retries them.
    retried: int = 0


class SimSite(SimNode):
    """A node of one site, with its catalog and data policy, answering the queries it is offered."""

    def setup(self, fleet: Fleet, folder: Path, slug: str) -> None:
        self.fleet = fleet
        self.catalog = Catalog.from_config({"datasets": [{"name": "readings", "kind": "parquet",
                                                          "path": "readings.parquet", "time_column": "ts"}]},
                                           base_dir=folder)
        self.report = self.catalog.report()
        self.slug = slug
        self.bundle: dict[str, Any] = {}
        self.taken: set[str] = set()
        self.wake = asyncio.Event()

    def sync_body(self) -> bytes:
        request = protocol.SyncRequest(
            runtime_version="0.1.0-bench", hardware=self.hardware,
            actual=protocol.ActualState(applied_generation=self.applied_generation,
                                        applied_epoch=self.applied_epoch, detail={"datasets": self.report}),
            health=protocol.Health(status="ok"))
        return request.model_dump_json().encode()

    async def sync_site(self, client: httpx.AsyncClient) -> None:
        started = time.perf_counter()
        resp = await client.post(f"{protocol.API_PREFIX}/nodes/{self.node_id}/sync", content=self.sync_body(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {self.credential}"})
        elapsed = time.perf_counter() - started
        if resp.status_code != 200:
            raise RuntimeError(f"sync {resp.status_code}: {resp.text[:300]}")
        answer = protocol.SyncResponse.model_validate_json(resp.content)
        if answer.desired is not None:
            self.adopt(answer.desired)
            assert self.public_key is not None
            self.bundle = signing.verify_desired_state(answer.desired, self.public_key).policy
        if not answer.queries and not self.fleet.measuring and self.bundle:
            self.fleet.idle_rtts.append(elapsed)
        for query in answer.queries:
            if query.query_id not in self.taken:
                self.taken.add(query.query_id)
                asyncio.get_running_loop().create_task(self.answer(client, query))

    async def answer(self, client: httpx.AsyncClient, query: protocol.QueryRequest) -> None:
        policy, facts, _ = data_policy_from_bundle(self.bundle, self.slug)
        result = await asyncio.get_running_loop().run_in_executor(
            self.fleet.pool, lambda: run_query(query.spec, catalog=self.catalog, policy=policy, site_facts=facts,
                                               query_id=query.query_id, deadline=query.deadline))
        for attempt in range(3):
            try:
                resp = await client.post(
                    f"{protocol.API_PREFIX}/nodes/{self.node_id}/queries/{query.query_id}/result",
                    content=result.model_dump_json(),
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.credential}"})
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
                self.fleet.retried += 1
                await asyncio.sleep(0.05)
        if resp.status_code not in (200, 201):
            self.fleet.error.append(f"answer {resp.status_code}: {resp.text[:300]}")
        self.fleet.answers += 1

    async def stream(self) -> None:
        from websockets.asyncio.client import connect

        url = stream_url(self.fleet.url, self.node_id)
        async with connect(url, additional_headers={"Authorization": f"Bearer {self.credential}"}) as ws:
            async for _ in ws:
                self.wake.set()

    async def run(self, client: httpx.AsyncClient) -> None:
        stream = asyncio.get_running_loop().create_task(self.stream())
        try:
            while not self.fleet.stop.is_set():
                self.wake.clear()
                try:
                    await self.sync_site(client)
                except httpx.TransportError:
                    # As the agent does: the next sync tries again.
                    self.fleet.retried += 1
                    await asyncio.sleep(0.05)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=SYNC_EVERY_S)
        finally:
            stream.cancel()


async def _fleet(fleet: Fleet) -> None:
    limits = httpx.Limits(max_connections=len(fleet.tokens) * 2, max_keepalive_connections=len(fleet.tokens) * 2)
    async with httpx.AsyncClient(base_url=fleet.url, limits=limits, timeout=60) as client:
        nodes = []
        for index, ((slug, token), folder) in enumerate(zip(fleet.tokens, fleet.folders, strict=True)):
            node = SimSite(index=index, hardware=node_hardware(index))
            node.setup(fleet, folder, slug)
            await node.enroll(client, token)
            nodes.append(node)
        tasks = [asyncio.get_running_loop().create_task(n.run(client)) for n in nodes]
        fleet.ready.set()
        while not fleet.stop.is_set():
            await asyncio.sleep(0.1)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    fleet.error.append(repr(task.exception()))
                    fleet.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_fleet(fleet: Fleet) -> None:
    """Run the fleet until ``fleet.stop`` is set (the target of the fleet's thread)."""
    try:
        asyncio.run(_fleet(fleet))
    except Exception as exc:  # noqa: BLE001 - reported by the measuring thread
        fleet.error.append(repr(exc))
        fleet.ready.set()

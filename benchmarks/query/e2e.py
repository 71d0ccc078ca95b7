"""One federated query across many simulated sites, end to end through the real control plane.

The parent (:func:`end_to_end_benchmark`, called by ``python -m benchmarks.query``) builds a benchmark
environment of its own (database, data dir, uvicorn; :mod:`benchmarks.harness`) and runs this module as a
child process in it (``python -m benchmarks.query.e2e``), because the measurement needs Django (to call
``query_create`` and read the query's state) against that database.

In the child, ``--sites`` sites (default 50) each get a token, a small Parquet file of plant readings
(``--site-rows``, different lines and behaviour per site) and one simulated node. The nodes run in one asyncio
loop (a thread beside Django) and speak the real protocol exactly as ``edge-runtime run`` does: they enroll,
pin the signing key, sync every few seconds reporting their dataset catalog, keep the node stream (websocket)
open so a nudge makes them sync at once, run each query they are offered with
:func:`edge_runtime.data.engine.run_query` (in a thread pool, as the agent does) and post the answer.

Measured, after one warm-up query, ``--repeat`` times: from ``query_create`` (the console's service) until the
query is ``complete`` (every site answered, merged). Its phases come from the database: the last site's
delivery (the nudge and the sync that carries the query) and the last site's answer. The baseline, measured in
the same run by the same simulated nodes: the plain sync round trip (a node's POST of an idle sync until its
answer), median over the syncs before the first query.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

E2E_SPEC: dict[str, Any] = {
    "dataset": "readings",
    "group_by": ["line", "machine"],
    "aggregates": [
        {"op": "count"},
        {"op": "mean", "column": "temperature"},
        {"op": "std", "column": "temperature"},
        {"op": "min", "column": "temperature"},
        {"op": "max", "column": "temperature"},
        {"op": "sum", "column": "parts"},
    ],
}
SYNC_EVERY_S = 5.0


# -- the parent side ------------------------------------------------------------------------------------------------


def end_to_end_benchmark(*, sites: int, site_rows: int, repeat: int, workers: int) -> dict[str, Any]:
    from benchmarks.harness import PYTHON, REPO, BenchmarkError, Environment

    with Environment(db_name=f"edgewise_bench_query_{os.getpid()}") as env:
        env.db.create()
        env.manage("migrate", "--no-input")
        cp = env.start_control_plane(workers=workers)
        child_env = {**env.env, "DJANGO_SETTINGS_MODULE": env.env.get("DJANGO_SETTINGS_MODULE")
                     or "orchestrator.settings"}
        result = subprocess.run(
            [PYTHON, "-m", "benchmarks.query.e2e", "--url", cp.url, "--sites", str(sites), "--site-rows",
             str(site_rows), "--repeat", str(repeat)],
            cwd=REPO, env=child_env, capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            raise BenchmarkError(f"the end-to-end run failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-5000:]}\ncontrol plane:\n{cp.log_tail()}")
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        figures: dict[str, Any] = json.loads(lines[-1])
        figures["control_plane_workers"] = workers
        return figures


# -- the simulated fleet (no Django here) ---------------------------------------------------------------------------


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


async def _fleet(fleet: Fleet) -> None:
    import httpx

    from benchmarks.sync.fleet import SimNode, node_hardware
    from edge_runtime import protocol
    from edge_runtime.agent import stream_url
    from edge_runtime.data.catalog import Catalog
    from edge_runtime.data.engine import run_query
    from edge_runtime.queries import data_policy_from_bundle

    class SimSite(SimNode):
        """A node of one site, with its catalog and data policy, answering the queries it is offered."""

        def setup(self, folder: Path, slug: str) -> None:
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
                from edge_runtime import signing

                self.bundle = signing.verify_desired_state(answer.desired, self.public_key).policy
            if not answer.queries and not fleet.measuring and self.bundle:
                fleet.idle_rtts.append(elapsed)
            for query in answer.queries:
                if query.query_id not in self.taken:
                    self.taken.add(query.query_id)
                    asyncio.get_running_loop().create_task(self.answer(client, query))

        async def answer(self, client: httpx.AsyncClient, query: protocol.QueryRequest) -> None:
            policy, facts, _ = data_policy_from_bundle(self.bundle, self.slug)
            result = await asyncio.get_running_loop().run_in_executor(
                fleet.pool, lambda: run_query(query.spec, catalog=self.catalog, policy=policy, site_facts=facts,
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
                    fleet.retried += 1
                    await asyncio.sleep(0.05)
            if resp.status_code not in (200, 201):
                fleet.error.append(f"answer {resp.status_code}: {resp.text[:300]}")
            fleet.answers += 1

        async def stream(self) -> None:
            from websockets.asyncio.client import connect

            url = stream_url(fleet.url, self.node_id)
            async with connect(url, additional_headers={"Authorization": f"Bearer {self.credential}"}) as ws:
                async for _ in ws:
                    self.wake.set()

        async def run(self, client: httpx.AsyncClient) -> None:
            stream = asyncio.get_running_loop().create_task(self.stream())
            try:
                while not fleet.stop.is_set():
                    self.wake.clear()
                    try:
                        await self.sync_site(client)
                    except httpx.TransportError:
                        # As the agent does: the next sync tries again.
                        fleet.retried += 1
                        await asyncio.sleep(0.05)
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), timeout=SYNC_EVERY_S)
            finally:
                stream.cancel()

    limits = httpx.Limits(max_connections=len(fleet.tokens) * 2, max_keepalive_connections=len(fleet.tokens) * 2)
    async with httpx.AsyncClient(base_url=fleet.url, limits=limits, timeout=60) as client:
        nodes = []
        for index, ((slug, token), folder) in enumerate(zip(fleet.tokens, fleet.folders, strict=True)):
            node = SimSite(index=index, hardware=node_hardware(index))
            node.setup(folder, slug)
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


def _run_fleet(fleet: Fleet) -> None:
    try:
        asyncio.run(_fleet(fleet))
    except Exception as exc:  # noqa: BLE001 - reported by the measuring thread
        fleet.error.append(repr(exc))
        fleet.ready.set()


# -- the child: Django, the sites, the measurement ------------------------------------------------------------------


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--site-rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")
    django.setup()
    from django.contrib.auth import get_user_model

    from audit.services import Actor
    from benchmarks.query.run import generate
    from policies.queries.models import DatasetSchema, FederatedQuery, QuerySite
    from policies.queries.services import query_create
    from policies.services import policy_update
    from sites import services

    actor = Actor.system("benchmark")
    region = services.region_create(actor=actor, slug="bench", name="Benchmark")
    policy_update(actor=actor, kind="data", document={"default": {"datasets": {"readings": {}},
                                                                  "min_group_size": 5}})
    admin = get_user_model().objects.create_superuser(username="bench", password=None, email="bench@example.org")
    folder = Path(tempfile.mkdtemp(prefix="edgewise-bench-e2e-"))
    tokens, folders, sites = [], [], []
    for i in range(args.sites):
        site = services.site_create(actor=actor, region=region, slug=f"plant-{i:02d}", name=f"Plant {i:02d}")
        _, token = services.token_create(actor=actor, site=site, note="query benchmark")
        site_dir = folder / site.slug
        site_dir.mkdir()
        generate(site_dir / "readings.parquet", args.site_rows, seed=500 + i, lines=2 + i % 4, machines=3 + i % 5,
                 days=7)
        tokens.append((site.slug, token))
        folders.append(site_dir)
        sites.append(site)

    threads = min(8, os.cpu_count() or 1)
    fleet = Fleet(url=args.url, tokens=tokens, folders=folders, pool=ThreadPoolExecutor(max_workers=threads))
    thread = threading.Thread(target=_run_fleet, args=(fleet,), daemon=True)
    thread.start()
    try:
        fleet.ready.wait(timeout=300)
        deadline = time.monotonic() + 120
        while DatasetSchema.objects.count() < args.sites or len(fleet.idle_rtts) < args.sites * 2:
            if fleet.error or time.monotonic() > deadline:
                raise RuntimeError(f"the fleet did not come up: {fleet.error or 'timed out'}")
            time.sleep(0.1)
        # The baseline: idle syncs of the whole fleet in its steady state (not the burst of enrollment).
        fleet.idle_rtts.clear()
        while len(fleet.idle_rtts) < args.sites * 2:
            if fleet.error or time.monotonic() > deadline + 60:
                raise RuntimeError(f"the fleet stopped syncing: {fleet.error or 'timed out'}")
            time.sleep(0.1)
        idle_rtts = list(fleet.idle_rtts)
        runs = []
        for attempt in range(args.repeat + 1):
            fleet.measuring = True
            started = time.perf_counter()
            query = query_create(actor=Actor.user(admin), user=admin, spec=E2E_SPEC, sites=sites, deadline_s=120)
            while not FederatedQuery.objects.filter(pk=query.pk, finished_at__isnull=False).exists():
                if fleet.error:
                    raise RuntimeError(f"the fleet failed: {fleet.error}")
                if time.perf_counter() - started > 120:
                    raise RuntimeError("the query did not finish within 120 s")
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
            query.refresh_from_db()
            rows = list(QuerySite.objects.filter(query=query))
            merged = query.merged() or {}
            run = {
                "end_to_end_s": elapsed,
                "state": query.state,
                "last_delivery_s": max((r.sent_at - query.created_at).total_seconds() for r in rows),
                "last_answer_s": max((r.answered_at - query.created_at).total_seconds() for r in rows),
                "site_compute_ms_median": statistics.median(r.elapsed_ms for r in rows),
                "merged_groups": len(merged.get("rows") or []),
                "suppressed_cells": merged.get("suppressed_cells", 0),
            }
            if run["state"] != "complete":
                raise RuntimeError(f"the query ended {run['state']}: {[(r.site_id, r.reason) for r in rows]}")
            if attempt > 0:  # the first one warms up every path
                runs.append(run)
            fleet.measuring = False
            time.sleep(0.5)
    finally:
        fleet.stop.set()
        thread.join(timeout=30)
        fleet.pool.shutdown(wait=False, cancel_futures=True)

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 4)

    sync_rtt = statistics.median(idle_rtts)
    figures = {
        "sites": args.sites,
        "rows_per_site": args.site_rows,
        "repeat": args.repeat,
        "end_to_end_s": med("end_to_end_s"),
        "end_to_end_min_s": round(min(r["end_to_end_s"] for r in runs), 4),
        "end_to_end_max_s": round(max(r["end_to_end_s"] for r in runs), 4),
        "last_site_received_s": med("last_delivery_s"),
        "last_site_answered_s": med("last_answer_s"),
        "site_compute_ms_median": med("site_compute_ms_median"),
        "merged_groups": runs[-1]["merged_groups"],
        "suppressed_cells": runs[-1]["suppressed_cells"],
        "baseline_sync_round_trip_s": round(sync_rtt, 4),
        "baseline_syncs_measured": len(idle_rtts),
        "end_to_end_over_sync_round_trip": round(statistics.median(r["end_to_end_s"] for r in runs) / sync_rtt, 2),
        "simulated_query_threads": threads,
        "requests_retried_in_transit": fleet.retried,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())

"""One federated query across many simulated sites, end to end through the real control plane.

The parent (:func:`end_to_end_benchmark`, called by ``python -m benchmarks.query``) builds a benchmark
environment of its own (database, data dir, uvicorn; :mod:`benchmarks.harness`) and runs this module as a
child process in it (``python -m benchmarks.query.e2e``), because the measurement needs Django (to call
``query_create`` and read the query's state) against that database.

In the child, ``--sites`` sites (default 50) each get a token, a small Parquet file of plant readings
(``--site-rows``, different lines and behaviour per site) and one simulated node
(:mod:`benchmarks.query.sim_fleet`). The nodes run in one asyncio
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.query.data import TEMPERATURE_AGGREGATES, generate

E2E_SPEC: dict[str, Any] = {
    "dataset": "readings",
    "group_by": ["line", "machine"],
    "aggregates": [*TEMPERATURE_AGGREGATES, {"op": "sum", "column": "parts"}],
}


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
    from benchmarks.query.sim_fleet import Fleet, run_fleet

    admin, sites, tokens, folders = _sites_create(args.sites, args.site_rows)
    threads = min(8, os.cpu_count() or 1)
    fleet = Fleet(url=args.url, tokens=tokens, folders=folders, pool=ThreadPoolExecutor(max_workers=threads))
    thread = threading.Thread(target=run_fleet, args=(fleet,), daemon=True)
    thread.start()
    try:
        idle_rtts = _steady_state(fleet, args.sites)
        runs = []
        for attempt in range(args.repeat + 1):
            run = _measure_query(fleet, admin, sites)
            if attempt > 0:  # the first one warms up every path
                runs.append(run)
    finally:
        fleet.stop.set()
        thread.join(timeout=30)
        fleet.pool.shutdown(wait=False, cancel_futures=True)
    print(json.dumps(_figures(args, runs, idle_rtts, threads, fleet.retried)))
    return 0


def _sites_create(count: int, site_rows: int) -> tuple[Any, list[Any], list[tuple[str, str]], list[Path]]:
    """A data policy (k = 5), a superuser, and ``count`` sites each with a token and a Parquet file of readings."""
    from django.contrib.auth import get_user_model

    from audit.services import Actor
    from policies.services import policy_update
    from sites import services

    actor = Actor.system("benchmark")
    region = services.region_create(actor=actor, slug="bench", name="Benchmark")
    policy_update(actor=actor, kind="data", document={"default": {"datasets": {"readings": {}},
                                                                  "min_group_size": 5}})
    admin = get_user_model().objects.create_superuser(username="bench", password=None, email="bench@example.org")
    folder = Path(tempfile.mkdtemp(prefix="edgewise-bench-e2e-"))
    tokens, folders, sites = [], [], []
    for i in range(count):
        site = services.site_create(actor=actor, region=region, slug=f"plant-{i:02d}", name=f"Plant {i:02d}")
        _, token = services.token_create(actor=actor, site=site, note="query benchmark")
        site_dir = folder / site.slug
        site_dir.mkdir()
        generate(site_dir / "readings.parquet", site_rows, seed=500 + i, lines=2 + i % 4, machines=3 + i % 5,
                 days=7)
        tokens.append((site.slug, token))
        folders.append(site_dir)
        sites.append(site)
    return admin, sites, tokens, folders


def _steady_state(fleet: Any, sites: int) -> list[float]:
    """Wait until every site reported its catalog, then collect the baseline: idle syncs of the whole fleet in
    its steady state (not the burst of enrollment)."""
    from queries.models import DatasetSchema

    fleet.ready.wait(timeout=300)
    deadline = time.monotonic() + 120
    while DatasetSchema.objects.count() < sites or len(fleet.idle_rtts) < sites * 2:
        if fleet.error or time.monotonic() > deadline:
            raise RuntimeError(f"the fleet did not come up: {fleet.error or 'timed out'}")
        time.sleep(0.1)
    fleet.idle_rtts.clear()
    while len(fleet.idle_rtts) < sites * 2:
        if fleet.error or time.monotonic() > deadline + 60:
            raise RuntimeError(f"the fleet stopped syncing: {fleet.error or 'timed out'}")
        time.sleep(0.1)
    return list(fleet.idle_rtts)


def _measure_query(fleet: Any, admin: Any, sites: list[Any]) -> dict[str, Any]:
    """One query from ``query_create`` until it is finished, with its phases read from the database."""
    from audit.services import Actor
    from queries.models import FederatedQuery, QuerySite
    from queries.services.lifecycle import query_create

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
    fleet.measuring = False
    time.sleep(0.5)
    return run


def _figures(args: argparse.Namespace, runs: list[dict[str, Any]], idle_rtts: list[float], threads: int,
             retried: int) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 4)

    sync_rtt = statistics.median(idle_rtts)
    return {
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
        "requests_retried_in_transit": retried,
    }


if __name__ == "__main__":
    sys.exit(child_main())

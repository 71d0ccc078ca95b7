"""Sync throughput of the control plane at N simulated nodes.

Run: ``.venv/bin/python -m benchmarks.sync [--nodes 1000 --concurrency 64
--duration 30 --warmup 5 --workers 2 --keep-db]`` (or ``python
benchmarks/sync/run.py``). See ``benchmarks/README.md`` for what it reports.

Phases, against a control plane of its own (``benchmarks.harness``):

1. setup: create and migrate a database, start uvicorn, create a site and one
   token with ``max_uses=N``;
2. enroll: N nodes ``POST /agent/v1/enroll`` (bounded concurrency);
3. settle: every node syncs twice. The first answer carries the signed
   desired state (verified with the pinned key); the second sync reports it
   applied. Both write audit events, so they are timed apart from the steady
   state they lead to;
4. baseline: the closed-loop generator against ``GET /agent/v1/health``,
   which touches no database, at the same concurrency;
5. sync: the same generator, each request the sync of the node whose turn it
   is (steady state: the answers carry no desired state).

Each measured phase is a warm-up followed by a measured window; the ratios
sync/health compare the same machine under the same client in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import redis

from benchmarks import cli
from benchmarks.harness import BenchmarkError, ControlPlane, Database, Environment, raise_on_sigterm, timed
from benchmarks.loadgen import PhaseResult, RequestFailed, closed_loop, each_once
from benchmarks.sync.clients import spread_phase
from benchmarks.sync.fleet import Fleet, SimNode
from edge_runtime import protocol

# The simulator sets the pace; a long interval keeps every node "online"
# whatever the pace, so no liveness transition lands in the measurement.
SYNC_INTERVAL_S = "3600"
MAX_NODES = 100_000
# A token allows at most this many uses: a larger fleet enrolls with several.
TOKEN_USES = 10_000
PG_STATS_SETTLE_S = 11.0

SETUP_CODE = """
import json
from audit.services import Actor
from orchestrator import keys
from sites import services
actor = Actor.system("benchmark")
region = services.region_create(actor=actor, slug="bench", name="Benchmark")
site = services.site_create(actor=actor, region=region, slug="bench-site", name="Benchmark site",
                            labels={"purpose": "benchmark"})
tokens = [services.token_create(actor=actor, site=site, max_uses=%(per_token)d, note="sync benchmark")[1]
          for _ in range(%(tokens)d)]
print(json.dumps({"tokens": tokens, "site": site.slug, "fingerprint": keys.public_key_fingerprint()}))
"""

CHECK_CODE = """
import json
from audit.models import AuditEvent
from sites.models import Node
print(json.dumps({
    "nodes": Node.objects.count(),
    "nodes_online": Node.objects.filter(status="online").count(),
    "nodes_applied": Node.objects.filter(applied_generation__gte=1).count(),
    "audit_events": AuditEvent.objects.count(),
}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000, help=f"simulated nodes (1..{MAX_NODES}, default 1000)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    cli.add_window_options(p)
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    p.add_argument("--clients", type=int, default=1, help="load-generator processes for the measured phases "
                                                          "(default 1: the benchmark's own)")
    p.add_argument("--enroll-concurrency", type=int, default=16, help="enrollments in flight (default 16)")
    p.add_argument("--settings", default="", help="DJANGO_SETTINGS_MODULE for the control plane, to compare "
                                                  "configurations (default: orchestrator.settings)")
    cli.add_database_options(p, "sync")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= MAX_NODES:
        p.error(f"--nodes must be between 1 and {MAX_NODES}")
    cli.check_positive(p, args, ("concurrency", "workers", "clients", "enroll_concurrency"))
    cli.check_window(p, args)
    return args


def _require_clean(phase: PhaseResult) -> None:
    """Setup phases must succeed for every node, or the measurement means nothing."""
    if phase.errors_total:
        raise BenchmarkError(f"{phase.name}: {phase.errors_total} of {phase.requests + phase.errors_total} "
                             f"requests failed ({phase.error_kinds}); first: {phase.first_error}")


def connect(cp: ControlPlane, in_flight: int) -> httpx.AsyncClient:
    # A fresh pool per phase: connections left idle while the previous
    # phase drained could be closed by the server's keep-alive timeout
    # just as the next phase reuses them, which would count as errors.
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    return httpx.AsyncClient(base_url=cp.url, limits=limits, timeout=httpx.Timeout(30.0))


async def _settle_phase(name: str, fleet: Fleet, cp: ControlPlane, concurrency: int) -> PhaseResult:
    """One sync per node. Setup, not measurement: a connection lost in transit
    (the server closing a kept-alive connection just as it is reused) is tried
    once more, as a node would at its next interval, and counted as retried."""
    retried: list[str] = []
    async with connect(cp, concurrency) as client:
        async def sync(node: SimNode) -> None:
            try:
                await node.sync(client)
            except httpx.TransportError as exc:
                retried.append(f"{node.name}: {type(exc).__name__}")
                await node.sync(client)

        phase = await each_once(name, fleet.nodes, sync, concurrency=concurrency)
    _require_clean(phase)
    phase.retried = len(retried)
    if retried:
        say(f"{name}: {len(retried)} syncs retried once after a lost connection, e.g. {retried[0]}")
    return phase


async def settle(fleet: Fleet, cp: ControlPlane, concurrency: int) -> list[PhaseResult]:
    """Every node's first sync (its desired state, verified) and the sync that reports it applied."""
    say("settling: first sync (desired state, verified), then reporting it applied")
    settled = [await _settle_phase(name, fleet, cp, concurrency) for name in ("first_sync", "report_applied")]
    unsettled = [n.name for n in fleet.nodes if n.applied_generation < 1 or n.desired_received != 1]
    if unsettled:
        raise BenchmarkError(f"{len(unsettled)} nodes did not settle on a verified desired state, "
                             f"e.g. {unsettled[:3]}")
    return settled


async def health_baseline(args: argparse.Namespace, cp: ControlPlane, concurrency: int) -> PhaseResult:
    """The closed loop against ``GET /agent/v1/health``, which touches no database."""
    async with connect(cp, concurrency) as client:
        async def health() -> None:
            resp = await client.get(f"{protocol.API_PREFIX}/health")
            if resp.status_code != 200:
                raise RequestFailed(f"health {resp.status_code}", resp.text[:200])
            resp.json()

        return await closed_loop("health", health, concurrency=concurrency, warmup=args.warmup,
                                 duration=args.duration, server_cpu=cp.cpu_seconds)


async def drive(args: argparse.Namespace, cp: ControlPlane, tokens: list[str], db: Database,
                redis_url: str) -> dict[str, Any]:
    fleet = Fleet(args.nodes)
    # A node never has two syncs in flight, so there can be no more in flight than nodes.
    concurrency = min(args.concurrency, args.nodes)

    say(f"enrolling {args.nodes} nodes ({args.enroll_concurrency} at a time)")
    async with connect(cp, args.enroll_concurrency) as client:
        enrolled = await each_once("enroll", fleet.nodes,
                                   lambda node: node.enroll(client, tokens[node.index // TOKEN_USES]),
                                   concurrency=args.enroll_concurrency)
    _require_clean(enrolled)
    first, applied = await settle(fleet, cp, concurrency)

    window = f"{args.warmup:g}s warm-up + {args.duration:g}s"
    by = f" from {args.clients} load-generator processes" if args.clients > 1 else ""
    say(f"baseline: GET /agent/v1/health, {concurrency} in flight{by}, {window}")
    if args.clients > 1:
        baseline, _ = await asyncio.to_thread(spread, "health", args, cp, fleet, concurrency)
    else:
        baseline = await health_baseline(args, cp, concurrency)

    say(f"sync: {args.nodes} nodes in turn, {concurrency} in flight{by}, {window}")
    pg_before, redis_before = pg_writes(db), redis_cpu_seconds(redis_url)
    sync, totals, per_node = await steady_syncs_phase(args, cp, fleet, concurrency)
    steady_syncs = totals["syncs"]
    redis_ms = round(1000 * (redis_cpu_seconds(redis_url) - redis_before) / max(steady_syncs, 1), 4)
    pg = pg_per_sync(db, pg_before, steady_syncs)
    return {
        "postgresql_per_steady_sync": pg,
        # The Redis server's CPU (all of it: it may serve others too) per steady-state sync, warm-up included.
        "redis_cpu_ms_per_steady_sync": redis_ms,
        "quiet_share": round(totals["quiet"] / max(steady_syncs, 1), 4),
        "concurrency": concurrency,
        "setup_phases": {p.name: p.as_dict() for p in (enrolled, first, applied)},
        "phases": {"health": baseline.as_dict(), "sync": sync.as_dict()},
        "fleet": {
            "nodes": len(fleet.nodes),
            # Each node got its desired state exactly once, in settling; steady-state answers carry none.
            "desired_states_received": fleet.desired_received() + (totals["desired_received"] if args.clients > 1
                                                                   else 0),
            "desired_states_in_steady_state": totals["desired_received"],
            "steady_state_syncs": steady_syncs,
            **per_node,
        },
    }


async def steady_syncs_phase(args: argparse.Namespace, cp: ControlPlane, fleet: Fleet, concurrency: int
                             ) -> tuple[PhaseResult, dict[str, int], dict[str, Any]]:
    """The measured syncs: the phase, what the nodes received in it, and the spread of syncs per node."""
    if args.clients > 1:
        sync, totals = await asyncio.to_thread(spread, "sync", args, cp, fleet, concurrency)
        return sync, totals, {}
    before = {"syncs": fleet.syncs(), "quiet": fleet.quiet_answers(), "desired_received": fleet.desired_received()}
    async with connect(cp, concurrency) as client:
        sync = await closed_loop("sync", lambda: fleet.sync_next(client), concurrency=concurrency,
                                 warmup=args.warmup, duration=args.duration, server_cpu=cp.cpu_seconds)
    totals = {"syncs": fleet.syncs() - before["syncs"], "quiet": fleet.quiet_answers() - before["quiet"],
              "desired_received": fleet.desired_received() - before["desired_received"]}
    return sync, totals, {"min_syncs_per_node": min(n.syncs for n in fleet.nodes),
                          "max_syncs_per_node": max(n.syncs for n in fleet.nodes)}


def spread(name: str, args: argparse.Namespace, cp: ControlPlane, fleet: Fleet,
           concurrency: int) -> tuple[PhaseResult, dict[str, int]]:
    with tempfile.TemporaryDirectory(prefix="sync-bench-clients-") as workdir:
        return spread_phase(name=name, url=cp.url, nodes=fleet.nodes, clients=args.clients,
                            concurrency=concurrency, warmup=args.warmup, duration=args.duration,
                            server_cpu=cp.cpu_seconds, workdir=Path(workdir))


def redis_cpu_seconds(url: str) -> float:
    """CPU seconds the Redis server has used (user and system, its main and background threads)."""
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def pg_writes(db: Database) -> tuple[int, int]:
    """(commits, rows inserted + updated + deleted) of the benchmark's database so far."""
    with db.connect() as conn:
        row = conn.execute("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                           "WHERE datname = %s", [db.name]).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def pg_per_sync(db: Database, before: tuple[int, int], syncs: int) -> dict[str, float]:
    """Commits and rows written per steady-state sync (warm-up included, as the syncs counted are).

    PostgreSQL's statistics reach pg_stat_database from each backend at most every second, and from an idle
    one after up to ten: wait for them. The heartbeat flush's writes fall inside the phase too.
    """
    time.sleep(PG_STATS_SETTLE_S)
    after = pg_writes(db)
    n = max(syncs, 1)
    return {"commits": round((after[0] - before[0]) / n, 4), "rows_written": round((after[1] - before[1]) / n, 4)}


def cpu_ms_per_request(phase: dict[str, Any]) -> float | None:
    """Control-plane CPU (all uvicorn processes) per answered request, in milliseconds."""
    if not phase.get("server_cpu") or not phase["throughput_rps"]:
        return None
    return round(1000 * float(phase["server_cpu"]) / float(phase["throughput_rps"]), 3)


def ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    sync, health = phases["sync"], phases["health"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "sync_over_health_throughput": ratio(sync["throughput_rps"], health["throughput_rps"]),
        "sync_over_health_p50": ratio(sync["latency_ms"]["p50"], health["latency_ms"]["p50"]),
        "sync_over_health_p99": ratio(sync["latency_ms"]["p99"], health["latency_ms"]["p99"]),
        "sync_cpu_ms": cpu_ms_per_request(sync),
        "health_cpu_ms": cpu_ms_per_request(health),
        "sync_over_health_cpu": ratio(cpu_ms_per_request(sync) or 0, cpu_ms_per_request(health) or 0),
    }


def say(message: str) -> None:
    print(f"[sync-bench] {message}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("phase", "in flight", "requests", "req/s", "p50 ms", "p99 ms", "max ms",
                                    "errors", "client cpu", "server cpu")]
    phases = [*report["setup_phases"].values(), *report["phases"].values()]
    for ph in phases:
        server = "" if ph.get("server_cpu") is None else f"{ph['server_cpu']:.2f}"
        rows.append((ph["name"], str(ph["concurrency"]), str(ph["requests"]), f"{ph['throughput_rps']:.1f}",
                     *cli.latency_cells(ph["latency_ms"]), str(ph["errors_total"]), f"{ph['client_cpu']:.2f}",
                     server))
    r = report["ratios"]
    return cli.table_text(
        rows,
        f"sync/health throughput: {r['sync_over_health_throughput']}   "
        f"sync p50 / health p50: {r['sync_over_health_p50']}   "
        f"sync p99 / health p99: {r['sync_over_health_p99']}\n"
        f"control-plane cpu per request: sync {r['sync_cpu_ms']} ms, health {r['health_cpu_ms']} ms "
        f"(ratio {r['sync_over_health_cpu']})   quiet share of steady syncs: {report['quiet_share']}   "
        f"postgresql per steady sync: {report['postgresql_per_steady_sync']}   "
        f"redis cpu per steady sync: {report['redis_cpu_ms_per_steady_sync']} ms",
        "(cpu: cores in use on average; server = all uvicorn processes, PostgreSQL not included)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("sync", args, ("nodes", "concurrency", "duration", "warmup", "workers",
                                              "clients", "enroll_concurrency", "settings"))

    def body() -> None:
        with Environment(db_name=args.db_name, keep_db=args.keep_db, settings_module=args.settings,
                         extra_env={"EDGEWISE_SYNC_INTERVAL": SYNC_INTERVAL_S}) as env:
            migrate_s = cli.migrate_fresh(env, say)
            tokens = -(-args.nodes // TOKEN_USES)
            site = env.shell_json(SETUP_CODE % {"per_token": min(args.nodes, TOKEN_USES), "tokens": tokens})
            with timed() as t_start:
                cp = env.start_control_plane(workers=args.workers)
            say(f"control plane on {cp.url} with {args.workers} worker(s)")
            report["setup"] = {"migrate_s": round(migrate_s, 2), "server_start_s": round(t_start["s"], 2),
                               "site": site["site"], "signing_key_fingerprint": site["fingerprint"]}
            with cli.log_on_failure(cp, say):
                report.update(asyncio.run(drive(args, cp, site["tokens"], env.db, env.redis_url)))
            report["server_check"] = env.shell_json(CHECK_CODE)
            # Warnings and tracebacks of the control plane explain any errors counted above.
            report["server_log_tail"] = cp.log_tail(4000)
            report["ratios"] = ratios(report["phases"])
            if args.keep_db:
                say(f"kept database {env.db.name} ({env.db.url})")

    return cli.run("sync", report, body, say=say, output=args.output, table=table)


if __name__ == "__main__":
    sys.exit(main())

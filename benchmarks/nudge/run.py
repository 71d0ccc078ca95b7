"""How fast a desired-state change reaches every connected node through its stream.

Run: ``.venv/bin/python -m benchmarks.nudge [--nodes 10000 --clients 4 --workers 2 --keep-db]``. See
``benchmarks/README.md`` for what it reports.

Phases, against a control plane of its own (``benchmarks.harness``):

1. setup: create and migrate a database, start uvicorn, create a site with N nodes and a site with one
   (their credentials made here, the nodes written directly: enrolling ten thousand nodes one by one
   measures enrollment, which ``benchmarks.sync`` does);
2. connect: K load-generator processes (``benchmarks.nudge.streams``) open every node's stream, as the
   edge runtime does, plus one process for the single node;
3. baseline: the single node's site changes ``--rounds`` times, one after another: the time from each
   change's commit to the node holding its verified state;
4. fleet: the big site changes once (every node's state is signed, audited and stored in one
   transaction: ``publish_s``); then the time from that commit until each node holds its verified state.

The figures are the fleet's delivery percentiles, the share delivered, and each over the baseline's median
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import cli
from benchmarks.harness import BenchmarkError, ControlPlane, Environment, raise_on_sigterm, timed
from benchmarks.loadgen import latency_summary_ms

MAX_NODES = 100_000
READY_TIMEOUT_S = 600.0
DELIVERY_TIMEOUT_S = 120.0

SETUP_CODE = """
import json, secrets
from audit.services import Actor
from orchestrator import keys
from sites import services
from sites.models import Node
actor = Actor.system("benchmark")
region = services.region_create(actor=actor, slug="bench", name="Benchmark")
out = {"public_key": keys.public_key_b64(), "sites": {}}
for slug, count in (("fleet", %(nodes)d), ("single", 1)):
    site = services.site_create(actor=actor, region=region, slug=slug, name=slug, labels={"wave": "0"})
    credentials = [services.CREDENTIAL_PREFIX + secrets.token_urlsafe(32) for _ in range(count)]
    Node.objects.bulk_create([Node(site=site, name=f"{slug}-{i:06d}", credential_hash=services.secret_hash(c))
                              for i, c in enumerate(credentials)], batch_size=2000)
    names = {f"{slug}-{i:06d}": c for i, c in enumerate(credentials)}
    out["sites"][slug] = [{"node_id": str(u), "credential": names[n]}
                          for u, n in Node.objects.filter(site=site).values_list("uuid", "name")]
print(json.dumps(out))
"""

# The change: the site's labels, so every node of the site gets a new desired state. Prints when it began,
# when its transaction committed (the first callback after commit) and when the nudges were sent.
CHANGE_CODE = """
import json, time
from django.db import transaction
from audit.services import Actor
from sites import services
from sites.models import Site
marks = {}
site = Site.objects.get(slug=%(slug)r)
for wave in range(1, %(rounds)d + 1):
    started = time.time()
    with transaction.atomic():
        transaction.on_commit(lambda: marks.setdefault("commits", []).append(time.time()))
        services.site_update(actor=Actor.system("benchmark"), site=site, labels={"wave": f"%(tag)s-{wave}"})
    marks.setdefault("started", []).append(started)
    marks.setdefault("sent", []).append(time.time())
    time.sleep(%(pause)f)
print(json.dumps(marks))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nudge", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000, help=f"connected nodes (1..{MAX_NODES}, default 10000)")
    p.add_argument("--clients", type=int, default=4, help="load-generator processes holding streams (default 4)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="changes of the single node's site (default 5)")
    cli.add_database_options(p, "nudge")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= MAX_NODES:
        p.error(f"--nodes must be between 1 and {MAX_NODES}")
    cli.check_positive(p, args, ("clients", "workers", "rounds"))
    return args


def say(message: str) -> None:
    print(f"[nudge-bench] {message}", file=sys.stderr, flush=True)


class Holders:
    """The load-generator processes holding one site's streams."""

    def __init__(self, workdir: Path, name: str, *, cp: ControlPlane, public_key: str, nodes: list[dict[str, str]],
                 clients: int, nudges_each: int) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
        for i in range(min(clients, len(nodes))):
            spec = {"ws_url": cp.url.replace("http://", "ws://"), "public_key": public_key,
                    "nodes": nodes[i::clients], "nudges_each": nudges_each}
            spec_path, out, ready = (workdir / f"{name}-{i}.{kind}" for kind in ("spec", "out", "ready"))
            spec_path.write_text(json.dumps(spec))
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.nudge.streams", str(spec_path), str(out),
                                     str(ready)])
            self.procs.append((proc, out, ready))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(ready.exists() for _, _, ready in self.procs):
            failed = [p.returncode for p, _, _ in self.procs if p.poll() is not None]
            if failed:
                raise BenchmarkError(f"a stream-holding process exited with {failed[0]} before its streams opened")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"streams not all open after {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.2)

    def results(self, timeout: float) -> tuple[dict[str, list[float]], int, list[str]]:
        """Every node's nudge arrival times, once each process has all its nudges or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        for proc, _, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        seen: dict[str, list[float]] = {}
        problems: list[str] = []
        count = 0
        for proc, out, _ in self.procs:
            if proc.returncode != 0 or not out.exists():
                raise BenchmarkError(f"a stream-holding process failed ({proc.returncode})")
            data = json.loads(out.read_text())
            seen.update(data["seen"])
            problems += data["problems"]
            count += data["problem_count"]
        return seen, count, problems


def delivery(seen: dict[str, list[float]], commits: list[float]) -> dict[str, Any]:
    """Latency from each change's commit to each node's nudge of it (the i-th nudge answers the i-th change)."""
    latencies = [arrivals[i] - commit for arrivals in seen.values() for i, commit in enumerate(commits)
                 if i < len(arrivals)]
    expected = len(seen) * len(commits)
    return {"nodes": len(seen), "expected": expected, "delivered": len(latencies),
            "delivered_share": round(len(latencies) / expected, 5) if expected else 0.0,
            "latency_ms": latency_summary_ms(latencies)}


def drive(args: argparse.Namespace, env: Environment, cp: ControlPlane, setup: dict[str, Any],
          workdir: Path) -> dict[str, Any]:
    say(f"opening {args.nodes} streams from {args.clients} processes, and the single node's")
    fleet = Holders(workdir, "fleet", cp=cp, public_key=setup["public_key"], nodes=setup["sites"]["fleet"],
                    clients=args.clients, nudges_each=1)
    single = Holders(workdir, "single", cp=cp, public_key=setup["public_key"], nodes=setup["sites"]["single"],
                     clients=1, nudges_each=args.rounds)
    with timed() as t_connect:
        fleet.wait_ready()
        single.wait_ready()
    say(f"streams open in {t_connect['s']:.1f}s; baseline: {args.rounds} changes of the single node's site")
    marks = env.shell_json(CHANGE_CODE % {"slug": "single", "rounds": args.rounds, "tag": "b", "pause": 0.5})
    seen, problems, first = single.results(DELIVERY_TIMEOUT_S)
    baseline = delivery(seen, marks["commits"])
    say(f"fleet: one change of the site of {args.nodes} nodes")
    cpu0 = cp.cpu_seconds()
    change = env.shell_json(CHANGE_CODE % {"slug": "fleet", "rounds": 1, "tag": "f", "pause": 0.0}, timeout=900)
    seen, fleet_problems, fleet_first = fleet.results(DELIVERY_TIMEOUT_S)
    last = max((a[0] for a in seen.values() if a), default=change["commits"][0])
    result = delivery(seen, change["commits"])
    cpu_s = cp.cpu_seconds() - cpu0
    base_p50 = baseline["latency_ms"]["p50"] or None
    return {
        "connect_s": round(t_connect["s"], 2),
        "baseline": baseline,
        "fleet": {**result, "publish_s": round(change["commits"][0] - change["started"][0], 3),
                  "nudges_sent_s": round(change["sent"][0] - change["commits"][0], 3),
                  "all_delivered_s": round(last - change["commits"][0], 3),
                  "server_cpu_s": round(cpu_s, 2)},
        "verification_problems": problems + fleet_problems,
        "verification_problem_examples": (first + fleet_first)[:10],
        "ratios": {
            "fleet_p50_over_single_p50": round(result["latency_ms"]["p50"] / base_p50, 2) if base_p50 else None,
            "fleet_p99_over_single_p50": round(result["latency_ms"]["p99"] / base_p50, 2) if base_p50 else None,
        },
    }


def table(report: dict[str, Any]) -> str:
    rows = [("change", "nodes", "delivered", "p50 ms", "p99 ms", "max ms")]
    for name in ("baseline", "fleet"):
        d = report[name]
        rows.append((name, str(d["nodes"]), f"{d['delivered']}/{d['expected']}", *cli.latency_cells(d["latency_ms"])))
    f, r = report["fleet"], report["ratios"]
    return cli.table_text(
        rows,
        f"fleet: publish {f['publish_s']} s (sign, audit, store {f['nodes']} states), nudges sent "
        f"{f['nudges_sent_s']} s after commit, all delivered {f['all_delivered_s']} s after commit; "
        f"control-plane cpu {f['server_cpu_s']} s",
        f"fleet p50 / single p50: {r['fleet_p50_over_single_p50']}   fleet p99 / single p50: "
        f"{r['fleet_p99_over_single_p50']}   verification problems: {report['verification_problems']}",
        "(latency: from the change's commit to the node holding its verified desired state)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("nudge", args, ("nodes", "clients", "workers", "rounds"))

    def body() -> None:
        with Environment(db_name=args.db_name, keep_db=args.keep_db) as env, \
                tempfile.TemporaryDirectory(prefix="nudge-bench-") as workdir:
            migrate_s = cli.migrate_fresh(env, say)
            with timed() as t_seed:
                setup = env.shell_json(SETUP_CODE % {"nodes": args.nodes}, timeout=900)
            cp = env.start_control_plane(workers=args.workers)
            say(f"control plane on {cp.url} with {args.workers} worker(s); {args.nodes} nodes seeded")
            report["setup"] = {"migrate_s": round(migrate_s, 2), "seed_s": round(t_seed["s"], 2)}
            with cli.log_on_failure(cp, say):
                report.update(drive(args, env, cp, setup, Path(workdir)))
            report["server_log_tail"] = cp.log_tail(3000)
            if report["fleet"]["delivered"] < report["fleet"]["expected"]:
                say(f"{report['fleet']['expected'] - report['fleet']['delivered']} nudges not delivered")

    return cli.run("nudge", report, body, say=say, output=args.output, table=table)


if __name__ == "__main__":
    sys.exit(main())

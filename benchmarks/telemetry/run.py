"""Live telemetry at N simulated nodes: control-plane CPU and the latency from a node's send to an operator's
browser socket, against a loopback websocket echo measured in the same run.

Run: ``.venv/bin/python -m benchmarks.telemetry [--nodes 1000 --sites 20 --operators 4 --rate 1
--duration 30 --warmup 5 --workers 2 --keep-db]``. See ``benchmarks/README.md``.

Phases, against a control plane of its own (``benchmarks.harness``):

1. setup: database, migrate, a region with ``--sites`` sites, one token with
   ``max_uses=N``, a superuser with a session (the operators' cookie);
   uvicorn with ``--workers`` processes;
2. enroll: N nodes ``POST /agent/v1/enroll`` (their sites in turn);
3. baseline ``echo``: N websockets to a plain echo server (its own process,
   ``benchmarks.telemetry.echo_server``), each sending a message of a
   telemetry frame's size ``--rate`` times a second (starts spread over the
   first second); latency is send to echo received;
4. ``telemetry``: N node streams (``/agent/v1/nodes/<id>/stream``, bearer
   credential), each sending one ``TelemetryFrame`` of one point (node
   resources and one model) ``--rate`` times a second, and ``--operators``
   browser sockets (``/ws/fleet/``, session cookie, Origin) that receive the
   fleet's ``confirmed`` messages. Latency is from a node's send to each
   operator socket's receipt of a confirmation of that node at or past its
   sequence number (a confirmation is the node's high-water mark, and the
   control plane merges those of a short interval); ``ack`` latency is to the
   node's acknowledgement (after commit).

Each measured phase has a warm-up and a window; only messages sent inside
the window count. ``server cpu`` is cores used by all uvicorn processes
(PostgreSQL and Redis not included). The report checks that the control
plane committed every point sent (``server_check``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import websockets

from benchmarks import cli
from benchmarks.harness import PYTHON, REPO, BenchmarkError, ControlPlane, Environment, free_port, raise_on_sigterm
from benchmarks.loadgen import latency_summary_ms
from edge_runtime import protocol

SETUP_CODE = """
import json
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from audit.services import Actor
from sites import services
actor = Actor.system("benchmark")
region = services.region_create(actor=actor, slug="bench", name="Benchmark")
sites = [services.site_create(actor=actor, region=region, slug=f"bench-{i}", name=f"Benchmark site {i}",
                              latitude=40 + i % 20, longitude=-10 + i % 40) for i in range(SITES)]
tokens = [services.token_create(actor=actor, site=s, max_uses=10000, note="telemetry benchmark")[1] for s in sites]
user = get_user_model().objects.create_superuser("bench-operator", "bench@example.org", "not-used-bench-pw")
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
print(json.dumps({"tokens": tokens, "session": session.session_key}))
"""

CHECK_CODE = """
import json
from django.db.models import Sum
from sites.models import TelemetryGap, TelemetrySample, TelemetryStream
agg = TelemetryStream.objects.aggregate(points=Sum("points"), lost=Sum("lost"))
print(json.dumps({
    "streams": TelemetryStream.objects.count(),
    "points_committed": agg["points"] or 0,
    "points_lost": agg["lost"] or 0,
    "gaps": TelemetryGap.objects.count(),
    "history_rows": TelemetrySample.objects.count(),
}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.telemetry", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes (1..10000, default 1000)")
    p.add_argument("--sites", type=int, default=20, help="sites the nodes are spread over (default 20)")
    p.add_argument("--operators", type=int, default=4, help="operator browser sockets on /ws/fleet/ (default 4)")
    p.add_argument("--rate", type=float, default=1.0, help="messages per node per second (default 1)")
    cli.add_window_options(p)
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    cli.add_database_options(p, "telemetry")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 10_000:
        p.error("--nodes must be between 1 and 10000")
    cli.check_positive(p, args, ("sites", "operators", "workers"))
    if not 0 < args.rate <= 50:
        p.error("--rate must be above 0 and at most 50 per second")
    cli.check_window(p, args)
    return args


def say(message: str) -> None:
    print(f"[telemetry-bench] {message}", file=sys.stderr, flush=True)


def frame(seq: int) -> str:
    point = protocol.TelemetryPoint(
        seq=seq, at=dt.datetime.now(dt.UTC), interval_s=1.0,
        resources=protocol.NodeResources(cpu_percent=random.uniform(5, 60), load1=0.4, memory_used_mb=812.5,  # noqa: S311
                                         memory_total_mb=4096, disk_used_mb=10240, disk_total_mb=65536,
                                         inference_queue_depth=0, telemetry_backlog=0),
        models=[protocol.ModelTelemetry(model="resnet", version="1", requests=random.randint(0, 50), errors=0,  # noqa: S311
                                        latency_p50_ms=3.1, latency_p95_ms=7.9, batches=12, batch_size_mean=2.5)],
    )
    return protocol.TelemetryFrame(items=[point]).model_dump_json()


class Window:
    """The warm-up and the measured window of a phase, on the monotonic clock."""

    def __init__(self, warmup: float, duration: float) -> None:
        self.start = time.monotonic() + warmup
        self.end = self.start + duration

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end


async def paced(count: int, rate: float, window: Window, send: Callable[[int, int], Awaitable[None]]) -> None:
    """Call ``send(i, k)`` for each of ``count`` senders ``rate`` times a second, starts spread over a period."""
    period = 1.0 / rate

    async def one(i: int) -> None:
        await asyncio.sleep(period * i / count)
        k = 0
        next_at = time.monotonic()
        while next_at < window.end:
            k += 1
            await send(i, k)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    await asyncio.gather(*(one(i) for i in range(count)))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def echo_phase(args: argparse.Namespace, port: int) -> dict[str, Any]:
    payload = frame(1)
    sockets = [await websockets.connect(f"ws://127.0.0.1:{port}", max_size=2**20) for _ in range(args.nodes)]
    window = Window(args.warmup, args.duration)
    latencies: list[float] = []
    sent = {"n": 0}

    async def send(i: int, k: int) -> None:
        t = time.monotonic()
        await sockets[i].send(payload)
        await sockets[i].recv()
        if window.inside(t):
            latencies.append(time.monotonic() - t)
            sent["n"] += 1

    cpu0, t0 = _cpu(), time.monotonic()
    await paced(args.nodes, args.rate, window, send)
    cpu = (_cpu() - cpu0) / (time.monotonic() - t0)
    for ws in sockets:
        await ws.close()
    return {"name": "echo", "messages": sent["n"], "throughput_mps": round(sent["n"] / args.duration, 1),
            "latency_ms": latency_summary_ms(latencies), "client_cpu": round(cpu, 3)}


class TelemetryPhase:
    """What the telemetry phase sends and receives: send times, latencies, counts and dropped streams."""

    def __init__(self, args: argparse.Namespace, nodes: list[dict[str, Any]], node_sockets: list[Any],
                 operators: int) -> None:
        self.args = args
        self.nodes = nodes
        self.node_sockets = node_sockets
        self.window = Window(args.warmup, args.duration)
        self.sent_at: dict[tuple[str, int], float] = {}
        self.measured: set[tuple[str, int]] = set()
        self.ack_latencies: list[float] = []
        self.op_latencies: list[float] = []
        # (seconds into the window when sent, latency) of each operator receipt and ack: whether a tail is
        # spread over the window or comes from a stall.
        self.op_timeline: list[tuple[float, float]] = []
        self.ack_timeline: list[tuple[float, float]] = []
        self.received = [0] * operators
        self.totals = {"sent": 0, "acked": 0}
        self.errors: list[str] = []
        self.closed: set[int] = set()

    async def send(self, i: int, k: int) -> None:
        if i in self.closed:
            return
        node_id = self.nodes[i]["node_id"]
        body = frame(k)
        t = time.monotonic()
        self.sent_at[(node_id, k)] = t
        if self.window.inside(t):
            self.measured.add((node_id, k))
        try:
            await self.node_sockets[i].send(body)
            self.totals["sent"] += 1
            ack = protocol.TelemetryAck.model_validate_json(await self.node_sockets[i].recv())
        except websockets.ConnectionClosed as exc:
            # Counted, and this node stops: the report says how many streams the control plane dropped.
            self.closed.add(i)
            self.measured.discard((node_id, k))
            self.errors.append(f"node stream closed: {exc}")
            return
        if ack.seq != k:
            raise BenchmarkError(f"node {node_id} sent {k}, was acknowledged {ack.seq}")
        self.totals["acked"] += 1
        if self.window.inside(t):
            self.ack_latencies.append(time.monotonic() - t)
            self.ack_timeline.append((t - self.window.start, self.ack_latencies[-1]))

    async def listen(self, o: int, ws: Any) -> None:
        # A confirmation carries the node's high-water mark: seq k confirms every message up to k. The
        # control plane merges the confirmations of one interval, so a node's k-1 and k may arrive as k.
        confirmed: dict[str, int] = {}
        async for raw in ws:
            now = time.monotonic()
            message = json.loads(raw)
            if message.get("type") != "confirmed":
                continue
            for site in message["sites"].values():
                for node_id, info in site["nodes"].items():
                    before = confirmed.get(node_id, 0)
                    if info["seq"] <= before:
                        continue
                    confirmed[node_id] = info["seq"]
                    for seq in range(before + 1, info["seq"] + 1):
                        if (node_id, seq) in self.measured:
                            self.op_latencies.append(now - self.sent_at[(node_id, seq)])
                            self.op_timeline.append((self.sent_at[(node_id, seq)] - self.window.start,
                                                     self.op_latencies[-1]))
                            self.received[o] += 1

    def figures(self, cpu: float, server_cpu: float) -> dict[str, Any]:
        n = len(self.measured)
        return {
            "name": "telemetry", "messages": n, "throughput_mps": round(n / self.args.duration, 1),
            "latency_ms": latency_summary_ms(self.op_latencies),
            "ack_latency_ms": latency_summary_ms(self.ack_latencies),
            "latency_by_second": by_second(self.op_timeline), "ack_latency_by_second": by_second(self.ack_timeline),
            "operators": self.args.operators, "operator_receipts": self.received,
            # Each operator should see every measured message once.
            "operator_missing": [n - r for r in self.received],
            "points_sent": self.totals["sent"], "points_acked": self.totals["acked"],
            "errors_total": len(self.errors), "first_error": self.errors[0] if self.errors else "",
            "client_cpu": round(cpu, 3), "server_cpu": round(server_cpu, 3),
        }


async def telemetry_phase(args: argparse.Namespace, cp: ControlPlane, nodes: list[dict[str, Any]],
                          session: str) -> dict[str, Any]:
    stream = f"ws://127.0.0.1:{cp.port}/agent/v1/nodes/%s/stream"
    node_sockets = []
    for node in nodes:
        ws = await websockets.connect(stream % node["node_id"], max_size=2**20,
                                      additional_headers={"Authorization": f"Bearer {node['credential']}"})
        node_sockets.append(ws)
    headers = {"Cookie": f"sessionid={session}", "Origin": cp.url}
    operators = [await websockets.connect(f"ws://127.0.0.1:{cp.port}/ws/fleet/", additional_headers=headers,
                                          max_size=2**24) for _ in range(args.operators)]
    for ws in operators:
        if json.loads(await ws.recv())["type"] != "hello":
            raise BenchmarkError("an operator socket did not open with hello")

    phase = TelemetryPhase(args, nodes, node_sockets, len(operators))
    listeners = [asyncio.create_task(phase.listen(o, ws)) for o, ws in enumerate(operators)]
    cpu0, srv0, t0 = _cpu(), cp.cpu_seconds(), time.monotonic()
    await paced(args.nodes, args.rate, phase.window, phase.send)
    elapsed = time.monotonic() - t0
    cpu, server_cpu = (_cpu() - cpu0) / elapsed, (cp.cpu_seconds() - srv0) / elapsed
    await asyncio.sleep(1.0)  # the last broadcasts
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    for ws in [*node_sockets, *operators]:
        await ws.close()
    return phase.figures(cpu, server_cpu)


def by_second(timeline: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Latency summaries per second of the window, by when the message was sent."""
    seconds: dict[int, list[float]] = {}
    for at, latency in timeline:
        seconds.setdefault(int(at), []).append(latency)
    return [{"second": second, "messages": len(latencies), **latency_summary_ms(latencies)}
            for second, latencies in sorted(seconds.items())]


async def enroll(cp: ControlPlane, tokens: list[str], count: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=cp.url, limits=limits, timeout=httpx.Timeout(30.0)) as client:
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> dict[str, Any]:
            async with gate:
                body = protocol.EnrollRequest(token=tokens[i % len(tokens)], name=f"node-{i:05d}")
                r = await client.post("/agent/v1/enroll", content=body.model_dump_json(),
                                      headers={"Content-Type": "application/json"})
                if r.status_code != 201:
                    raise BenchmarkError(f"enrollment {i} failed: HTTP {r.status_code} {r.text[:200]}")
                answer: dict[str, Any] = r.json()
                return answer

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def table(report: dict[str, Any]) -> str:
    rows = [("phase", "messages", "msg/s", "p50 ms", "p99 ms", "max ms", "client cpu", "server cpu")]
    for ph in report["phases"].values():
        server = "" if ph.get("server_cpu") is None else f"{ph['server_cpu']:.2f}"
        rows.append((ph["name"], str(ph["messages"]), f"{ph['throughput_mps']:.1f}",
                     *cli.latency_cells(ph["latency_ms"]), f"{ph['client_cpu']:.2f}", server))
    rows.append(("  (ack)", "", "", *cli.latency_cells(report["phases"]["telemetry"]["ack_latency_ms"]), "", ""))
    r = report["ratios"]
    return cli.table_text(
        rows,
        f"telemetry p99 / echo p99: {r['telemetry_over_echo_p99']}   "
        f"telemetry p50 / echo p50: {r['telemetry_over_echo_p50']}   "
        f"target p99 < 500 ms: {'met' if report['target_met'] else 'NOT met'}",
        "(latency: node send -> operator socket receipt; ack: node send -> acknowledgement after commit;"
        " server cpu = all uvicorn processes)")


def echo_server_start() -> tuple[subprocess.Popen[bytes], int]:
    """The loopback websocket echo server of the baseline, in its own process, once it is ready."""
    echo_port = free_port()
    echo_proc = subprocess.Popen([PYTHON, "-m", "benchmarks.telemetry.echo_server", str(echo_port)],
                                 cwd=REPO, stdout=subprocess.PIPE)
    if echo_proc.stdout is None or echo_proc.stdout.readline().strip() != b"ready":
        echo_proc.terminate()
        echo_proc.wait(timeout=10)
        raise BenchmarkError("the echo server did not start")
    return echo_proc, echo_port


async def drive(args: argparse.Namespace, cp: ControlPlane, setup: dict[str, Any], echo_port: int) -> dict[str, Any]:
    say(f"enrolling {args.nodes} nodes over {args.sites} sites")
    nodes = await enroll(cp, setup["tokens"], args.nodes)
    window = f"{args.warmup:g}s warm-up + {args.duration:g}s at {args.rate:g}/s per node"
    say(f"baseline: {args.nodes} sockets to a loopback echo server, {window}")
    echo = await echo_phase(args, echo_port)
    say(f"telemetry: {args.nodes} node streams, {args.operators} operator sockets, {window}")
    live = await telemetry_phase(args, cp, nodes, setup["session"])
    return {"echo": echo, "telemetry": live}


def verdict(report: dict[str, Any]) -> None:
    """The ratios against the echo baseline, and whether the target (p99 under 500 ms, nothing lost) is met."""
    echo, live = report["phases"]["echo"], report["phases"]["telemetry"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    report["ratios"] = {"telemetry_over_echo_p50": ratio(live["latency_ms"]["p50"], echo["latency_ms"]["p50"]),
                        "telemetry_over_echo_p99": ratio(live["latency_ms"]["p99"], echo["latency_ms"]["p99"])}
    report["target_met"] = (live["latency_ms"]["p99"] < 500 and not any(live["operator_missing"])
                            and not live["errors_total"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("telemetry", args, ("nodes", "sites", "operators", "rate", "duration", "warmup",
                                                   "workers"))

    def body() -> None:
        with Environment(db_name=args.db_name, keep_db=args.keep_db,
                         extra_env={"EDGEWISE_SYNC_INTERVAL": "3600"}) as env:
            migrate_s = cli.migrate_fresh(env, say)
            setup = env.shell_json(SETUP_CODE.replace("SITES", str(args.sites)))
            cp = env.start_control_plane(workers=args.workers)
            say(f"control plane on {cp.url} with {args.workers} worker(s)")
            echo_proc, echo_port = echo_server_start()
            try:
                report["setup"] = {"migrate_s": round(migrate_s, 2)}
                with cli.log_on_failure(cp, say):
                    report["phases"] = asyncio.run(drive(args, cp, setup, echo_port))
                report["server_check"] = env.shell_json(CHECK_CODE)
                report["server_log_tail"] = cp.log_tail(4000)
                if report["phases"]["telemetry"]["errors_total"]:
                    say(f"{report['phases']['telemetry']['errors_total']} node streams dropped; control plane "
                        f"log:\n{cp.log_tail(3000)}")
            finally:
                echo_proc.terminate()
                echo_proc.wait(timeout=10)
        verdict(report)

    return cli.run("telemetry", report, body, say=say, output=args.output, table=table)


if __name__ == "__main__":
    sys.exit(main())

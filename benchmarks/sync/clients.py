"""Load-generator processes: one measured phase driven by several processes at once.

One Python process drives about 1,000-2,000 requests a second before its own CPU sets the pace (the
table's ``client cpu`` nears 1.0). With ``--clients K`` the benchmark hands each of K processes a share
of the settled nodes (their identities: node id, credential, pinned key, applied state, held digest) and
a window in wall-clock time; every process syncs its nodes in turn with its share of the requests in
flight, counts what completes inside the window, and writes its latencies, errors, syncs and CPU to a
file. The parent samples the control plane's CPU at the window's edges and merges the processes'
figures into one phase (throughput summed, percentiles over every latency).

Run by the benchmark as ``python -m benchmarks.sync.clients SPEC OUT``; not meant to be run by hand.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import PhaseResult, Recorder, RequestFailed, closed_loop_between
from benchmarks.sync.fleet import Fleet, SimNode
from edge_runtime import protocol

# Time for every process to start, import and load its nodes before the warm-up begins.
START_ALLOWANCE_S = 3.0
START_ALLOWANCE_PER_NODE_S = 0.0002


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    fleet = Fleet(nodes=[SimNode.from_identity(held) for held in spec["nodes"]])
    concurrency = spec["concurrency"]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=spec["url"], limits=limits, timeout=httpx.Timeout(30.0)) as client:
        if spec["phase"] == "health":
            async def request() -> None:
                resp = await client.get(f"{protocol.API_PREFIX}/health")
                if resp.status_code != 200:
                    raise RequestFailed(f"health {resp.status_code}", resp.text[:200])
                resp.json()
        else:
            async def request() -> None:
                await fleet.sync_next(client)
        syncs, quiet, desired = fleet.syncs(), fleet.quiet_answers(), fleet.desired_received()
        rec, cpu_s = await closed_loop_between(request, concurrency=concurrency, window_start=spec["window_start"],
                                               window_end=spec["window_end"])
    return {**rec.as_parts(), "cpu_s": cpu_s, "syncs": fleet.syncs() - syncs,
            "quiet": fleet.quiet_answers() - quiet, "desired_received": fleet.desired_received() - desired}


def spread_phase(*, name: str, url: str, nodes: list[SimNode], clients: int, concurrency: int, warmup: float,
                 duration: float, server_cpu: Any, workdir: Path) -> tuple[PhaseResult, dict[str, int]]:
    """One closed-loop phase (``health`` or ``sync``) driven by ``clients`` processes: the merged phase, and
    the syncs, quiet answers and desired states its nodes received (the warm-up included)."""
    start = time.time() + START_ALLOWANCE_S + START_ALLOWANCE_PER_NODE_S * len(nodes)
    window_start, window_end = start + warmup, start + warmup + duration
    procs: list[tuple[subprocess.Popen[bytes], Path, int]] = []
    for i in range(clients):
        share = nodes[i::clients]
        in_flight = max(1, min(len(share), concurrency // clients + (i < concurrency % clients)))
        spec = {"phase": name, "url": url, "nodes": [n.identity() for n in share], "concurrency": in_flight,
                "window_start": window_start, "window_end": window_end}
        spec_path, out_path = workdir / f"{name}-{i}.spec.json", workdir / f"{name}-{i}.out.json"
        spec_path.write_text(json.dumps(spec))
        procs.append((subprocess.Popen([sys.executable, "-m", "benchmarks.sync.clients", str(spec_path),
                                        str(out_path)]), out_path, in_flight))
    time.sleep(max(0.0, window_start - time.time()))
    cpu0 = server_cpu()
    time.sleep(max(0.0, window_end - time.time()))
    cpu1 = server_cpu()
    merged, totals, client_cpu_s = Recorder(), {"syncs": 0, "quiet": 0, "desired_received": 0}, 0.0
    for proc, out_path, _ in procs:
        if proc.wait(timeout=duration + warmup + 120) != 0:
            raise RuntimeError(f"load-generator process for {name} exited with {proc.returncode}")
        parts = json.loads(out_path.read_text())
        merged.merge(parts)
        client_cpu_s += parts["cpu_s"]
        for key in totals:
            totals[key] += parts[key]
    result = merged.result(name, sum(c for _, _, c in procs), duration_s=duration, seconds=duration,
                           client_cpu=round(client_cpu_s / duration, 3), server_cpu=round((cpu1 - cpu0) / duration, 3))
    return result, totals


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    out_path.write_text(json.dumps(asyncio.run(_run(json.loads(spec_path.read_text())))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Node audit entries ingested per second, from N simulated nodes syncing over real HTTP.

Run: ``.venv/bin/python -m benchmarks.audit.nodes [--nodes 1000 --entries 10
--concurrency 64 --duration 30 --warmup 5 --workers 2]``.

Each simulated node enrolls with an identity key and keeps a real Merkle log
(:class:`edge_runtime.merkle.MemoryTree`). In the measured phases it syncs in
turn, as ``benchmarks.sync`` does:

1. ``sync``: the baseline, plain syncs with the node's signed checkpoint but
   no new entries;
2. ``audit``: before each sync the node logs ``--entries`` new entries, and
   the sync uploads them with its signed checkpoint and both consistency
   proofs. A sync's latency here is the time from upload to holding the
   control plane's cosigned checkpoint, which the node checks.

Then, in the same database, ``plain_insert``: the same number of rows as the
audit phase stored, inserted as plain rows into a scratch table of the same
columns (one multi-row INSERT per sync batch): what storing them costs
without any verification, proofs or cosigning.

Figures: entries/s ingested, the p99 from upload to cosigned, and the ratios
audit/sync (what the log costs a sync) and ingest/plain-insert.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import psycopg

from benchmarks import cli
from benchmarks.harness import BenchmarkError, ControlPlane, Environment, raise_on_sigterm, timed
from benchmarks.loadgen import PhaseResult, RequestFailed, closed_loop, each_once
from benchmarks.sync.fleet import JSON, Fleet, SimNode
from benchmarks.sync.run import SETUP_CODE, connect
from edge_runtime import merkle, notes, protocol, signing
from edge_runtime.audit import node_log_origin
from edge_runtime.protocol.audit import encode_proof, entry_chain_hash


@dataclasses.dataclass(eq=False)
class AuditNode(SimNode):
    """A simulated node with an identity key and a Merkle audit log it uploads as the protocol says."""

    def __post_init__(self) -> None:
        self.key = signing.generate_private_key()
        self.tree = merkle.MemoryTree()
        self.entries: list[protocol.LogEntry] = []
        self.stored = self.cosigned_size = 0
        self.pending_entries = 0
        self.ingested = 0

    def enroll_body(self, token: str) -> protocol.EnrollRequest:
        identity = base64.b64encode(signing.public_key_raw(self.key.public_key())).decode()
        return protocol.EnrollRequest(token=token, name=self.name, role=self.role, hardware=self.hardware,
                                      runtime_version="0.1.0-bench", identity_key=identity)

    def log(self, count: int) -> None:
        for _ in range(count):
            prev = entry_chain_hash(self.entries[-1].leaf_data()) if self.entries else "0" * 64
            entry = protocol.LogEntry(seq=len(self.entries) + 1, at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
                                      action="query.answered",
                                      detail='{"query_id":"bench","rows":42,"rule":"aggregate-only"}',
                                      prev_hash=prev)
            self.entries.append(entry)
            self.tree.append(entry.leaf_hash())

    def upload(self) -> protocol.AuditUpload:
        origin = node_log_origin(self.node_id)
        size = self.tree.size
        sent = self.entries[self.stored:self.stored + protocol.AUDIT_BATCH_MAX]
        checkpoint = notes.Checkpoint(origin, size, self.tree.root())
        return protocol.AuditUpload(
            checkpoint=notes.sign_note(checkpoint.body(), origin, self.key), cosigned_size=self.cosigned_size,
            proof_from_cosigned=encode_proof(merkle.consistency_proof(self.tree, self.cosigned_size, size)),
            start=self.stored, entries=sent,
            proof_from_batch=encode_proof(merkle.consistency_proof(self.tree, self.stored + len(sent), size)))

    async def audited_sync(self, client: httpx.AsyncClient, entries: int) -> None:
        self.log(entries)
        upload = self.upload()
        body = protocol.SyncRequest(runtime_version="0.1.0-bench", hardware=self.hardware,
                                    actual=protocol.ActualState(applied_generation=self.applied_generation,
                                                                applied_epoch=self.applied_epoch),
                                    audit=upload)
        resp = await client.post(f"{protocol.API_PREFIX}/nodes/{self.node_id}/sync",
                                 content=body.model_dump_json(),
                                 headers={**JSON, "Authorization": f"Bearer {self.credential}"})
        if resp.status_code != 200:
            raise RequestFailed(f"sync {resp.status_code}", resp.text[:300])
        ack = protocol.SyncResponse.model_validate_json(resp.content).audit
        if ack is None or ack.state != "ok" or not ack.cosigned:
            raise RequestFailed("audit not cosigned", "" if ack is None else f"{ack.state}: {ack.message}")
        # The node holds its checkpoint cosigned: the upload's end of the measured latency.
        note = notes.parse_note(ack.cosigned)
        if note.text != notes.parse_note(upload.checkpoint).text or len(note.signatures) < 2:
            raise RequestFailed("cosigned checkpoint is not the one uploaded")
        self.ingested += ack.stored - self.stored
        self.stored, self.cosigned_size = ack.stored, ack.cosigned_size
        self.syncs += 1


class AuditFleet(Fleet):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.nodes = [AuditNode(index=n.index, hardware=n.hardware) for n in self.nodes]
        self._idle = asyncio.Queue()
        for node in self.nodes:
            self._idle.put_nowait(node)

    async def next_audited(self, client: httpx.AsyncClient, entries: int) -> None:
        node = await self._idle.get()
        try:
            await node.audited_sync(client, entries)  # type: ignore[attr-defined]
        finally:
            self._idle.put_nowait(node)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit.nodes", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=1000, help="simulated nodes (1..10000, default 1000)")
    p.add_argument("--entries", type=int, default=10, help="entries each node logs before each sync (default 10)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    cli.add_window_options(p)
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    cli.add_database_options(p, "audit_nodes")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 10_000:
        p.error("--nodes must be between 1 and 10000")
    if not 1 <= args.entries <= protocol.AUDIT_BATCH_MAX:
        p.error(f"--entries must be between 1 and {protocol.AUDIT_BATCH_MAX}")
    cli.check_positive(p, args, ("concurrency", "workers"))
    cli.check_window(p, args)
    return args


async def enroll_all(fleet: AuditFleet, cp: ControlPlane, token: str) -> PhaseResult:
    async def enroll(node: SimNode) -> None:
        assert isinstance(node, AuditNode)
        resp = await client.post(f"{protocol.API_PREFIX}/enroll", content=node.enroll_body(token).model_dump_json(),
                                 headers=JSON)
        if resp.status_code != 201:
            raise RequestFailed(f"enroll {resp.status_code}", resp.text[:300])
        answer = protocol.EnrollResponse.model_validate_json(resp.content)
        node.node_id, node.credential = answer.node_id, answer.credential
        node.public_key = signing.public_key_from_b64(answer.signing_public_key)
        node.fingerprint = answer.signing_key_fingerprint

    async with connect(cp, 16) as client:
        phase = await each_once("enroll", fleet.nodes, enroll, concurrency=16)
    if phase.errors_total:
        raise BenchmarkError(f"enroll: {phase.errors_total} failed; first: {phase.first_error}")
    return phase


async def drive(args: argparse.Namespace, cp: ControlPlane, token: str) -> dict[str, Any]:
    fleet = AuditFleet(args.nodes)
    concurrency = min(args.concurrency, args.nodes)
    enrolled = await enroll_all(fleet, cp, token)
    async with connect(cp, concurrency) as client:
        # Settle: each node takes its desired state, and its empty log is cosigned once.
        settle = await each_once("settle", fleet.nodes, lambda n: n.audited_sync(client, 0),  # type: ignore[attr-defined]
                                 concurrency=concurrency)
        if settle.errors_total:
            raise BenchmarkError(f"settle: {settle.errors_total} failed; first: {settle.first_error}")
        say(f"sync (no new entries), {concurrency} in flight")
        plain = await closed_loop("sync", lambda: fleet.next_audited(client, 0), concurrency=concurrency,
                                  warmup=args.warmup, duration=args.duration, server_cpu=cp.cpu_seconds)
        say(f"audit ({args.entries} entries per sync), {concurrency} in flight")
        before = sum(n.ingested for n in fleet.nodes)  # type: ignore[attr-defined]
        started = time.monotonic()
        audit = await closed_loop("audit", lambda: fleet.next_audited(client, args.entries),
                                  concurrency=concurrency, warmup=args.warmup, duration=args.duration,
                                  server_cpu=cp.cpu_seconds)
        elapsed = time.monotonic() - started
    ingested = sum(n.ingested for n in fleet.nodes) - before  # type: ignore[attr-defined]
    return {"concurrency": concurrency, "setup_phases": {p.name: p.as_dict() for p in (enrolled, settle)},
            "phases": {"sync": plain.as_dict(), "audit": audit.as_dict()},
            "entries": {"per_sync": args.entries, "ingested": ingested,
                        "ingested_per_s": round(audit.throughput_rps * args.entries, 1),
                        "phase_wall_s": round(elapsed, 2)}}


def plain_insert(db_url: str, rows: int, batch: int) -> dict[str, float]:
    """The same number of rows, inserted plainly (a multi-row INSERT per batch) into a scratch table."""
    detail = '{"query_id":"bench","rows":42,"rule":"aggregate-only"}'
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE plain_entries (LIKE audit_nodelogentry INCLUDING ALL)")
        node = "00000000-0000-0000-0000-000000000001"
        started = time.perf_counter()
        for first in range(0, rows, batch):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO plain_entries (node_uuid, site_uuid, seq, at, created_at, action, detail, prev_hash,"
                    " received_at) VALUES (%s, %s, %s, %s, now(), %s, %s, %s, now())",
                    [(node, node, seq, "2026-12-03T10:00:00+00:00", "query.answered", detail, "0" * 64)
                     for seq in range(first + 1, min(rows, first + batch) + 1)])
        elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": round(elapsed, 3), "rows_per_s": round(rows / elapsed, 1) if elapsed else 0.0}


def say(message: str) -> None:
    print(f"[audit-nodes-bench] {message}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    rows = [("phase", "in flight", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "client cpu",
             "server cpu")]
    for ph in [*report["setup_phases"].values(), *report["phases"].values()]:
        server = "" if ph.get("server_cpu") is None else f"{ph['server_cpu']:.2f}"
        rows.append((ph["name"], str(ph["concurrency"]), str(ph["requests"]), f"{ph['throughput_rps']:.1f}",
                     *cli.latency_cells(ph["latency_ms"]), str(ph["errors_total"]), f"{ph['client_cpu']:.2f}",
                     server))
    e, r = report["entries"], report["ratios"]
    return cli.table_text(
        rows,
        f"node entries ingested: {e['ingested_per_s']}/s ({e['per_sync']} per sync); "
        f"p99 upload -> cosigned: {report['phases']['audit']['latency_ms']['p99']:.0f} ms",
        f"plain inserts of the same rows: {report['plain_insert']['rows_per_s']}/s",
        f"audit/sync throughput: {r['audit_over_sync_throughput']}   audit p99 / sync p99: "
        f"{r['audit_over_sync_p99']}   ingest / plain insert: {r['ingest_over_plain_insert']}")


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    audit, sync = report["phases"]["audit"], report["phases"]["sync"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {"audit_over_sync_throughput": ratio(audit["throughput_rps"], sync["throughput_rps"]),
            "audit_over_sync_p99": ratio(audit["latency_ms"]["p99"], sync["latency_ms"]["p99"]),
            "ingest_over_plain_insert": ratio(report["entries"]["ingested_per_s"],
                                              report["plain_insert"]["rows_per_s"])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("audit_nodes", args, ("nodes", "entries", "concurrency", "duration", "warmup",
                                                     "workers"))

    def body() -> None:
        with Environment(db_name=args.db_name, keep_db=args.keep_db,
                         extra_env={"EDGEWISE_SYNC_INTERVAL": "3600"}) as env:
            migrate_s = cli.migrate_fresh(env, say)
            site = env.shell_json(SETUP_CODE % {"per_token": args.nodes, "tokens": 1})
            with timed() as t_start:
                cp = env.start_control_plane(workers=args.workers)
            report["setup"] = {"migrate_s": round(migrate_s, 2), "server_start_s": round(t_start["s"], 2)}
            with cli.log_on_failure(cp, say):
                report.update(asyncio.run(drive(args, cp, site["tokens"][0])))
            report["plain_insert"] = plain_insert(env.db.url, max(report["entries"]["ingested"], args.entries),
                                                  args.entries)
            report["ratios"] = ratios(report)
            report["server_log_tail"] = cp.log_tail(4000)

    return cli.run("audit_nodes", report, body, say=say, output=args.output, table=table)


if __name__ == "__main__":
    sys.exit(main())

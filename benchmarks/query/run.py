"""Federated query speed: one node's engine against DuckDB, and one query across 50 simulated sites.

Measured in one run, on the same files, and reported as ratios:

1. **node**: for each size (``--rows``, default 1M and 10M), a Parquet file
   of plant sensor readings (line, machine, time, temperature, vibration,
   parts, defect; generated in 1M-row chunks so memory stays modest) is
   queried with "per line, machine and hour: count, mean, std, min and max of
   temperature", once through :func:`edge_runtime.data.engine.run_query`
   (the whole node path: spec validation, policy, pyarrow read with column
   pruning, in chunks of row groups with the next one read meanwhile, pandas
   grouping, partials merged across chunks, k-suppression, audit record) and once
   by DuckDB (``read_parquet``, same aggregate). Figures are the median of
   ``--repeat`` runs after a warm-up, the two alternating; the ratio ``engine / duckdb`` is the
   target (at most 2).
2. **federation**: ``--sites`` sites (default 50), each with its own plant's
   data (``--site-rows`` rows, different lines, machines and behaviour per
   site) in its own Parquet file, catalog, data policy (k = 5) and audit log.
   One query is answered by every site (in a thread pool of ``--workers``,
   like a fleet answering at once), each answer goes through its JSON wire
   form and back, and the control plane merges them. End-to-end latency is
   from the spec leaving to the merged result; its baseline is DuckDB over
   the union of all the sites' files in the same run. The merged result is
   checked against DuckDB's (groups with at least k rows at every site).
3. **end to end** (:mod:`benchmarks.query.e2e`): one query across ``--e2e-sites``
   simulated sites (default 50) through the real control plane (its own
   database and uvicorn), from ``query_create`` to ``complete``; the
   simulated nodes speak the real protocol (enroll, sync, stream nudges,
   ``run_query``, posted answers). Its baseline is the plain sync round trip
   of the same nodes in the same run. ``--e2e-sites 0`` skips it.

Usage::

    .venv/bin/python -m benchmarks.query                       # 1M and 10M rows, 50 sites
    .venv/bin/python -m benchmarks.query --rows 200000 --sites 10 --repeat 2

The report goes to ``benchmarks/results/query-<UTC timestamp>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.harness import machine, write_report
from benchmarks.query.data import TEMPERATURE_AGGREGATES, generate
from edge_runtime.audit import NodeAudit
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.engine import run_query
from edge_runtime.data.merge import merge_results
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, DatasetRule, SiteFacts

SPEC: dict[str, Any] = {
    "dataset": "readings",
    "group_by": ["line", "machine"],
    "time_bucket": {"column": "ts", "interval": "hour"},
    "aggregates": TEMPERATURE_AGGREGATES,
}
DUCKDB_SQL = """
SELECT line, machine, date_trunc('hour', ts) AS bucket, count(*) AS n, avg(temperature) AS mean,
       stddev_samp(temperature) AS std, min(temperature) AS min, max(temperature) AS max
FROM read_parquet(?) GROUP BY ALL
"""
def timed_pair(first: Callable[[], Any], second: Callable[[], Any], repeat: int) -> tuple[float, Any, float, Any]:
    """Median wall seconds of ``repeat`` runs of each after one warm-up, and their last results.

    The two alternate, so that a change in what else the machine runs weighs on both alike.
    """
    results = [first(), second()]
    times: list[list[float]] = [[], []]
    for _ in range(repeat):
        for i, fn in enumerate((first, second)):
            started = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - started)
    return statistics.median(times[0]), results[0], statistics.median(times[1]), results[1]


def node_benchmark(folder: Path, rows: int, repeat: int) -> dict[str, Any]:
    path = folder / f"readings-{rows}.parquet"
    started = time.perf_counter()
    generate(path, rows, seed=1)
    generate_s = time.perf_counter() - started
    catalog = Catalog.from_config({"datasets": [{"name": "readings", "kind": "parquet", "path": str(path),
                                                 "time_column": "ts"}]}, base_dir=folder)
    policy = DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=1, max_output_cells=10_000_000,
                        max_output_bytes=1 << 30)
    audit = NodeAudit(folder / f"audit-{rows}.sqlite3")

    def engine() -> QueryResult:
        return run_query(SPEC, catalog=catalog, policy=policy, site_facts=SiteFacts(site="bench"), audit=audit)

    connection = duckdb.connect()
    threads = int(connection.execute("SELECT current_setting('threads')").fetchone()[0])  # type: ignore[index]

    def baseline() -> list[Any]:
        return connection.execute(DUCKDB_SQL, [str(path)]).fetchall()

    engine_s, result, duckdb_s, reference = timed_pair(engine, baseline, repeat)
    assert result.status == "answered" and result.partials is not None, result.reason
    assert sum(result.partials.rows) == rows and len(result.partials.rows) == len(reference)
    figures = {
        "rows": rows,
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "generate_s": round(generate_s, 2),
        "groups": len(reference),
        "engine_s": round(engine_s, 3),
        "duckdb_s": round(duckdb_s, 3),
        "duckdb_threads": threads,
        "engine_over_duckdb": round(engine_s / duckdb_s, 3),
        "engine_rows_per_s": round(rows / engine_s),
    }
    path.unlink()
    return figures


SiteNode = tuple[Catalog, DataPolicy, SiteFacts, NodeAudit]


def federation_sites(folder: Path, sites: int, site_rows: int) -> tuple[list[SiteNode], list[str]]:
    """Each site's catalog, data policy (k = 5), facts and audit log over its own Parquet file; and the files."""
    nodes = []
    files = []
    for i in range(sites):
        site_dir = folder / f"site-{i:02d}"
        site_dir.mkdir()
        path = site_dir / "readings.parquet"
        generate(path, site_rows, seed=100 + i, lines=2 + i % 5, machines=4 + i % 9, days=7)
        files.append(str(path))
        catalog = Catalog.from_config({"datasets": [{"name": "readings", "kind": "parquet",
                                                     "path": "readings.parquet", "time_column": "ts"}]},
                                      base_dir=site_dir)
        policy = DataPolicy(datasets={"readings": DatasetRule()}, min_group_size=5)
        nodes.append((catalog, policy, SiteFacts(site=f"plant-{i:02d}"), NodeAudit(site_dir / "audit.sqlite3")))
    return nodes, files


def site_answer(node: SiteNode, spec_text: str) -> str:
    """A site's answer in its JSON wire form, as a node posts it."""
    catalog, policy, facts, audit = node
    result = run_query(json.loads(spec_text), catalog=catalog, policy=policy, site_facts=facts, audit=audit,
                       query_id="bench")
    return result.model_dump_json()


def federation_benchmark(folder: Path, sites: int, site_rows: int, workers: int, repeat: int) -> dict[str, Any]:
    nodes, files = federation_sites(folder, sites, site_rows)
    timings: dict[str, float] = {}
    wire_bytes = 0

    def federated() -> Any:
        nonlocal wire_bytes
        started = time.perf_counter()
        spec_text = json.dumps(SPEC)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answers = list(pool.map(lambda node: site_answer(node, spec_text), nodes))
        answered = time.perf_counter()
        results = [QueryResult.model_validate_json(text) for text in answers]
        merged = merge_results(SPEC, results, query_id="bench")
        done = time.perf_counter()
        timings["sites_s"] = answered - started
        timings["merge_s"] = done - answered
        wire_bytes = sum(len(a) for a in answers)
        return merged

    connection = duckdb.connect()

    def central() -> list[Any]:
        return connection.execute(DUCKDB_SQL, [files]).fetchall()

    phases: dict[str, list[float]] = {"sites_s": [], "merge_s": []}

    def federated_recorded() -> Any:
        merged = federated()
        for key in phases:
            phases[key].append(timings[key])
        return merged

    e2e_s, merged, central_s, reference = timed_pair(federated_recorded, central, repeat)
    check = compare(merged, reference)
    return {
        "sites": sites,
        "rows_per_site": site_rows,
        "rows_total": sites * site_rows,
        "workers": workers,
        "merged_groups": len(merged.rows),
        "suppressed_cells": merged.suppressed_cells,
        "wire_bytes_total": wire_bytes,
        "end_to_end_s": round(e2e_s, 3),
        "sites_answer_s": round(statistics.median(phases["sites_s"][1:] or phases["sites_s"]), 3),
        "merge_s": round(statistics.median(phases["merge_s"][1:] or phases["merge_s"]), 3),
        "duckdb_central_s": round(central_s, 3),
        "end_to_end_over_duckdb_central": round(e2e_s / central_s, 3),
        "check": check,
    }


def compare(merged: Any, reference: list[Any]) -> dict[str, Any]:
    """The merged result against DuckDB over the union: every merged group matches (k never hides a
    whole group here: site data differ by line names, so each group comes from one site)."""
    frame = merged.to_frame()
    expected = {(r[0], r[1], r[2].isoformat()): r for r in reference}
    worst = 0.0
    for row in frame.itertuples(index=False):
        ref = expected[(row.line, row.machine, row.bucket)]
        assert row.count == ref[3], (row, ref)
        for got, want in ((row.mean_temperature, ref[4]), (row.std_temperature, ref[5]),
                          (row.min_temperature, ref[6]), (row.max_temperature, ref[7])):
            if want is None:
                continue
            worst = max(worst, abs(got - want) / max(abs(want), 1e-12))
    return {"groups_compared": len(frame), "groups_in_duckdb": len(reference), "max_relative_difference": worst}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="rows of the single-node file(s)")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per figure (after one warm-up)")
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--site-rows", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="sites answering at once")
    parser.add_argument("--e2e-sites", type=int, default=50, help="simulated sites of the end-to-end run (0: skip)")
    parser.add_argument("--e2e-site-rows", type=int, default=2000)
    parser.add_argument("--e2e-repeat", type=int, default=5)
    parser.add_argument("--e2e-workers", type=int, default=2, help="uvicorn workers of the control plane")
    parser.add_argument("--output", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="edgewise-bench-query-"))
    report: dict[str, Any] = {"benchmark": "query", "machine": machine(), "spec": SPEC, "node": [],
                              "federation": None, "end_to_end": None}
    try:
        for rows in args.rows:
            figures = node_benchmark(folder, rows, args.repeat)
            report["node"].append(figures)
            print(f"node {rows:>11,} rows: engine {figures['engine_s']:.3f}s  duckdb {figures['duckdb_s']:.3f}s "
                  f"({figures['duckdb_threads']} threads)  ratio {figures['engine_over_duckdb']:.2f}", flush=True)
        if args.sites > 0:
            fed = federation_benchmark(folder, args.sites, args.site_rows, args.workers, args.repeat)
            report["federation"] = fed
            print(f"federation {fed['sites']} sites x {fed['rows_per_site']:,} rows: end to end "
                  f"{fed['end_to_end_s']:.3f}s (sites {fed['sites_answer_s']:.3f}s, merge {fed['merge_s']:.3f}s); "
                  f"duckdb central {fed['duckdb_central_s']:.3f}s; ratio {fed['end_to_end_over_duckdb_central']:.2f}",
                  flush=True)
        if args.e2e_sites > 0:
            from benchmarks.query.e2e import end_to_end_benchmark

            e2e = end_to_end_benchmark(sites=args.e2e_sites, site_rows=args.e2e_site_rows, repeat=args.e2e_repeat,
                                       workers=args.e2e_workers)
            report["end_to_end"] = e2e
            print(f"end to end {e2e['sites']} sites through the control plane: {e2e['end_to_end_s']:.3f}s "
                  f"(last site received {e2e['last_site_received_s']:.3f}s, answered "
                  f"{e2e['last_site_answered_s']:.3f}s); sync round trip {e2e['baseline_sync_round_trip_s']:.4f}s; "
                  f"ratio {e2e['end_to_end_over_sync_round_trip']:.1f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["ratios"] = {
        **{f"engine_over_duckdb_{f['rows']}": f["engine_over_duckdb"] for f in report["node"]},
        **({"federation_end_to_end_over_duckdb_central": report["federation"]["end_to_end_over_duckdb_central"]}
           if report["federation"] else {}),
        **({"end_to_end_over_sync_round_trip": report["end_to_end"]["end_to_end_over_sync_round_trip"]}
           if report["end_to_end"] else {}),
    }
    path = write_report("query", report, args.output)
    print(f"report: {path}")
    return 0

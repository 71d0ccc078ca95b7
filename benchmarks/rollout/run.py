"""Planning a rollout over N simulated nodes and publishing its first wave, against loading the same nodes.

Run: ``.venv/bin/python -m benchmarks.rollout [--nodes 10000 --sites 100 --wave 1000 --repeats 3 --keep-db]``.
See ``benchmarks/README.md`` for what it reports.

Phases, in a database of its own (``benchmarks.harness``):

1. setup (timed, not part of the ratio): create and migrate the database;
   create the fleet (``benchmarks.rollout.work.setup``): N nodes with the
   sync simulator's hardware profiles over ``--sites`` sites in four regions
   and jurisdictions, a placement rule that excludes one jurisdiction, and
   every node's desired state published with version 1.0.0 of a model;
2. baseline: load every active node with its site and region (what planning
   reads), ``--repeats`` times; the median is the baseline;
3. plan: ``rollout_create`` of version 2.0.0 over the whole estate (target
   nodes, placement of each with the reasons of every exclusion, waves, the
   plan's node rows, events and audit);
4. publish: ``rollout_start`` and one tick that switches the first wave
   (``--wave`` nodes): each gets a new signed desired state naming 2.0.0.

Phases 2-4 run in one process against the same rows. The target is
``plan_and_publish_s`` under 5 s at 10,000 nodes; the ratio is that time over
the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import cli
from benchmarks.harness import BenchmarkError, Environment, raise_on_sigterm

TARGET_S = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000, help="simulated nodes (default 10000)")
    p.add_argument("--sites", type=int, default=100, help="sites the nodes are spread over (default 100)")
    p.add_argument("--wave", type=int, default=100,
                   help="nodes in the wave that is published: the canary (default 100, 1 %% of 10000)")
    p.add_argument("--repeats", type=int, default=3, help="baseline loads; the median counts (default 3)")
    cli.add_database_options(p, "rollout")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 100_000:
        p.error("--nodes must be between 1 and 100000")
    if not 1 <= args.sites <= args.nodes:
        p.error("--sites must be between 1 and --nodes")
    if not 1 <= args.wave <= args.nodes:
        p.error("--wave must be between 1 and --nodes")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def say(message: str) -> None:
    print(f"[rollout-bench] {message}", file=sys.stderr, flush=True)


def _call(env: Environment, call: str) -> Any:
    """The JSON result of ``call`` (an expression over ``benchmarks.rollout.work``) in ``manage.py shell``."""
    return env.shell_json(f"import json\nfrom benchmarks.rollout import work\nprint(json.dumps({call}))",
                          timeout=1800)


def table(report: dict[str, Any]) -> str:
    m = report["measure"]
    rows = [
        ("load nodes (baseline, median)", f"{m['baseline_load_median_s']:.3f} s", f"{m['nodes_loaded']} nodes"),
        ("plan rollout", f"{m['plan_s']:.3f} s",
         f"{m['planned_nodes']} planned, {m['excluded_nodes']} excluded, waves {m['waves']}"),
        ("publish first wave", f"{m['publish_wave_s']:.3f} s", f"{m['wave_published_nodes']} signed desired states"),
        ("plan + publish", f"{m['plan_and_publish_s']:.3f} s", f"target < {TARGET_S:g} s"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append(f"plan+publish / load: {report['ratios']['plan_and_publish_over_load']}   "
                 f"within target: {report['within_target']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("rollout", args, ("nodes", "sites", "wave", "repeats"))

    def body() -> None:
        # A long sync interval keeps every simulated node "online" however long the setup takes.
        with Environment(db_name=args.db_name, keep_db=args.keep_db,
                         extra_env={"EDGEWISE_SYNC_INTERVAL": "3600"}) as env:
            migrate_s = cli.migrate_fresh(env, say)
            say(f"creating {args.nodes} simulated nodes over {args.sites} sites and publishing their desired states")
            setup = _call(env, f"work.setup({args.nodes}, {args.sites})")
            report["setup"] = {"migrate_s": round(migrate_s, 2), **setup}
            say("measuring: load the nodes (baseline), plan the rollout, publish its first wave")
            measured = _call(env, f"work.measure({json.dumps(setup['version'])}, {args.wave}, {args.repeats})")
            if measured["wave_published_nodes"] != min(args.wave, measured["planned_nodes"]) or \
                    not measured["wave_carries_new_version"]:
                raise BenchmarkError(f"the wave was not published as planned: {measured}")
            report["measure"] = measured
            load = measured["baseline_load_median_s"]
            report["ratios"] = {"plan_and_publish_over_load": round(measured["plan_and_publish_s"] / load, 2)
                                if load else None}
            report["within_target"] = measured["plan_and_publish_s"] < TARGET_S
            if args.keep_db:
                say(f"kept database {env.db.name} ({env.db.url})")

    return cli.run("rollout", report, body, say=say, output=args.output, table=table,
                   interrupted="interrupted; database dropped")


if __name__ == "__main__":
    sys.exit(main())

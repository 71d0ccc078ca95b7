"""The control plane's audit log: audited writes, appends and verification, each against a baseline of the same run.

Run: ``.venv/bin/python -m benchmarks.audit.log [--threads 1,4,16 --seconds 5 --entries 5000 --verify-entries
100000]`` (``--verify-entries 1000000`` for the 1 million target). Phases, in a database of its own
(``benchmarks.harness``), in one ``manage.py shell`` process each (``benchmarks.audit.log_work``):

1. writes: audited writes per second with N threads, one event per transaction, with the old chain append
   (one locked head row; the baseline, kept only in the benchmark) and with ``audit_record``;
2. appends: entries per second appended (and then sequenced and signed) against plain inserts of the same rows;
3. verify: ``audit_verify`` of a log of ``--verify-entries`` entries against reading the same rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import cli
from benchmarks.harness import Environment, raise_on_sigterm

VERIFY_TARGET_S = 60.0  # for 1 million entries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit.log", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,4,16", help="thread counts of the writes phase (default 1,4,16)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per arm and thread count")
    p.add_argument("--entries", type=int, default=5000, help="entries of the appends phase (default 5000)")
    p.add_argument("--verify-entries", type=int, default=100_000,
                   help="entries of the log that is verified (default 100000; 1000000 for the target)")
    cli.add_database_options(p, "audit_log")
    args = p.parse_args(argv)
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error("--threads is a comma-separated list of numbers")
    if not all(1 <= t <= 64 for t in args.thread_counts):
        p.error("--threads must each be between 1 and 64")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    cli.check_positive(p, args, ("entries", "verify_entries"))
    return args


def say(message: str) -> None:
    print(f"[audit-log-bench] {message}", file=sys.stderr, flush=True)


def _call(env: Environment, call: str) -> Any:
    return env.shell_json(f"import json\nfrom benchmarks.audit import log_work\nprint(json.dumps({call}))",
                          timeout=3600)


def table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [("measure", "baseline", "merkle log", "ratio")]
    for row in report["writes"]["rows"]:
        rows.append((f"audited writes/s, {row['threads']} threads", f"{row['old_chain_per_s']:.0f}",
                     f"{row['merkle_log_per_s']:.0f}", f"{row['ratio']}"))
    a = report["appends"]
    rows.append(("entries/s appended (vs plain inserts)", f"{a['plain_insert_per_s']:.0f}",
                 f"{a['append_per_s']:.0f}", f"{a['append_over_plain']}"))
    rows.append(("  + sequenced and signed", "", f"{a['sequence_and_sign_per_s']:.0f}",
                 f"{a['append_and_sequence_over_plain']}"))
    v = report["verify"]
    rows.append((f"verify {v['entries']} entries, s (vs reading them)", f"{v['read_rows_s']:.2f}",
                 f"{v['verify_s']:.2f}", f"{v['verify_over_read']}"))
    return cli.table_text(rows, "baselines: the old locking chain append; plain inserts of the same rows into a "
                                "table without indexes; reading the same rows with values_list")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("audit-log", args, ("threads", "seconds", "entries", "verify_entries"))

    def body() -> None:
        with Environment(db_name=args.db_name, keep_db=args.keep_db) as env:
            report["setup"] = {"migrate_s": round(cli.migrate_fresh(env, say), 2)}
            say(f"audited writes with {args.threads} threads, {args.seconds:g} s per arm")
            report["writes"] = _call(env, f"log_work.writes({args.thread_counts!r}, {args.seconds!r})")
            say(f"appending {args.entries} entries against plain inserts")
            report["appends"] = _call(env, f"log_work.appends({args.entries})")
            say(f"verifying a log of {args.verify_entries} entries")
            report["verify"] = _call(env, f"log_work.verify({args.verify_entries})")
            per_million = report["verify"]["verify_s"] * 1_000_000 / report["verify"]["entries"]
            report["verify"]["projected_1m_s"] = round(per_million, 1)
            report["within_target"] = per_million < VERIFY_TARGET_S

    return cli.run("audit-log", report, body, say=say, output=args.output, table=table,
                   interrupted="interrupted; database dropped")


if __name__ == "__main__":
    sys.exit(main())

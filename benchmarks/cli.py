"""What the command lines of the control-plane benchmarks share.

Their common options, the report's header, the run that turns a failure into
an exit code (2 for a :class:`~benchmarks.harness.BenchmarkError`, 130 for
Ctrl-C or SIGTERM, after the environment has cleaned up) and writes the
report only after a complete run, and the plain-text table they print.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.harness import BenchmarkError, ControlPlane, Environment, machine, timed, write_report

Say = Callable[[str], None]


def add_database_options(p: argparse.ArgumentParser, name: str) -> None:
    """``--keep-db``, ``--db-name`` and ``--output`` of benchmark ``name``."""
    p.add_argument("--keep-db", action="store_true", help="keep the database afterwards (its name is printed)")
    p.add_argument("--db-name", default=f"edgewise_bench_{name}_{os.getpid()}",
                   help=f"name of the database to create (must not exist; default edgewise_bench_{name}_<pid>)")
    p.add_argument("--output", default="", help=f"report path (default benchmarks/results/{name}-<timestamp>.json)")


def add_window_options(p: argparse.ArgumentParser) -> None:
    """``--duration`` and ``--warmup`` of the measured phases; check them with :func:`check_window`."""
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase (default 30)")
    p.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds before each window (default 5)")


def check_window(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be positive and --warmup not negative")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Each of the integer options ``names`` (their ``args`` attributes) is at least 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")


def report_header(name: str, args: argparse.Namespace, config: tuple[str, ...]) -> dict[str, Any]:
    """The first fields of every report: which benchmark, when, with which options, on which machine."""
    return {
        "benchmark": name,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {k: getattr(args, k) for k in config},
        "machine": machine(),
    }


def migrate_fresh(env: Environment, say: Say) -> float:
    """Create the run's database and migrate it; the seconds the migration took."""
    say(f"database {env.db.name}, data dir {env.data_dir}")
    env.db.create()
    with timed() as t_migrate:
        env.manage("migrate", "--no-input")
    return t_migrate["s"]


@contextlib.contextmanager
def log_on_failure(cp: ControlPlane, say: Say) -> Iterator[None]:
    """On a BenchmarkError, print the control plane's log (its warnings explain the failure) and re-raise."""
    try:
        yield
    except BenchmarkError:
        say(f"control plane log:\n{cp.log_tail()}")
        raise


def run(name: str, report: dict[str, Any], body: Callable[[], None], *, say: Say, output: str,
        table: Callable[[dict[str, Any]], str],
        interrupted: str = "interrupted; processes stopped and database dropped") -> int:
    """Run ``body`` (which fills ``report``), then write the report and print its table; the exit code."""
    try:
        body()
    except BenchmarkError as exc:
        say(f"failed: {exc}")
        return 2
    except KeyboardInterrupt:
        say(interrupted)
        return 130
    path = write_report(name, report, output)
    print(table(report))
    print(f"\nreport: {path}")
    return 0


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as aligned text: the first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table_text(rows: list[tuple[str, ...]], *footer: str) -> str:
    """:func:`columns`, then a blank line and the ``footer`` lines (ratios, what the columns mean)."""
    return "\n".join([*columns(rows), "", *footer])


def latency_cells(latency_ms: dict[str, float]) -> tuple[str, str, str]:
    """p50, p99 and max of a latency summary, as table cells."""
    return f"{latency_ms['p50']:.1f}", f"{latency_ms['p99']:.1f}", f"{latency_ms['max']:.1f}"

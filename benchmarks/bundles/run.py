"""Export and import of an air-gapped bundle holding a model, against sha256sum and tar of the same bytes.

Run: ``.venv/bin/python -m benchmarks.bundles [--model-mb 500 --repeat 3 --part-size MB --dir DIR --json]``.
No database and no server: the bundle code is :mod:`edge_runtime.airgap`. In a scratch directory (a fresh
one under ``--dir``, or a temporary one; removed at the end), on one model file of random bytes, each
repeat measures, alternating the order from one repeat to the next, every run a process of its own
(:mod:`benchmarks.bundles.measure`, :mod:`benchmarks.bundles.work`):

1. export: ``sha256sum`` then ``tar -cf`` then ``sync`` of the tar (the baseline), the same with
   ``openssl dgst -sha256`` (a stricter baseline: the SHA-256 code Python's hashlib runs), and
   ``write_bundle`` of a bundle in with three node entries and the model, its sha256 given (as the
   control plane's export does) and not given (then ``write_bundle`` hashes the file first);
2. import: ``tar -xf``, the hasher and ``sync`` of the file and its directory (the baselines), and
   ``read_bundle`` with the signature checked and every member written to staging, then fsync and
   ``os.replace`` of the artifact into its directory, as a node's import commits.

Then once each arm at a quarter of the model size, to show memory does not grow with it. MB = MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import cli
from benchmarks.bundles import report as reporting
from benchmarks.bundles.measure import (
    MIB,
    PEAK_RSS_SOURCE,
    Run,
    export_script,
    file_sha256,
    import_script,
    make_model,
    remove,
    run_arm,
    run_shell,
    stated_sha256,
)
from benchmarks.harness import BenchmarkError, raise_on_sigterm, timed, write_report

# The model, the baseline's tar, the bundle, the unhashed bundle (removed after its run), extracted and imported.
DISK_FACTOR = 6.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bundles", description=__doc__.splitlines()[0])
    p.add_argument("--model-mb", type=int, default=500, help="size of the model in MiB (default 500)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each arm and baseline; medians count (default 3)")
    p.add_argument("--part-size", type=int, default=None,
                   help="split the bundle (and the baseline's tar) into parts of this many MiB")
    p.add_argument("--dir", default="", help="scratch directory to work under (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--output", default="", help="report path (default benchmarks/results/bundles-<timestamp>.json)")
    args = p.parse_args(argv)
    cli.check_positive(p, args, ("model_mb", "repeat"))
    if args.part_size is not None and args.part_size < 1:
        p.error("--part-size must be at least 1 (MiB)")
    if args.dir and not Path(args.dir).is_dir():
        p.error(f"--dir {args.dir}: no such directory")
    return args


def say(message: str) -> None:
    print(f"[bundles-bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Files:
    """The model and what the runs write, in one directory."""

    root: Path
    sha256: str = ""
    size: int = 0
    public_key: str = ""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.model, self.tar = self.root / "model.onnx", self.root / "baseline.tar"
        self.bundle, self.unhashed = self.root / "bundle.tar", self.root / "bundle-unhashed.tar"
        self.extracted, self.staging, self.target = self.root / "extracted", self.root / "staging", self.root / "store"


def _checked(run: Run, files: Files, what: str) -> Run:
    if stated_sha256(run.stdout) != files.sha256:
        raise BenchmarkError(f"{what} printed sha256 {stated_sha256(run.stdout)[:16]}, not the model's")
    return run


def export_baseline(files: Files, hasher: str, part_size: int | None) -> Run:
    remove(files.tar)
    return _checked(run_shell(export_script(hasher, files.model, files.tar, part_size)), files, hasher)


def export_arm(files: Files, part_size: int | None, *, sha_given: bool) -> Run:
    out = files.bundle if sha_given else files.unhashed
    remove(out)
    run = run_arm({"arm": "export", "model": str(files.model), "model_sha256": files.sha256,
                   "model_size": files.size, "sha_given": sha_given, "out": str(out), "part_size": part_size})
    if sha_given:
        files.public_key = run.out["public_key"]
    else:
        remove(out)
    return run


def import_baseline(files: Files, hasher: str, part_size: int | None) -> Run:
    remove(files.extracted)
    files.extracted.mkdir()
    script = import_script(hasher, files.tar, files.extracted, files.model.name, part_size)
    return _checked(run_shell(script), files, hasher)


def import_arm(files: Files) -> Run:
    remove(files.staging, files.target)
    return run_arm({"arm": "import", "bundle": str(files.bundle), "public_key": files.public_key,
                    "staging": str(files.staging), "target": str(files.target)})


Calls = dict[str, Callable[[], Run]]


def phases(files: Files, part_size: int | None, strict: bool) -> tuple[Calls, Calls]:
    """What each repeat runs: the export phase's baselines and arms, then the import phase's."""
    part = part_size * MIB if part_size else None
    export: Calls = {"baseline": lambda: export_baseline(files, "sha256sum", part),
                     "arm": lambda: export_arm(files, part, sha_given=True),
                     "arm_unhashed": lambda: export_arm(files, part, sha_given=False)}
    imported: Calls = {"baseline": lambda: import_baseline(files, "sha256sum", part),
                       "arm": lambda: import_arm(files)}
    if strict:
        export["strict_baseline"] = lambda: export_baseline(files, "openssl", part)
        imported["strict_baseline"] = lambda: import_baseline(files, "openssl", part)
    return export, imported


def measure(files: Files, part_size: int | None, repeat: int, strict: bool) -> dict[str, dict[str, list[Run]]]:
    """Every repeat runs the export phase, then the import phase, in order on even repeats and reversed on odd."""
    runs: dict[str, dict[str, list[Run]]] = {"export": {}, "import": {}}
    export, imported = phases(files, part_size, strict)
    for i in range(repeat):
        for name, calls in (("export", export), ("import", imported)):
            order = list(calls) if i % 2 == 0 else list(reversed(calls))
            for key in order:
                runs[name].setdefault(key, []).append(calls[key]())
        say(f"repeat {i + 1}/{repeat}: export " + ", ".join(f"{k} {v[-1].s:.2f}s" for k, v in runs["export"].items())
            + "; import " + ", ".join(f"{k} {v[-1].s:.2f}s" for k, v in runs["import"].items()))
    return {name: dict(sorted(r.items())) for name, r in runs.items()}


def small_run(root: Path, mb: int, part_size: int | None) -> dict[str, Any]:
    """The two arms once at ``mb`` MiB: their RSS growth, to compare with the full size."""
    files = Files(root)
    files.sha256, files.size = make_model(files.model, mb)
    part = part_size * MIB if part_size else None
    export, imported = export_arm(files, part, sha_given=True), import_arm(files)
    shutil.rmtree(root)
    return {"export": {"growth_mib": export.growth_mib, "s": round(export.s, 4)},
            "import": {"growth_mib": imported.growth_mib, "s": round(imported.s, 4)}}


def body(args: argparse.Namespace, scratch: Path, report: dict[str, Any]) -> None:
    size = args.model_mb * MIB
    if shutil.disk_usage(scratch).free < DISK_FACTOR * size:
        raise BenchmarkError(f"{scratch}: under {DISK_FACTOR * size / MIB:.0f} MiB free; choose another --dir")
    files = Files(scratch / "full")
    say(f"writing a model of {args.model_mb} MB in {files.root}")
    with timed() as t_model:
        files.sha256, files.size = make_model(files.model, args.model_mb)
    strict = shutil.which("openssl") is not None
    runs = measure(files, args.part_size, args.repeat, strict)
    imported = Path(runs["import"]["arm"][-1].out["artifacts"][0])
    report["model"] = {"mb": args.model_mb, "bytes": files.size, "sha256": files.sha256,
                       "generate_s": round(t_model["s"], 2), "parts": runs["export"]["arm"][-1].out["parts"]
                       if args.part_size else 0, "bundle_bytes": runs["export"]["arm"][-1].out["bundle_bytes"]}
    for name in ("export", "import"):
        report[name] = reporting.phase(name, runs[name], files.size)
    small_mb = max(1, args.model_mb // 4)
    say(f"the arms once more at {small_mb} MB, for their memory")
    report["memory"] = reporting.memory(report, small_run(scratch / "small", small_mb, args.part_size),
                                        args.model_mb, small_mb)
    arms = [r for phase in runs.values() for key, rs in phase.items() if key.startswith("arm") for r in rs]
    report["checks"] = {"imported_sha256_matches": file_sha256(imported) == files.sha256,
                        "imported_members": runs["import"]["arm"][-1].out["members"],
                        # Without the reset, an arm's growth includes what its imports took (an upper bound).
                        "arm_peak_reset": all(r.out["peak_reset"] for r in arms),
                        "baseline_peak_rss_source": PEAK_RSS_SOURCE}
    report["target"] = reporting.verdict(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    report = cli.report_header("bundles", args, ("model_mb", "repeat", "part_size", "dir"))
    scratch = Path(tempfile.mkdtemp(prefix="edgewise-bundles-", dir=args.dir or None))
    try:
        body(args, scratch, report)
    except BenchmarkError as exc:
        say(f"failed: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; scratch files removed")
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    path = write_report("bundles", report, args.output)
    print(json.dumps(report, indent=2) if args.json else reporting.table(report))
    say(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

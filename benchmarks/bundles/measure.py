"""Processes of the bundles benchmark: the model file, the baselines' shell commands and each measured run.

Every run is a process of its own, reaped with ``os.wait4``, whose rusage
gives that process's peak RSS (``ru_maxrss``, including the children it
waited for: a baseline's ``sha256sum``, ``tar`` and ``sync``). A Python arm
(:mod:`benchmarks.bundles.work`) also reports the seconds of its work alone
and its RSS growth while it worked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, BenchmarkError

MIB = 1024 * 1024
# Hashers of the baselines: the sha256sum, and OpenSSL's (the same SHA-256 code Python's hashlib runs).
HASHERS = {"sha256sum": "sha256sum", "openssl": "openssl dgst -sha256 -r"}
GNU_TIME = "/usr/bin/time"
PEAK_RSS_SOURCE = "gnu-time" if sys.platform == "linux" and Path(GNU_TIME).is_file() else "wait4-upper-bound"


@dataclass
class Run:
    """One measured run: seconds (the work alone for a Python arm), its process's peak RSS, and what it printed."""

    s: float
    process_s: float
    peak_rss_mib: float
    growth_mib: float | None = None
    out: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""


def make_model(path: Path, mb: int) -> tuple[str, int]:
    """Write ``mb`` MiB of random bytes to ``path`` (fsynced, so no writeback weighs on the first run); sha256, size."""
    digest = hashlib.sha256()
    with path.open("xb") as f:
        for _ in range(mb):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), mb * MIB


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _reap(argv: list[str]) -> tuple[int, float, float, str, str]:
    """Run ``argv`` to its end; exit code, wall seconds, peak RSS (MiB), stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in KiB on Linux.
        return proc.returncode, seconds, usage.ru_maxrss / 1024, out.read().decode(), err.read().decode()


def run_shell(script: str) -> Run:
    """A baseline: ``script`` under ``bash -e -o pipefail``, timed from start to exit.

    A process's ``ru_maxrss`` starts at its parent's RSS at the fork, so the
    peak of a tool started from this (Python) process would be this
    process's. GNU time, small itself, starts bash and reports the largest
    peak of bash and the tools; without it the figure is that upper bound.
    """
    with tempfile.NamedTemporaryFile(prefix="edgewise-bundles-rss-") as rss:
        timer = [GNU_TIME, "-f", "%M", "-o", rss.name] if PEAK_RSS_SOURCE == "gnu-time" else []
        code, seconds, peak, stdout, stderr = _reap([*timer, "bash", "-e", "-o", "pipefail", "-c", script])
        if code != 0:
            raise BenchmarkError(f"baseline failed ({code}): {script}\n{stderr[-2000:]}")
        if timer:
            peak = int(Path(rss.name).read_text().split()[-1]) / 1024
    return Run(s=seconds, process_s=seconds, peak_rss_mib=peak, stdout=stdout)


def run_arm(spec: dict[str, Any]) -> Run:
    """A Python arm in a process of its own (:mod:`benchmarks.bundles.work`)."""
    code, seconds, peak, stdout, stderr = _reap([sys.executable, "-m", "benchmarks.bundles.work", json.dumps(spec)])
    if code != 0:
        raise BenchmarkError(f"arm {spec['arm']} failed ({code}):\n{stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    # The arm's own VmHWM, not ru_maxrss (which starts at this process's RSS, see run_shell).
    return Run(s=out["s"], process_s=seconds, peak_rss_mib=out["peak_mib"], growth_mib=out["growth_mib"], out=out)


def export_script(hasher: str, model: Path, out: Path, part_size: int | None) -> str:
    """Hash the model, then tar it into ``out`` (or its parts, ``out.001``, ...), then fsync what was written."""
    q = shlex.quote
    member = f"-C {q(str(model.parent))} {q(model.name)}"
    if part_size is None:
        write = f"tar -cf {q(str(out))} {member}\nsync {q(str(out))}"
    else:
        write = (f"tar -cf - {member} | split -b {part_size} --numeric-suffixes=1 -a 3 - {q(str(out) + '.')}\n"
                 f"sync {q(str(out))}.*")
    return f"{HASHERS[hasher]} {q(str(model))}\n{write}"


def import_script(hasher: str, out: Path, into: Path, name: str, part_size: int | None) -> str:
    """Untar ``out`` (or its parts, in order) into ``into``, hash the extracted file, fsync it and ``into``."""
    q = shlex.quote
    untar = f"tar -xf {q(str(out))}" if part_size is None else f"cat {q(str(out))}.* | tar -xf -"
    extracted = q(str(into / name))
    return f"{untar} -C {q(str(into))}\n{HASHERS[hasher]} {extracted}\nsync {extracted} {q(str(into))}"


def stated_sha256(stdout: str) -> str:
    """The digest a hasher printed (``<hex> <name>`` or ``<hex> *<name>``): its first word."""
    return stdout.split()[0] if stdout.split() else ""


def remove(*paths: Path) -> None:
    """Files, their parts (``NAME.001``, ...) and directories a run leaves; untimed, before the next run."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        for part in path.parent.glob(f"{path.name}.[0-9][0-9][0-9]") if path.parent.is_dir() else []:
            part.unlink()
        path.unlink(missing_ok=True)

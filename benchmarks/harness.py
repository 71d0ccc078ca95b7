"""The environment of one benchmark run, built and torn down by the run itself.

A run gets its own PostgreSQL database (created, migrated with
``manage.py migrate`` in a subprocess, dropped at the end), its own data dir
(so a fresh signing key) and its own channel-layer prefix on the shared
Redis, and starts the control plane as real uvicorn processes. Everything it
started is stopped and everything it created is removed when the ``with``
block ends, also on Ctrl-C, SIGTERM or an error; ``keep_db`` keeps the
database for a look afterwards.

Only the server URLs come from the caller's environment: ``DATABASE_URL``
gives the PostgreSQL server (host, port, user; its database name is ignored),
``REDIS_URL`` the Redis server. Without them the local defaults are used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
PYTHON = sys.executable
BIN = Path(PYTHON).parent

DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


class BenchmarkError(Exception):
    """The benchmark could not run; the message says what to fix."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_server_url() -> str:
    """``DATABASE_URL`` without its database name, or the local default."""
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        return DEFAULT_POSTGRES
    parsed = urlparse(url)
    return parsed._replace(path="", query="", fragment="").geturl()


def raise_on_sigterm() -> None:
    """Treat SIGTERM as Ctrl-C, so that cleanup runs the same way for both.

    Re-raising it as SIGINT lets ``asyncio.run`` cancel its main task in
    order (its own SIGINT handling) instead of unwinding from a random
    callback. SIGINT gets Python's handler back even if the parent started
    us with it ignored (a background job of a script).
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def handler(signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


@dataclass
class Database:
    server_url: str
    name: str
    keep: bool = False
    created: bool = False

    @property
    def url(self) -> str:
        return f"{self.server_url.rstrip('/')}/{quote(self.name)}"

    def _admin(self) -> psycopg.Connection[Any]:
        return self.connect("postgres")

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        """An autocommit connection to the server (its ``postgres`` database unless named)."""
        parsed = urlparse(self.server_url)
        return psycopg.connect(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 5432, user=parsed.username or "postgres",
            password=parsed.password or None, dbname=dbname, autocommit=True, connect_timeout=10,
        )

    def create(self) -> None:
        # The name goes into DDL, which takes no parameters: allow only plain identifiers.
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.name):
            raise BenchmarkError(f"database name {self.name!r} must be a lowercase identifier")
        with self._admin() as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.name]).fetchone()
            if exists:
                # Never drop a database this run did not create: it may be someone's.
                raise BenchmarkError(f"database {self.name!r} already exists (left by a --keep-db run?); "
                                     f"drop it or choose another --db-name")
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True

    def drop(self) -> None:
        if not self.created or self.keep:
            return
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False


def _proc_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in process group ``pgid`` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which may itself contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


@dataclass
class ControlPlane:
    """uvicorn serving ``orchestrator.asgi:application`` with ``workers`` processes."""

    env: dict[str, str]
    workers: int
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        with self.log.open("ab") as fh:
            # A session of its own: Ctrl-C in the terminal reaches only the
            # benchmark, which then stops the server in order, and the
            # process group lets us find (and, if need be, kill) its workers.
            self.proc = subprocess.Popen(
                [str(BIN / "uvicorn"), "orchestrator.asgi:application", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning"],
                cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"the control plane exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/agent/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise BenchmarkError(f"the control plane did not answer on {self.url} within {timeout:.0f}s:\n"
                             f"{self.log_tail()}")

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        return _proc_cpu_seconds(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            # uvicorn's supervisor stops its workers on SIGTERM.
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # A worker that outlived its supervisor is still in the group we created.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.proc = None


class Environment:
    """Database, data dir and processes of one run; use as a context manager."""

    def __init__(self, *, db_name: str, keep_db: bool = False, settings_module: str = "",
                 extra_env: dict[str, str] | None = None) -> None:
        self.db = Database(postgres_server_url(), db_name, keep=keep_db)
        self.data_dir = Path(tempfile.mkdtemp(prefix="edgewise-bench-"))
        self.redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS
        self.env = dict(os.environ)
        self.env.update({
            "DATABASE_URL": self.db.url,
            "REDIS_URL": self.redis_url,
            "EDGEWISE_DATA_DIR": str(self.data_dir),
            "EDGEWISE_CHANNEL_PREFIX": f"edgewise-bench-{os.getpid()}",
            # A queue of its own: a worker of anything else on this Redis (a demo, a test run) never takes its tasks.
            "EDGEWISE_CELERY_QUEUE": f"edgewise-bench-{os.getpid()}",
            "EDGEWISE_DEBUG": "false",
            "EDGEWISE_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        if settings_module:
            self.env["DJANGO_SETTINGS_MODULE"] = settings_module
        if not self.env.get("EDGEWISE_SECRET_KEY_FILE"):
            # PostgreSQL and Redis with DEBUG off is production to the settings, which then require a key.
            self.env.setdefault("EDGEWISE_SECRET_KEY", secrets.token_urlsafe(50))
        self.env.update(extra_env or {})
        self._processes: list[ControlPlane] = []

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Processes first: a server still connected would hold the database open.
        errors: list[str] = []
        for cp in reversed(self._processes):
            try:
                cp.stop()
            except Exception as exc:
                errors.append(f"stopping the control plane: {exc}")
        self._processes.clear()
        try:
            self.db.drop()
        except Exception as exc:
            errors.append(f"dropping database {self.db.name}: {exc}")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if errors:
            print("cleanup: " + "; ".join(errors), file=sys.stderr)

    def manage(self, *args: str, timeout: float = 300) -> str:
        """Run ``manage.py`` with this environment; its stdout, or BenchmarkError with its output."""
        result = subprocess.run([PYTHON, str(REPO / "manage.py"), *args], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise BenchmarkError(f"manage.py {args[0]} failed ({result.returncode}):\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def shell_json(self, code: str, *, timeout: float = 300) -> Any:
        """Run ``code`` in ``manage.py shell``; it must print one JSON document as its last line."""
        out = self.manage("shell", "-c", code, timeout=timeout)
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            raise BenchmarkError("manage.py shell printed nothing")
        return json.loads(lines[-1])

    def start_control_plane(self, *, workers: int) -> ControlPlane:
        cp = ControlPlane(env=self.env, workers=workers, log=self.data_dir / "uvicorn.log")
        self._processes.append(cp)
        cp.start()
        return cp


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "loadavg_at_start": [round(x, 2) for x in load],
        "commit": git_commit(),
    }


def write_report(name: str, report: dict[str, Any], output: str = "") -> Path:
    """Write ``report`` as JSON to ``output`` or ``benchmarks/results/<name>-<timestamp>.json``.

    Stamps the finish time and the load average at the end (unless the
    benchmark recorded them itself): other work on the machine shows there,
    so runs compare only at similar load.
    """
    report.setdefault("finished_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    report.setdefault("machine", {}).setdefault("loadavg_at_end", [round(x, 2) for x in os.getloadavg()])
    if output:
        path = Path(output)
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path

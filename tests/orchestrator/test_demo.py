"""``manage.py demo``: its data is idempotent, and the whole demo runs and stops cleanly."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from django.conf import settings
from django.contrib.auth import authenticate

from audit.models import AuditEvent
from orchestrator import demo
from sites.models import Site
from tests.fixtures.processes import BIN, REPO, free_port, wait_until

NODES = {("plant-berlin", "gw-1"), ("plant-berlin", "line-3"), ("store-042", "pos-1"), ("hospital-osaka", "srv-1")}


# -- the demo data, in this process --------------------------------------------


@pytest.mark.django_db
def test_it_creates_the_demo_sites_once_with_their_audit_events() -> None:
    demo.sites_ensure()
    demo.sites_ensure()
    sites = {s.slug: s for s in Site.objects.select_related("region")}
    assert set(sites) == {"plant-berlin", "store-042", "hospital-osaka"}
    assert len({s.region_id for s in sites.values()}) == 3
    assert (sites["store-042"].jurisdiction, sites["store-042"].connectivity) == ("US", "intermittent")
    assert sites["hospital-osaka"].latitude == pytest.approx(34.69, abs=0.01)
    assert AuditEvent.objects.filter(action="site.create").count() == 3
    assert AuditEvent.objects.filter(action="region.create").count() == 3


@pytest.mark.django_db
def test_it_gives_admin_a_new_password_on_every_run() -> None:
    first = demo.admin_reset()
    second = demo.admin_reset()
    assert first != second
    assert authenticate(username="admin", password=first) is None
    user = authenticate(username="admin", password=second)
    assert user is not None and user.is_superuser
    assert AuditEvent.objects.filter(action="user.password_reset").count() == 1


# -- the whole demo, as processes ---------------------------------------------


def _server_url(dbname: str) -> str:
    db = settings.DATABASES["default"]
    if "postgresql" not in db["ENGINE"]:
        raise RuntimeError("the demo test needs PostgreSQL (run it with DATABASE_URL, as `make test` does)")
    user, host, port = db.get("USER") or "postgres", db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    return f"postgresql://{user}@{host}:{port}/{dbname}"


@pytest.fixture
def demo_database() -> Iterator[str]:
    """A database of its own, so the demo's migrations and data never touch the test database."""
    name = f"edgewise_demo_test_{os.getpid()}"
    with psycopg.connect(_server_url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url(name)
    finally:
        with psycopg.connect(_server_url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Output:
    """The demo's output, read on a thread so the test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(target=lambda: [self._queue.put(line) for line in stream], daemon=True).start()

    def text(self) -> str:
        while not self._queue.empty():
            self.lines.append(self._queue.get_nowait())
        return "".join(self.lines)

    def wait_for(self, pattern: str, proc: subprocess.Popen[str], timeout: float) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            match = re.search(pattern, self.text())
            if match is None and proc.poll() is not None:
                raise AssertionError(f"demo exited with {proc.returncode}:\n{self.text()}")
            return match

        return wait_until(found, timeout=timeout, interval=0.2, what=f"{pattern!r} in the demo's output")


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The field after the parenthesised command name is the state, then the parent pid.
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _node_states(dsn: str) -> dict[tuple[str, str], str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT s.slug, n.name, n.status FROM sites_node n JOIN sites_site s ON s.id = n.site_id "
            "WHERE n.revoked_at IS NULL"
        ).fetchall()
    return {(slug, name): status for slug, name, status in rows}


def _admin_login(url: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=10)
    page = client.get("/admin/login/")
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None
    answer = client.post("/admin/login/?next=/admin/", data={
        "username": "admin", "password": password, "csrfmiddlewaretoken": token.group(1), "next": "/admin/",
    }, headers={"Referer": f"{url}/admin/login/"})
    assert answer.status_code == 302, answer.text[:500]
    assert answer.headers["location"] == "/admin/"
    return client


@pytest.mark.process
@pytest.mark.timeout(180)
def test_it_runs_the_demo_fleet_and_stops_every_process(demo_database: str, tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": demo_database.replace("postgresql://", "postgres://", 1),
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "EDGEWISE_DATA_DIR": str(tmp_path / "data"),
        # A queue and channel prefix of its own: parallel test runs share Redis.
        "EDGEWISE_CELERY_QUEUE": f"edgewise-demo-test-{os.getpid()}",
        "EDGEWISE_CHANNEL_PREFIX": f"edgewise-demo-test-{os.getpid()}",
        "EDGEWISE_SYNC_INTERVAL": "1",
        "EDGEWISE_NODE_STALE_AFTER": "4",
        "EDGEWISE_NODE_OFFLINE_AFTER": "8",
        "EDGEWISE_LIVENESS_SWEEP_INTERVAL": "1",
    })
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port)], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    out = Output(proc)
    try:
        url = out.wait_for(r"Console:\s+(http://\S+?)/?\s", proc, timeout=120).group(1)
        password = out.wait_for(r"Login:\s+admin / (\S+)", proc, timeout=5).group(1)
        assert url == f"http://127.0.0.1:{port}"
        assert "Using PostgreSQL from DATABASE_URL" in out.text()
        assert (tmp_path / "data" / "logs" / "control-plane.log").exists()

        with psycopg.connect(demo_database) as conn:
            slugs = {row[0] for row in conn.execute("SELECT slug FROM sites_site")}
        assert slugs == {"plant-berlin", "store-042", "hospital-osaka"}
        states = wait_until(
            lambda: (s := _node_states(demo_database)) and set(s) == NODES and set(s.values()) == {"online"} and s,
            timeout=30, what="every demo node online",
        )
        assert len(states) == 4

        client = _admin_login(url, password)
        assert client.get("/admin/").status_code == 200
        client.close()

        processes = _descendants(proc.pid)
        started = {int(pid) for pid in re.findall(r"started .+ \(pid (\d+)\)", out.text())}
        assert len(started) == 3 + len(NODES)
        assert started <= processes

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, out.text()
        assert "Every demo process has stopped." in out.text()
        wait_until(lambda: not any(_alive(pid) for pid in processes), timeout=10,
                   what=f"every demo process to exit: {sorted(p for p in processes if _alive(p))}")
    finally:
        if proc.poll() is None:
            # The children die with it (they are asked to, at start).
            proc.kill()
            proc.wait()
        # Captured by pytest and shown when the test fails.
        sys.stdout.write(out.text())

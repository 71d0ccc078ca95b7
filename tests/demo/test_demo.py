"""``manage.py demo``: its data and models are idempotent, and the whole demo runs, serves and stops cleanly."""

from __future__ import annotations

import hashlib
import json
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
import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from django.conf import settings
from django.contrib.auth import authenticate

from audit.models import AuditEvent
from demo import fleet, training
from models_registry.models import Deployment, Model, ModelVersion
from sites.models import Site
from tests.fixtures.processes import BIN, REPO, free_port, wait_until

NODES = {("plant-berlin", "gw-1"), ("plant-berlin", "line-3"), ("store-042", "pos-1"), ("hospital-osaka", "srv-1")}


# -- the demo data, in this process --------------------------------------------


@pytest.mark.django_db
def test_it_creates_the_demo_sites_once_with_their_audit_events() -> None:
    fleet.sites_ensure()
    fleet.sites_ensure()
    sites = {s.slug: s for s in Site.objects.select_related("region")}
    assert set(sites) == {"plant-berlin", "store-042", "hospital-osaka"}
    assert len({s.region_id for s in sites.values()}) == 3
    assert (sites["store-042"].jurisdiction, sites["store-042"].connectivity) == ("US", "intermittent")
    assert sites["hospital-osaka"].latitude == pytest.approx(34.69, abs=0.01)
    assert AuditEvent.objects.filter(action="site.create").count() == 3
    assert AuditEvent.objects.filter(action="region.create").count() == 3


@pytest.mark.django_db
def test_it_gives_admin_a_new_password_on_every_run() -> None:
    first = fleet.admin_reset()
    second = fleet.admin_reset()
    assert first != second
    assert authenticate(username="admin", password=first) is None
    user = authenticate(username="admin", password=second)
    assert user is not None and user.is_superuser
    assert AuditEvent.objects.filter(action="user.password_reset").count() == 1


def test_it_trains_the_same_demo_models_on_every_run() -> None:
    first, second = training.models_train(), training.models_train()
    assert set(first) == {"defect-classifier", "wear-regressor"}
    # The same bytes, hence the same content-addressed artifact.
    assert first == second

    readings = training.plant_data(rows=5, seed=1)[0]
    classifier = ort.InferenceSession(first["defect-classifier"], providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in classifier.get_inputs()] == [("features", "tensor(float)", [None, 8])]
    # Plain tensors (no ZipMap), which Open Inference Protocol clients can read.
    assert [(o.name, o.type) for o in classifier.get_outputs()] == [
        ("label", "tensor(int64)"), ("probabilities", "tensor(float)")]
    label, probabilities = classifier.run(None, {"features": readings})
    assert label.shape == (5,) and probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    sample = np.asarray([training.SAMPLE_READING], dtype=np.float32)
    assert classifier.run(None, {"features": sample})[1][0, 1] > 0.5, "the curl's reading should look defective"

    regressor = ort.InferenceSession(first["wear-regressor"], providers=["CPUExecutionProvider"])
    (wear,) = regressor.run(["wear_pct"], {"features": readings})
    assert wear.shape == (5, 1) and wear.dtype == np.float32
    assert ((wear > -10) & (wear < 110)).all(), wear


@pytest.mark.django_db
def test_it_registers_validates_and_deploys_the_demo_models_once() -> None:
    sites = fleet.sites_ensure()
    first = training.models_ensure(sites)
    second = training.models_ensure(fleet.sites_ensure())

    assert [s.version.pk for s in first] == [s.version.pk for s in second]
    assert Model.objects.count() == 2 and ModelVersion.objects.count() == 2
    versions = {v.model.slug: v for v in ModelVersion.objects.select_related("model")}
    assert {slug: v.status for slug, v in versions.items()} == {"defect-classifier": "valid", "wear-regressor": "valid"}
    assert versions["defect-classifier"].signature_inputs == [{"name": "features", "datatype": "FP32",
                                                               "shape": [-1, 8]}]
    assert [v.kind for v in versions["defect-classifier"].variants.all()] == ["int8"]
    assert versions["wear-regressor"].preferred_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # What the registry stored is what training gives again: the artifact is reproducible.
    trained = training.models_train()
    assert {slug: hashlib.sha256(data).hexdigest() for slug, data in trained.items()} == {
        slug: v.sha256 for slug, v in versions.items()}

    rows = Deployment.objects.select_related("version__model", "site")
    deployed = {(d.version.model.slug, d.site.slug) for d in rows}
    assert deployed == {("defect-classifier", "plant-berlin"), ("defect-classifier", "store-042"),
                        ("defect-classifier", "hospital-osaka"), ("wear-regressor", "plant-berlin")}
    assert {s.spec.slug: s.sites for s in second} == {
        "defect-classifier": ("plant-berlin", "store-042", "hospital-osaka"), "wear-regressor": ("plant-berlin",)}
    for action, count in [("model.create", 2), ("model_version.upload", 2), ("model_version.valid", 2),
                          ("deployment.create", 4)]:
        assert AuditEvent.objects.filter(action=action).count() == count, action


def test_it_writes_a_curl_command_that_carries_one_reading() -> None:
    command = training.curl_command("http://127.0.0.1:8100")
    match = re.fullmatch(r"curl -s (\S+) -H 'Content-Type: application/json' -d '([^']+)'", command)
    assert match is not None, command
    assert match.group(1) == "http://127.0.0.1:8100/v2/models/defect-classifier/infer"
    assert json.loads(match.group(2)) == {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32",
                                                       "data": list(training.SAMPLE_READING)}]}


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


def _reported_models(dsn: str, site: str, node: str) -> dict[str, dict[str, object]]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT n.actual_state FROM sites_node n JOIN sites_site s ON s.id = n.site_id "
            "WHERE s.slug = %s AND n.name = %s AND n.revoked_at IS NULL", (site, node)).fetchone()
    return {m["name"]: m for m in ((row[0] or {}).get("models") or [])} if row else {}


def _serving(dsn: str, site: str, node: str, models: set[str]) -> dict[str, dict[str, object]] | None:
    reported = _reported_models(dsn, site, node)
    return reported if all(reported.get(m, {}).get("state") == "serving" for m in models) else None


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

        # Every node's inference URL is printed; the curl command works as printed.
        for site, node in NODES:
            assert re.search(rf"{site}/{node}\s+http://127\.0\.0\.1:\d+\s+pid \d+", out.text()), node
        curl = out.wait_for(r"curl -s (http://\S+/v2/models/defect-classifier/infer) "
                            r"-H 'Content-Type: application/json' -d '([^']+)'", proc, timeout=5)
        assert "plant-berlin/gw-1" in out.text().split("Try it", 1)[1].split("\n", 1)[0]
        gw1 = wait_until(lambda: _serving(demo_database, "plant-berlin", "gw-1",
                                          {"defect-classifier", "wear-regressor"}),
                         timeout=60, what="gw-1 to serve both demo models")
        assert gw1["defect-classifier"]["version"] == "1.0.0" and gw1["defect-classifier"]["variant"] == "original"
        answer = httpx.post(curl.group(1), content=curl.group(2), headers={"Content-Type": "application/json"},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert (outputs["label"]["datatype"], outputs["label"]["shape"]) == ("INT64", [1])
        assert (outputs["probabilities"]["datatype"], outputs["probabilities"]["shape"]) == ("FP32", [1, 2])
        assert sum(outputs["probabilities"]["data"]) == pytest.approx(1.0, abs=1e-5)

        # A batch for the regressor on the same node: one wear value per reading.
        base = curl.group(1).removesuffix("/v2/models/defect-classifier/infer")
        readings = training.plant_data(rows=3, seed=2)[0]
        wear = httpx.post(f"{base}/v2/models/wear-regressor/infer", json={"inputs": [{
            "name": "features", "shape": [3, 8], "datatype": "FP32", "data": readings.ravel().tolist()}]}, timeout=30)
        assert wear.status_code == 200, wear.text
        (tensor,) = wear.json()["outputs"]
        assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("wear_pct", "FP32", [3, 1])
        # The device at the same site is given the int8 variant of the classifier.
        line3 = wait_until(lambda: _serving(demo_database, "plant-berlin", "line-3", {"defect-classifier"}),
                           timeout=60, what="line-3 to serve the classifier")
        assert line3["defect-classifier"]["variant"] == "int8"

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

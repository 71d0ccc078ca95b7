"""Rollouts end to end: real edge runtime processes, the real control plane, a real Celery worker and beat.

The worker ticks fast here (``EDGEWISE_ROLLOUT_TICK=0.5``) and its beat runs
the reconciler every second, presuming a worker lost after 3 s without a tick.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol, signing
from models_registry import services as registry
from models_registry.selectors import Placement, desired_model
from orchestrator import keys, quiet
from orchestrator.models import DesiredState
from policies import services as policy_services
from rollouts import services
from rollouts.models import NodeState, Rollout, RolloutEvent, RolloutState
from sites.models import Node, Site
from tests.fixtures.personas import make_site
from tests.fixtures.processes import BIN, REPO, ControlPlane, _database_url, process_env, wait_until
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version

pytestmark = pytest.mark.process
ACTOR = Actor.system("test")


def failing_on_large_inputs(seed: int = 7) -> bytes:
    """``linear`` that fails (Gather out of bounds) whenever any input value is above 10."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((32, 8)).astype(np.float32) * 0.1
    bias = rng.standard_normal(8).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["linear"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "limit"], ["over"]),
        helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["over_i", "five"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["picked"], axis=0),
        helper.make_node("Mul", ["picked", "zero"], ["nothing"]),
        helper.make_node("Add", ["linear", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fails-on-large-inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
                     numpy_helper.from_array(np.array(10.0, dtype=np.float32), "limit"),
                     numpy_helper.from_array(np.array(5, dtype=np.int64), "five"),
                     numpy_helper.from_array(np.array([1.0], dtype=np.float32), "table"),
                     numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class RolloutWorker:
    """A Celery worker with its beat (-B), started and killed at will."""

    queue: str
    log: Path
    schedule: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.procs[-1] if self.procs else None

    def start(self) -> None:
        env = process_env(DATABASE_URL=_database_url(), EDGEWISE_ROLLOUT_TICK="0.5",
                          EDGEWISE_ROLLOUT_STALL_AFTER="3", EDGEWISE_ROLLOUT_RECONCILE_INTERVAL="1")
        mark = len(self.text())
        proc = subprocess.Popen(
            [str(BIN / "celery"), "-A", "orchestrator", "worker", "--pool", "solo", "-Q", self.queue, "-B",
             "-s", str(self.schedule), "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
            # Its own process group: -B runs beat in a child process, which must die with it.
            cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_until(lambda: "ready" in self.text()[mark:] or proc.poll() is not None, timeout=60,
                   what="the celery worker to start")
        if proc.poll() is not None:
            raise AssertionError(f"celery worker exited: {self.text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL to the worker and its beat: no cleanup, as when a machine dies."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever is left of its group (beat), also after a kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture
def rollout_worker(transactional_db: None, tmp_path: Path, settings: Any) -> Iterator[RolloutWorker]:
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        raise RuntimeError("worker tests need REDIS_URL (the real broker)")
    worker = RolloutWorker(queue=settings.CELERY_TASK_DEFAULT_QUEUE, log=tmp_path / "worker.log",
                           schedule=tmp_path / "beat-schedule")
    worker.start()
    yield worker
    worker.stop()


def _served(node: Any, model: str) -> dict[str, Any]:
    row = Node.objects.get(name=node.name)
    return next((m for m in row.actual_state.get("models", []) if m["name"] == model), {})


def _serving(node: Any, model: str, version: str) -> bool:
    status = _served(node, model)
    return status.get("version") == version and status.get("state") == "serving"


def _infer(url: str, model: str, value: float) -> httpx.Response:
    rows = np.full((1, 32), value, dtype=np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def _fleet(edge_node: Any, site: Site, names: list[str], model: str, version: Any) -> list[Any]:
    nodes = [edge_node(site, name, role="server") for name in names]
    registry.deployment_create(actor=ACTOR, version=version, sites=[site])
    for node in nodes:
        wait_until(lambda node=node: _serving(node, model, version.version), timeout=90,
                   what=f"{node.name} to serve {model} {version.version}")
    return nodes


def _rollout(rollout: Rollout) -> Rollout:
    return Rollout.objects.get(pk=rollout.pk)


def test_it_stops_a_bad_version_at_the_canary_and_no_other_node_ever_runs_it(
        live_control_plane: ControlPlane, edge_node: Any, rollout_worker: RolloutWorker, site_berlin: Site) -> None:
    model = make_model("defects")
    v1 = valid_version(model, onnx_factory.linear(seed=1), version="1.0.0")
    v2 = valid_version(model, failing_on_large_inputs(), version="2.0.0")
    nodes = _fleet(edge_node, site_berlin, ["a-1", "a-2", "a-3"], "defects", v1)
    urls = {n.name: n.status()["model_server_url"] for n in nodes}
    # Traffic on the version in service: the baseline the canary is compared with.
    for node in nodes:
        for value in (0.5, 50.0) * 15:
            assert _infer(urls[node.name], "defects", value).status_code == 200
    wait_until(lambda: (_served(nodes[0], "defects").get("stats") or {}).get("requests", 0) >= 30,
               what="the canary to report its baseline traffic")

    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": [site_berlin.slug]},
                                      strategy={"canary_nodes": 1, "percentages": [100], "bake_s": 30,
                                                "gate": {"min_requests": 20, "max_error_rate": 0.05}})
    assert rollout.plan["waves"][0] == [str(Node.objects.get(name="a-1").uuid)]
    services.rollout_start(actor=ACTOR, rollout=rollout)
    canary = nodes[0]
    wait_until(lambda: _serving(canary, "defects", "2.0.0"), timeout=60, what="the canary to serve 2.0.0")
    # Half of the canary's traffic has large values, on which 2.0.0 fails.
    # (The gate may fail it, and the rollback land, before the last of these requests.)
    codes = [_infer(urls["a-1"], "defects", value).status_code for value in (0.5, 50.0) * 20]
    assert sum(1 for c in codes if c >= 400) >= 10

    wait_until(lambda: _rollout(rollout).state == RolloutState.FAILED, timeout=60,
               what=f"the rollout to fail and roll back (worker log: {rollout_worker.log})")
    rollout = _rollout(rollout)
    assert "the canary failed its health gate" in rollout.reason
    checks = {c["name"]: c for c in rollout.last_gate["checks"]}
    assert checks["error_rate"]["passed"] is False and checks["error_rate"]["value"] >= 0.4
    assert rollout.last_gate["previous"]["requests"] >= 30
    # The canary serves 1.0.0 again; the others never loaded 2.0.0.
    response = _infer(urls["a-1"], "defects", 50.0)
    assert response.status_code == 200 and response.json()["model_version"] == "1.0.0"
    for node in nodes[1:]:
        metrics = httpx.get(f"{urls[node.name]}/metrics", timeout=10).text
        assert 'version="1.0.0"' in metrics and 'version="2.0.0"' not in metrics
        assert "version 2.0.0" not in node.log_text()
        state = json.loads(DesiredState.objects.get(node__name=node.name).payload)
        assert [m["version"] for m in state["models"]] == ["1.0.0"]
    assert set(RolloutEvent.objects.filter(rollout=rollout, kind="node", to_state=NodeState.UPDATING)
               .values_list("node__name", flat=True)) == {"a-1"}
    assert dict(rollout.nodes.values_list("node__name", "state")) == {
        "a-1": "rolled_back", "a-2": "pending", "a-3": "pending"}


def test_it_completes_a_rollout_when_the_worker_is_killed_mid_wave(
        live_control_plane: ControlPlane, edge_node: Any, rollout_worker: RolloutWorker, site_berlin: Site) -> None:
    model = make_model("wear")
    v1 = valid_version(model, onnx_factory.linear(seed=3), version="1.0.0")
    v2 = valid_version(model, onnx_factory.linear(seed=4), version="2.0.0")
    nodes = _fleet(edge_node, site_berlin, ["b-1", "b-2", "b-3"], "wear", v1)
    rollout = services.rollout_create(actor=ACTOR, user=None, version=v2, target={"sites": [site_berlin.slug]},
                                      strategy={"canary_nodes": 1, "percentages": [100], "bake_s": 4,
                                                "gate": None})
    services.rollout_start(actor=ACTOR, rollout=rollout)
    wait_until(lambda: _rollout(rollout).wave_phase == "baking", timeout=60, what="the canary to bake")
    rollout_worker.kill()
    frozen = _rollout(rollout)
    assert frozen.state == RolloutState.PROGRESSING and frozen.current_wave == 0
    rollout_worker.start()
    wait_until(lambda: _rollout(rollout).state == RolloutState.SUCCEEDED, timeout=90,
               what=f"the rollout to complete after the restart (worker log: {rollout_worker.log})")
    rollout = _rollout(rollout)
    assert rollout.events.filter(kind="reconcile").exists(), "the reconciler restarted the lost tick chain"
    assert dict(rollout.nodes.values_list("node__name", "state")) == {"b-1": "updated", "b-2": "updated",
                                                                      "b-3": "updated"}
    for node in nodes:
        wait_until(lambda node=node: _serving(node, "wear", "2.0.0"), what=f"{node.name} to serve 2.0.0")
        row = Node.objects.get(name=node.name)
        # Exactly one switch per node: one transition each way, one new desired state since the start.
        transitions = list(RolloutEvent.objects.filter(rollout=rollout, kind="node", node=row)
                           .values_list("from_state", "to_state"))
        assert transitions == [("pending", "updating"), ("updating", "updated")]
        published = AuditEvent.objects.filter(action="desired_state.publish", object_id=str(row.uuid),
                                              created_at__gte=rollout.started_at)
        assert published.count() == 1
    assert AuditEvent.objects.filter(action="rollout.wave_start", object_id=str(rollout.uuid)).count() == 2


def test_it_has_a_node_refuse_a_classification_its_site_forbids_even_when_sent(
        live_control_plane: ControlPlane, edge_node: Any, region_us: Any) -> None:
    policy_services.policy_update(actor=ACTOR, kind="placement", document={"rules": [
        {"name": "secret-stays-in-germany", "effect": "only", "classifications": [3],
         "where": {"jurisdictions": ["DE"]}}]})
    ohio = make_site(region_us, "plant-ohio", jurisdiction="US", clearance=3)
    node = edge_node(ohio, "o-1", role="server")
    wait_until(lambda: node.status()["applied_generation"] >= 1, what="the node's first desired state")
    version = valid_version(make_model("payroll", classification=3), onnx_factory.linear(seed=9), version="1.0.0")
    row = Node.objects.select_related("site", "desired").get(name="o-1")
    # The control plane's own placement keeps it away...
    registry.deployment_create(actor=ACTOR, version=version, sites=[ohio])
    assert json.loads(DesiredState.objects.get(node=row).payload)["models"] == []
    # ... so the control plane is made to send it anyway (as a bug or a forged plan would).
    current = DesiredState.objects.get(node=row)
    content = json.loads(current.payload)
    content["models"] = [desired_model(Placement(node=row, version=version, variant="original"))
                         .model_dump(mode="json")]
    content["generation"] = current.generation + 1
    signed = signing.sign_desired_state(protocol.DesiredState.model_validate(content), keys.signing_key())
    DesiredState.objects.filter(pk=current.pk).update(
        generation=content["generation"], payload=signed.payload, signature=signed.signature,
        content_hash="forced")
    # Written behind the services' back: Redis is told as a publish would tell it (orchestrator.quiet).
    quiet.bump([str(row.uuid)])
    wait_until(lambda: _served(node, "payroll").get("state") == "refused", timeout=30,
               what="the node to refuse the forbidden model")
    error = _served(node, "payroll")["error"]
    assert "rule secret-stays-in-germany" in error and "allows Secret models only at sites with jurisdiction DE" \
        in error
    assert httpx.get(f"{node.status()['model_server_url']}/v2/models/payroll", timeout=10).status_code == 404
    wait_until(lambda: AuditEvent.objects.filter(action="model.refused", after__model="payroll").exists(),
               what="the refusal to reach the audit trail")

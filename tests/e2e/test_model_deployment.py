"""A model from upload to inference at a real node, and what a node refuses."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from audit.models import AuditEvent
from audit.services import Actor
from models_registry import services as registry
from models_registry.storage import artifact_path
from sites.models import Node, Site
from tests.fixtures.processes import ControlPlane, wait_until
from tests.models_registry import onnx_factory
from tests.models_registry.helpers import make_model, valid_version

pytestmark = pytest.mark.process


def _served(name: str) -> dict[str, dict[str, Any]]:
    node = Node.objects.get(name=name)
    return {m["name"]: m for m in node.actual_state.get("models", [])}


def _infer(url: str, model: str, rows: np.ndarray) -> tuple[str, np.ndarray]:
    body = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    out = response.json()
    tensor = out["outputs"][0]
    return out["model_version"], np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def test_it_deploys_a_model_that_the_node_verifies_serves_and_swaps(
    live_control_plane: ControlPlane, edge_node, site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "srv-1", role="server")
    wait_until(lambda: node.status()["model_server_url"] and node.status()["applied_generation"] >= 1,
               what="the node's model server")
    url = node.status()["model_server_url"]
    model = make_model("defects")
    v1_bytes = onnx_factory.linear(seed=1)
    v1 = valid_version(model, v1_bytes, version="1.0.0")
    registry.deployment_create(actor=Actor.system("test"), version=v1, sites=[site_berlin])

    wait_until(lambda: _served("srv-1").get("defects", {}).get("state") == "serving", timeout=60,
               what="the node to serve the model")
    report = _served("srv-1")["defects"]
    assert report["version"] == "1.0.0" and report["provider"] == "CPUExecutionProvider"
    rows = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    version, got = _infer(url, "defects", rows)
    expected = ort.InferenceSession(v1_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": rows})[0]
    assert version == "1.0.0"
    np.testing.assert_allclose(got, expected, rtol=1e-5)

    v2 = valid_version(model, onnx_factory.linear(seed=2), version="2.0.0")
    registry.deployment_create(actor=Actor.system("test"), version=v2, sites=[site_berlin])
    wait_until(lambda: _served("srv-1")["defects"]["version"] == "2.0.0", timeout=60, what="the swap to 2.0.0")
    assert _infer(url, "defects", rows)[0] == "2.0.0"


def test_it_refuses_an_artifact_altered_in_transit_and_keeps_serving_the_previous_version(
    live_control_plane: ControlPlane, edge_node, site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "srv-2", role="server")
    wait_until(lambda: node.status()["model_server_url"], what="the node's model server")
    url = node.status()["model_server_url"]
    model = make_model("wear")
    good = valid_version(model, onnx_factory.linear(seed=3), version="1.0.0")
    registry.deployment_create(actor=Actor.system("test"), version=good, sites=[site_berlin])
    wait_until(lambda: _served("srv-2").get("wear", {}).get("state") == "serving", timeout=60,
               what="the first version to serve")

    bad = valid_version(model, onnx_factory.linear(seed=4), version="2.0.0")
    # The bytes the control plane hands out no longer match what it signed.
    path = artifact_path(bad.sha256)
    path.chmod(0o644)
    path.write_bytes(onnx_factory.linear(seed=5))
    registry.deployment_create(actor=Actor.system("test"), version=bad, sites=[site_berlin])

    def refused() -> bool:
        report = _served("srv-2").get("wear", {})
        return report.get("state") in {"refused", "failed"} and report.get("version") == "2.0.0"

    wait_until(refused, timeout=60, what="the node to refuse the altered artifact")
    report = _served("srv-2")["wear"]
    assert report["serving_version"] == "1.0.0"
    assert "sha256" in report["error"] or "hash" in report["error"]
    rows = np.zeros((1, 32), dtype=np.float32)
    assert _infer(url, "wear", rows)[0] == "1.0.0"
    wait_until(lambda: AuditEvent.objects.filter(action__in=["model.refused", "model.failed"],
                                                 after__version="2.0.0").exists(),
               what="the refusal to reach the audit trail")


def test_it_keeps_serving_across_a_key_rotation_and_verifies_new_artifacts_with_the_new_key(
    live_control_plane: ControlPlane, edge_node, site_berlin: Site, rotate_signing_key
) -> None:
    node = edge_node(site_berlin, "srv-3", role="server")
    wait_until(lambda: node.status()["model_server_url"], what="the node's model server")
    url = node.status()["model_server_url"]
    model = make_model("gauge")
    v1 = valid_version(model, onnx_factory.linear(seed=6), version="1.0.0")
    registry.deployment_create(actor=Actor.system("test"), version=v1, sites=[site_berlin])
    wait_until(lambda: _served("srv-3").get("gauge", {}).get("state") == "serving", timeout=60,
               what="the first version to serve")
    new = rotate_signing_key()
    wait_until(lambda: node.status()["signing_key_fingerprint"] == new, timeout=30,
               what=f"the node to pin the new key\n{node.log_text()}")
    rows = np.zeros((1, 32), dtype=np.float32)
    assert _infer(url, "gauge", rows)[0] == "1.0.0"
    # A version validated after the rotation is signed by the new key only; the node verifies it with that key.
    v2 = valid_version(model, onnx_factory.linear(seed=7), version="2.0.0")
    registry.deployment_create(actor=Actor.system("test"), version=v2, sites=[site_berlin])
    wait_until(lambda: _served("srv-3")["gauge"]["version"] == "2.0.0"
               and _served("srv-3")["gauge"]["state"] == "serving", timeout=60,
               what=f"the swap to 2.0.0 under the new key\n{node.log_text()}")
    assert _infer(url, "gauge", rows)[0] == "2.0.0"
    assert not AuditEvent.objects.filter(action="node.desired_state_refused").exists()

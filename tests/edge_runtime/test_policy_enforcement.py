"""A node enforces its site's signed policy bundle on what it is told to serve, and reports serving counters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from edge_runtime.models import ModelService, policy_bundle
from edge_runtime.policy.placement import PolicyBundle
from edge_runtime.protocol import DesiredState
from tests.edge_runtime import onnx_models as om
from tests.edge_runtime.test_models import ArtifactServer, added, make_store, model_bytes, publish

EU_ONLY_SECRET = {"rules": [{"name": "secret-stays-in-eu", "effect": "only", "classifications": [3],
                             "where": {"jurisdictions": ["DE"]}}]}


def bundle(jurisdiction: str, clearance: int = 3) -> PolicyBundle:
    return PolicyBundle.model_validate({
        "site": {"slug": "plant", "region": "r", "clearance": clearance, "jurisdiction": jurisdiction},
        "placement": EU_ONLY_SECRET, "placement_version": 4})


def test_it_refuses_a_forbidden_classification_without_downloading_it(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    secret = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0), classification=3)
    [status] = server.thread.run(store.reconcile([secret], bundle("US")))
    assert status.state == "refused"
    assert "rule secret-stays-in-eu" in status.error and "placement policy version 4" in status.error
    assert artifacts.artifact_requests(secret.sha256) == []
    assert httpx.get(f"{server.url}/v2/models/m").status_code == 404
    # The same model where the policy allows it serves.
    [allowed] = server.thread.run(store.reconcile([secret], bundle("DE")))
    assert allowed.state == "serving"
    server.thread.run(store.aclose())


def test_it_unloads_every_version_of_a_model_its_site_may_no_longer_serve(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0), classification=2)
    server.thread.run(store.reconcile([v1], bundle("US")))
    assert added(server) == ("1", 1.0)
    # The site's clearance drops below the model's classification: no last known good of it either.
    [status] = server.thread.run(store.reconcile([v1], bundle("US", clearance=1)))
    assert status.state == "refused" and status.serving_version is None
    assert "above the site's clearance Internal" in status.error
    assert httpx.get(f"{server.url}/v2/models/m").status_code == 404
    server.thread.run(store.aclose())


def test_it_fails_closed_on_a_bundle_that_does_not_validate(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    public = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0), classification=0)
    reconciler = ModelService(store)
    state = DesiredState(node_id="node-1", generation=1, issued_at="2026-01-01T00:00:00Z", sync_interval_s=1,
                         site="plant", models=[public], policy={"site": {"slug": "plant", "clearance": 9}})
    detail = server.thread.run(reconciler.reconcile(state))
    [status] = detail["models"]
    assert status["state"] == "refused" and "policy bundle is invalid" in status["error"]
    assert "site.clearance" in status["error"]
    assert policy_bundle({}) is None
    server.thread.run(store.aclose())


def test_it_reports_cumulative_serving_counters_of_what_serves(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    server.thread.run(store.reconcile([v1]))
    for _ in range(3):
        added(server)
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]}
    assert httpx.post(f"{server.url}/v2/models/m/infer", json=bad, timeout=30).status_code == 400
    [status] = store.statuses()
    assert status.stats is not None
    assert (status.stats.requests, status.stats.errors) == (4, 1)
    assert sum(status.stats.latency_counts) == 4
    assert len(status.stats.latency_counts) == len(status.stats.latency_bounds) + 1
    server.thread.run(store.aclose())


"""The model store: download by sha256, resume, verify before onnxruntime, load, unload.

Artifacts come from a real HTTP server on loopback (``http.server`` with
Range support), standing in for the control plane's artifact endpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from edge_runtime import signing
from edge_runtime.models import ModelService, ModelStore
from edge_runtime.protocol import DesiredModel, DesiredState
from tests.edge_runtime import onnx_models as om

NODE = "node-1"
CREDENTIAL = "node-credential-123"


@dataclass
class ArtifactServer:
    """Serves ``files[sha256]`` at the agent protocol's artifact path, with Range; records requests."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    # sha256 -> bytes to send before dropping the connection (once).
    cut_after: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append({"path": self.path, "range": self.headers.get("Range", ""),
                                       "auth": self.headers.get("Authorization", "")})
                prefix = f"/agent/v1/nodes/{NODE}/artifacts/"
                sha = self.path.removeprefix(prefix)
                if self.headers.get("Authorization") != f"Bearer {CREDENTIAL}":
                    self.send_error(401)
                    return
                if not self.path.startswith(prefix) or sha not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[sha]
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = outer.cut_after.pop(sha, None)
                if cut is not None:
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def artifact_requests(self, sha: str) -> list[dict[str, str]]:
        return [r for r in self.requests if r["path"].endswith(sha)]


def make_store(server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, state_dir: Path,
               **options: Any) -> ModelStore:
    public = signing.public_key_raw(key.public_key())
    import base64

    return ModelStore(registry=server.registry, state_dir=state_dir, base_url=artifacts.url, node_id=NODE,
                      credential=CREDENTIAL, public_key=base64.b64encode(public).decode(), **options)


def publish(artifacts: ArtifactServer, key: Any, name: str, version: str, data: bytes, **fields: Any) -> DesiredModel:
    sha = hashlib.sha256(data).hexdigest()
    artifacts.files[sha] = data
    return DesiredModel(name=name, version=version, sha256=sha, size=len(data),
                        signature=signing.sign_artifact(sha, key), **fields)


def model_bytes(tmp_path: Path, constant: float) -> bytes:
    return om.add_constant(tmp_path / f"src-{constant}.onnx", constant).read_bytes()


def added(server: om.ServerUnderTest, name: str = "m", path: str = "") -> tuple[str, float]:
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    response = httpx.post(f"{server.url}/v2/models/{name}{path}/infer", json=request, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["model_version"], body["outputs"][0]["data"][0] - 1


def test_it_downloads_verifies_and_serves_the_desired_models(server: om.ServerUnderTest, artifacts: ArtifactServer,
                                                              key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    a = publish(artifacts, key, "a", "1", model_bytes(tmp_path, 1.0), max_batch_size=4)
    b = publish(artifacts, key, "b", "7", model_bytes(tmp_path, 7.0))
    statuses = server.thread.run(store.reconcile([a, b]))
    assert [(s.name, s.version, s.state, s.provider, s.sha256) for s in statuses] == [
        ("a", "1", "serving", "CPUExecutionProvider", a.sha256),
        ("b", "7", "serving", "CPUExecutionProvider", b.sha256)]
    assert added(server, "a") == ("1", 1.0)
    assert added(server, "b") == ("7", 7.0)
    assert (tmp_path / "state" / "artifacts" / f"{a.sha256}.onnx").read_bytes() == artifacts.files[a.sha256]
    assert all(r["auth"] == f"Bearer {CREDENTIAL}" for r in artifacts.requests)
    # Again with the same list: nothing downloaded, nothing reloaded.
    count = len(artifacts.requests)
    assert server.thread.run(store.reconcile([a, b])) == statuses
    assert len(artifacts.requests) == count
    server.thread.run(store.aclose())


def test_it_refuses_a_tampered_download_and_keeps_the_serving_version(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    server.thread.run(store.reconcile([v1]))
    v2 = publish(artifacts, key, "m", "2", model_bytes(tmp_path, 2.0))
    # The wire delivers other bytes than the signed hash names.
    artifacts.files[v2.sha256] = model_bytes(tmp_path, 666.0)[: v2.size]
    [status] = server.thread.run(store.reconcile([v2]))
    assert status.state == "refused"
    assert "not the signed" in status.error
    assert status.serving_version == "1"
    assert added(server) == ("1", 1.0)
    assert not (tmp_path / "state" / "artifacts" / f"{v2.sha256}.onnx").exists()
    assert not (tmp_path / "state" / "artifacts" / f"{v2.sha256}.partial").exists()
    server.thread.run(store.aclose())


def test_it_refuses_an_artifact_signed_by_another_key_without_downloading_it(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    forged = publish(artifacts, signing.generate_private_key(), "m", "1", model_bytes(tmp_path, 1.0))
    [status] = server.thread.run(store.reconcile([forged]))
    assert status.state == "refused"
    assert "does not match the pinned key" in status.error
    assert artifacts.artifact_requests(forged.sha256) == []
    assert httpx.get(f"{server.url}/v2/models/m").status_code == 404
    server.thread.run(store.aclose())


def test_it_refuses_a_file_altered_on_the_nodes_disk(server: om.ServerUnderTest, artifacts: ArtifactServer,
                                                     key: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = make_store(server, artifacts, key, state)
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    server.thread.run(store.reconcile([v1]))
    server.thread.run(store.reconcile([]))  # unloaded; the file is collected
    v2 = publish(artifacts, key, "m", "2", model_bytes(tmp_path, 2.0))
    server.thread.run(store.reconcile([v2]))
    # Someone swaps the verified file for another (valid!) model while the node runs.
    on_disk = state / "artifacts" / f"{v2.sha256}.onnx"
    on_disk.write_bytes(model_bytes(tmp_path, 666.0))
    fresh = om.ServerUnderTest()  # the node restarts: nothing serves yet
    try:
        restarted = make_store(fresh, artifacts, key, state)
        count = len(artifacts.artifact_requests(v2.sha256))
        [status] = fresh.thread.run(restarted.reconcile([v2]))
        assert status.state == "refused"
        assert "altered on this node" in status.error
        assert httpx.get(f"{fresh.url}/v2/models/m").status_code == 404
        assert not on_disk.exists()
        assert len(artifacts.artifact_requests(v2.sha256)) == count
        # The next reconcile fetches a clean copy.
        [status] = fresh.thread.run(restarted.reconcile([v2]))
        assert status.state == "serving"
        assert added(fresh) == ("2", 2.0)
        fresh.thread.run(restarted.aclose())
    finally:
        fresh.close()
    server.thread.run(store.aclose())


def test_it_resumes_a_partial_download_with_a_range_request(server: om.ServerUnderTest, artifacts: ArtifactServer,
                                                            key: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    data = model_bytes(tmp_path, 3.0)
    model = publish(artifacts, key, "m", "1", data)
    half = len(data) // 2
    (state / "artifacts").mkdir(parents=True)
    (state / "artifacts" / f"{model.sha256}.partial").write_bytes(data[:half])
    store = make_store(server, artifacts, key, state)
    [status] = server.thread.run(store.reconcile([model]))
    assert status.state == "serving", status
    assert [r["range"] for r in artifacts.artifact_requests(model.sha256)] == [f"bytes={half}-"]
    assert added(server) == ("1", 3.0)
    server.thread.run(store.aclose())


def test_it_retries_an_interrupted_download_from_where_it_stopped(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    data = model_bytes(tmp_path, 4.0)
    model = publish(artifacts, key, "m", "1", data)
    artifacts.cut_after[model.sha256] = 40
    store = make_store(server, artifacts, key, tmp_path / "state", retry_base_s=0.05)
    [status] = server.thread.run(store.reconcile([model]))
    assert status.state == "failed"
    assert "downloading" in status.error
    # No second call from the agent: the store retries by itself.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [s.state for s in store.statuses()] != ["serving"]:
        time.sleep(0.05)
    assert [s.state for s in store.statuses()] == ["serving"]
    assert [r["range"] for r in artifacts.artifact_requests(model.sha256)] == ["", "bytes=40-"]
    assert added(server) == ("1", 4.0)
    server.thread.run(store.aclose())


def test_it_unloads_models_no_longer_desired(server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any,
                                            tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = make_store(server, artifacts, key, state)
    a = publish(artifacts, key, "a", "1", model_bytes(tmp_path, 1.0))
    b = publish(artifacts, key, "b", "1", model_bytes(tmp_path, 2.0))
    server.thread.run(store.reconcile([a, b]))
    server.thread.run(store.reconcile([a]))
    assert httpx.get(f"{server.url}/v2/models/b").status_code == 404
    assert added(server, "a") == ("1", 1.0)
    assert not (state / "artifacts" / f"{b.sha256}.onnx").exists()
    server.thread.run(store.aclose())


def test_it_swaps_to_a_new_version_and_keeps_the_old_when_the_new_fails(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    server.thread.run(store.reconcile([v1]))
    broken = publish(artifacts, key, "m", "2", om.fails_smoke_test(tmp_path / "bad.onnx").read_bytes())
    [status] = server.thread.run(store.reconcile([broken]))
    assert (status.state, status.serving_version) == ("failed", "1")
    assert "smoke test" in status.error
    assert added(server) == ("1", 1.0)
    v3 = publish(artifacts, key, "m", "3", model_bytes(tmp_path, 3.0))
    [status] = server.thread.run(store.reconcile([v3]))
    assert (status.state, status.serving_version) == ("serving", "3")
    assert added(server) == ("3", 3.0)
    assert httpx.get(f"{server.url}/v2/models/m").json()["versions"] == ["3"]
    server.thread.run(store.aclose())


def test_it_refuses_a_model_needing_a_provider_the_node_lacks(
        server: om.ServerUnderTest, artifacts: ArtifactServer, key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    model = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0),
                    required_providers=["ROCMExecutionProvider"])
    [status] = server.thread.run(store.reconcile([model]))
    assert status.state == "refused"
    assert "requires ROCMExecutionProvider, which this node lacks" in status.error
    server.thread.run(store.aclose())


def test_it_reports_models_to_the_agent_as_a_reconciler(server: om.ServerUnderTest, artifacts: ArtifactServer,
                                                        key: Any, tmp_path: Path) -> None:
    store = make_store(server, artifacts, key, tmp_path / "state")
    model = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    desired = DesiredState(node_id=NODE, generation=1, issued_at=dt.datetime.now(dt.UTC), sync_interval_s=5,
                           site="s", models=[model])
    reconciler = ModelService(store)
    assert reconciler.name == "models"
    detail = server.thread.run(reconciler.reconcile(desired))
    assert detail["models"][0]["state"] == "serving"
    assert detail["models"][0]["name"] == "m"
    server.thread.run(store.aclose())




def test_it_audits_each_change_of_a_models_state_once(server: om.ServerUnderTest, artifacts: ArtifactServer,
                                                      key: Any, tmp_path: Path) -> None:
    from edge_runtime.audit import NodeAudit

    log = NodeAudit.in_state_dir(tmp_path)
    store = make_store(server, artifacts, key, tmp_path / "state", audit=log)
    v1 = publish(artifacts, key, "m", "1", model_bytes(tmp_path, 1.0))
    server.thread.run(store.reconcile([v1]))
    server.thread.run(store.reconcile([v1]))  # nothing changed: nothing logged
    broken = publish(artifacts, key, "m", "2", om.fails_smoke_test(tmp_path / "bad.onnx").read_bytes())
    server.thread.run(store.reconcile([broken]))
    v3 = publish(artifacts, key, "m", "3", model_bytes(tmp_path, 3.0))
    server.thread.run(store.reconcile([v3]))
    events = [(e.action, e.detail.get("version"), e.detail.get("reason")) for e in log.events_after(0)]
    assert events == [("model.loaded", "1", None), ("model.failed", "2", None),
                      ("model.unloaded", "1", "no longer desired"), ("model.loaded", "3", None)]
    failed = log.events_after(1)[0]
    assert failed.detail["sha256"] == broken.sha256 and "smoke test" in failed.detail["error"]
    assert log.verify()[1] is None
    server.thread.run(store.aclose())

"""``serve_main``: a folder of models served with no control plane, as ``edge-runtime serve`` runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.edge_runtime import onnx_models as om

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model_dir: Path, port: int) -> subprocess.Popen[str]:
    code = ("import sys; from pathlib import Path; from edge_runtime.serving.standalone import serve_main; "
            f"sys.exit(serve_main(Path({str(model_dir)!r}), '127.0.0.1', {port}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_it_serves_every_model_in_a_folder_until_stopped(tmp_path: Path) -> None:
    om.mlp(tmp_path / "classifier.onnx")
    om.add_constant(tmp_path / "offset.onnx", 5.0)
    (tmp_path / "notes.txt").write_text("not a model")
    port = free_port()
    proc = start(tmp_path, port)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1].startswith(f"serving 2 model(s) on http://127.0.0.1:{port}"), lines
        x = np.array([[1, 2, 3, 4]], dtype=np.float32)
        request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.tolist()}]}
        url = f"http://127.0.0.1:{port}"
        first = httpx.post(f"{url}/v2/models/classifier/infer", json=request, timeout=30).json()
        np.testing.assert_allclose(np.array(first["outputs"][0]["data"]).reshape(1, 3), om.mlp_expected(x),
                                   rtol=1e-5)
        second = httpx.post(f"{url}/v2/models/offset/versions/1/infer", json=request, timeout=30).json()
        assert second["outputs"][0]["data"] == [6.0, 7.0, 8.0, 9.0]
        assert httpx.get(f"{url}/v2/models/notes").status_code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_it_exits_with_an_error_for_a_folder_without_models(tmp_path: Path) -> None:
    proc = start(tmp_path, free_port())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"no .onnx files in {tmp_path}" in out


def test_it_skips_a_broken_model_and_serves_the_rest(tmp_path: Path) -> None:
    from edge_runtime.serving.standalone import serve_main

    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        # Only the broken model: nothing to serve, exit 1 before any port is opened.
        assert serve_main(tmp_path, "127.0.0.1", free_port(), out=out) == 1
    text = out_path.read_text()
    assert "skipped broken.onnx: onnxruntime cannot load broken.onnx" in text
    assert "no model could be loaded" in text


def test_the_serve_command_takes_the_instance_count_and_names_a_bad_one(tmp_path: Path) -> None:
    om.mlp(tmp_path / "classifier.onnx")
    cli = [sys.executable, "-m", "edge_runtime", "serve", "--model-dir", str(tmp_path)]
    for bad in ("-1", "two", "65"):
        refused = subprocess.run([*cli, "--instances", bad], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert "--instances" in refused.stderr and repr(bad) in refused.stderr
    port = free_port()
    proc = subprocess.Popen([*cli, "--port", str(port), "--instances", "3"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("serving"):
                break
        metadata = httpx.get(f"http://127.0.0.1:{port}/v2/models/classifier", timeout=30).json()
        assert metadata["parameters"]["instances"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

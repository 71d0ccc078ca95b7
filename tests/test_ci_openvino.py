"""``.ci/openvino`` when the package index has no onnxruntime-openvino: loud always, and a failure under CI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("ci", "status"), [("true", 1), ("", 0)])
def test_it_never_leaves_out_the_openvino_environment_silently(tmp_path: Path, ci: str, status: int) -> None:
    (tmp_path / "no-wheels").mkdir()
    # No configuration, no index, an empty folder of links: pip can find nothing.
    env = {**os.environ, "CI": ci, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "no-wheels"), "EDGEWISE_OPENVINO_VENV": str(tmp_path / "venv")}
    result = subprocess.run(["bash", str(REPO / ".ci" / "openvino")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == status, result.stdout + result.stderr
    assert "!!! the package index has no onnxruntime-openvino wheel for this machine" in result.stderr
    assert "tests/openvino did NOT run" in result.stderr
    assert ("CI=true: failing" in result.stderr) == (ci == "true")
    assert "==> pytest" not in result.stdout
    assert not (tmp_path / "venv" / ".edgewise-installed").exists()

"""An environment without an onnxruntime variant, or with two over each other, is told what to install."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.onnxruntime_variants import VARIANTS, check_onnxruntime

REPO = Path(__file__).resolve().parents[2]
# None in sys.modules: `import onnxruntime` fails and find_spec finds nothing, as where none is installed.
WITHOUT_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None\n"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_ONNXRUNTIME + code], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _names_every_extra(message: str) -> None:
    assert "pip install 'edge-runtime[cpu]'" in message
    for extra, dist in VARIANTS.items():
        assert f"{extra} ({dist})" in message
    assert "--onnxruntime cpu|gpu|openvino|auto" in message


@pytest.mark.parametrize("command", [["serve", "--model-dir", "."], ["run", "--serve-port", "-1"], ["--help"]])
def test_it_stops_every_command_with_the_extras_when_no_onnxruntime_is_installed(
    tmp_path: Path, command: list[str]
) -> None:
    result = _python(f"from edge_runtime.cli import main; sys.exit(main({command!r}))", REPO)
    assert result.returncode == 1
    assert result.stderr.startswith("edge-runtime: no onnxruntime is installed in this environment; "), result.stderr
    assert "Traceback" not in result.stderr
    _names_every_extra(result.stderr)


def test_it_stops_an_import_of_the_model_server_with_the_extras(tmp_path: Path) -> None:
    # What a worker process (python -m edge_runtime.serving.worker) or a library user imports first.
    result = _python("import edge_runtime.serving.worker", REPO)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edge_runtime.onnxruntime_variants.OnnxRuntimeError: no onnxruntime is installed")
    _names_every_extra(last)


def test_it_refuses_to_serve_with_two_variants_installed_over_each_other(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.metadata.packages_distributions()
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {**real, "onnxruntime": ["onnxruntime", "onnxruntime_openvino"]})
    assert main(["serve", "--model-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edge-runtime serve: several onnxruntime distributions are installed at once "
                          "(onnxruntime, onnxruntime-openvino): they overwrite each other's files")
    assert "pip uninstall -y onnxruntime onnxruntime-openvino" in err


def test_it_names_the_stock_build_of_this_environment() -> None:
    # The control plane's and the test suite's environment: stock onnxruntime alone (.ci/bootstrap checks it too).
    assert check_onnxruntime() == "onnxruntime"

"""The edge runtime is installed at sites on its own: it must never need Django."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edge_runtime


def test_it_imports_every_edge_runtime_module_without_django() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime.")
                     if m.name != "edge_runtime.__main__")
    assert {"edge_runtime.agent", "edge_runtime.cli", "edge_runtime.hardware", "edge_runtime.state"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not leaked, leaked\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_it_declares_the_same_requirements_as_the_edge_extra() -> None:
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert tuple(pyproject["project"]["optional-dependencies"]["edge"]) == edge_runtime.REQUIRES

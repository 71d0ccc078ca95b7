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


def test_it_is_a_distribution_of_its_own_that_lists_every_subpackage() -> None:
    import tomllib
    from pathlib import Path

    root = Path(edge_runtime.__file__).resolve().parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"edge_runtime", *(f"edge_runtime.{'.'.join(p.parent.relative_to(root).parts)}"
                                 for p in root.rglob("*.py")
                                 if p.parent != root and not {"__pycache__", "build"} & set(p.relative_to(root).parts))}
    assert setuptools["package-dir"] == {"edge_runtime": "."}
    assert set(setuptools["packages"]) == on_disk
    control_plane = tomllib.loads((root.parent / "pyproject.toml").read_text())
    assert "edge-runtime" in control_plane["project"]["dependencies"]
    assert "edge_runtime*" not in control_plane["tool"]["setuptools"]["packages"]["find"]["include"]

"""The shape of the code: apps layered without cycles, small functions and modules.

Read from the source as text (nothing is imported), so a change that breaks
the layering or grows a function past the limit fails here with the names.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The packages of this repository, bottom layer first (docs/architecture.md draws them).
PACKAGES = ("edge_runtime", "core", "audit", "orchestrator", "sites", "policies", "models_registry", "rollouts",
            "queries", "metrics", "demo")
# The project's wiring: settings and the entry points that mount every app (URLs, ASGI, Celery).
WIRING = {"orchestrator/settings.py", "orchestrator/urls.py", "orchestrator/asgi.py", "orchestrator/routing.py",
          "orchestrator/wsgi.py", "orchestrator/celery.py"}
MAX_FUNCTION_LINES = 50
MAX_MODULE_LINES = 450


def _sources() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted(f for f in listed if (ROOT / f).is_file() and not f.startswith("tests/") and "/migrations/" not in f)


def _imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(module, line, inside a function) of every absolute import of ``tree``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _app_graph() -> dict[str, dict[str, list[str]]]:
    """package -> package it imports -> where (``path:line``), wiring and benchmarks aside."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in _sources():
        top = path.split("/")[0]
        if top not in PACKAGES or path in WIRING:
            continue
        for module, line, _ in _imports(ast.parse((ROOT / path).read_text())):
            target = module.split(".")[0]
            if target in PACKAGES and target != top:
                graph.setdefault(top, {}).setdefault(target, []).append(f"{path}:{line}")
    return graph


def test_it_layers_the_apps_without_a_cycle() -> None:
    graph = _app_graph()
    assert "orchestrator" in graph and "sites" in graph  # the graph was read
    order = {name: i for i, name in enumerate(PACKAGES)}
    upward = [f"{a} -> {b} ({where[0]})" for a, targets in graph.items() for b, where in targets.items()
              if order[b] > order[a]]
    # Every import points down the layers, so no cycle can form.
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_it_imports_no_other_app_inside_a_function_to_dodge_a_cycle() -> None:
    dodges = []
    for path in _sources():
        top = path.split("/")[0]
        if top not in PACKAGES or path.endswith("/apps.py"):
            continue  # an AppConfig.ready() is where Django has an app register its parts
        for module, line, in_function in _imports(ast.parse((ROOT / path).read_text())):
            target = module.split(".")[0]
            if in_function and target in PACKAGES and target not in (top, "edge_runtime"):
                dodges.append(f"{path}:{line} imports {module}")
    assert not dodges, "imports inside functions:\n" + "\n".join(dodges)


def test_it_keeps_every_function_and_module_small() -> None:
    long_functions, long_modules = [], []
    for path in _sources():
        source = (ROOT / path).read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{path}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long_functions)
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long_modules)

"""Tier 1: the packages' import structure: layers only point down, no module circles.

Read from the source with ``ast`` (every import, also those inside functions: a lazy import
is still a dependency, and circles hidden in functions are how they crept in before), then
every module imported alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# package -> the packages it may import (DESIGN.md: dependencies only point down)
LAYERS = {
    "sf_comm": set(),
    "sf_attn": {"sf_comm"},
    "sf_models": {"sf_attn", "sf_comm"},
    "sf_compile": {"sf_attn", "sf_comm"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for src in sorted(ROOT.glob("packages/*/src")):
        for path in sorted(src.rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (resolved to the longest known module name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _is_package_of(a: str, b: str) -> bool:
    """Whether ``a`` is a package containing ``b`` (a package importing its own submodules,
    or a submodule importing its package's re-exports, is not a circle of modules)."""
    return b.startswith(a + ".")


def test_layers_only_point_down() -> None:
    """Catches a package importing one above it (sf_comm importing sf_attn, say)."""
    wrong = []
    for name, deps in _graph().items():
        top = name.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and other not in LAYERS[top]:
                wrong.append(f"{name} -> {dep}")
    assert not wrong, wrong


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles a depth-first walk of ``graph`` meets, each as ``[a, b, ..., a]``."""
    state: dict[str, int] = {}  # 1 while on the walk's stack, 2 once finished
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return circles


def test_no_import_circles() -> None:
    """Catches module circles such as api -> planner -> simulate -> api, context <-> split, or
    parallelize -> model files -> parallelize (each made the code order-dependent to load)."""
    graph = {
        name: {d for d in deps if not _is_package_of(d, name) and not _is_package_of(name, d)}
        for name, deps in _graph().items()
    }
    circles = _circles(graph)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_finder_finds_circles() -> None:
    """Catches a circle finder that never reports anything (the test above would then pass
    on any code), and an import reader that misses relative or lazy imports."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    deps = _graph()
    assert "sf_attn.planner" in deps["sf_attn.resolution"]  # from .planner import ... (top)
    assert "sf_attn.sim.step" in deps["sf_attn.sim.calibration"]  # from .step import ...
    assert "sf_attn.planner" in deps["sf_attn.sim.step"]  # from ..planner import (in a function)


@pytest.mark.slow
def test_every_module_imports_alone() -> None:
    """Catches a module that only imports after some other module was imported first."""
    names = sorted(_modules())
    script = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    failures = []
    for name in names:
        done = subprocess.run(
            [sys.executable, "-c", script, name], capture_output=True, text=True, check=False
        )
        if done.returncode:
            failures.append(f"{name}: {done.stderr.strip().splitlines()[-1]}")
    assert not failures, failures

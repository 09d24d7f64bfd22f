"""The package's shape: every module imports on its own, and the import graph inside harness/
(imports inside functions included) has no cycle: cli -> pipeline -> stages -> splice -> models."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "harness"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))


def harness_imports(path: Path) -> set[str]:
    """harness modules that `path` imports anywhere in its body (top level or in functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from harness import ce` names a module; `from harness.ce import x` names ce
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "harness" else [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "harness" and len(parts) > 1 and (PKG / f"{parts[1]}.py").exists():
                out.add(parts[1])
    return out - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: harness_imports(p) for p in PKG.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_seen(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    from harness.ce import evaluate\n    from harness import splice\n")
    assert harness_imports(f) == {"ce", "splice"}


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["cli"] and "pipeline" in graph["cli"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_layers_point_one_way():
    """Lower layers never reach up: backend/ce/splice do not import the orchestration."""
    graph = import_graph()

    def reach(node, seen=None):
        seen = set() if seen is None else seen
        for nxt in graph[node] - seen:
            seen.add(nxt)
            reach(nxt, seen)
        return seen

    for low in ("backend", "ce", "splice", "saes", "models", "variants", "session", "runfolder", "references"):
        assert not reach(low) & {"cli", "pipeline"}, low
    assert not reach("models") & {"saes", "splice", "variants"}


_IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "harness" or m.startswith("harness.")]:
        del sys.modules[loaded]  # third-party libraries stay loaded; every harness module is fresh
    if "lm_eval.api.registry" in sys.modules:  # backend registers its model again on re-import
        sys.modules["lm_eval.api.registry"].model_registry._objs.pop("sae-spliced", None)
    try:
        importlib.import_module("harness." + name)
    except Exception as e:
        print(f"harness.{name}: {type(e).__name__}: {e}")
        raise SystemExit(1)
"""


def _python(*args):
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=PKG.parent, env=env)


def test_every_module_imports_on_its_own():
    """In a fresh interpreter, each module is imported with no other harness module loaded
    before it: none relies on another having been imported first."""
    proc = _python("-c", _IMPORT_EACH, *MODULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_package_version_and_main():
    import harness

    assert isinstance(harness.__version__, str) and harness.__version__
    proc = _python("-m", "harness", "--help")
    assert proc.returncode == 0 and "sae-harness" in proc.stdout and "lm-eval" in proc.stdout

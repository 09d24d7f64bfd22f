"""The package's shape: every module imports on its own; the import graph inside harness/
(imports inside functions included) has no cycle between modules; the subpackages import in one
direction (model -> text -> splice -> lmeval -> evals -> output -> jobs -> cli, with the pure
leaves errors, scaling, lawfit and known_models below them all); no module imports another's
private name; docs/design.md names every module."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "harness"
# the layers, lowest first; a module may import its own layer and any layer below
LAYERS = ["leaf", "model", "text", "splice", "lmeval", "evals", "output", "jobs", "api", "cli"]
LEAVES = {"errors", "files", "scaling", "lawfit", "known_models", "__init__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) if parts else "__init__"


MODULES = sorted(module_name(p) for p in PKG.rglob("*.py") if p.name != "__main__.py" and "tasks" not in p.parts)


def layer(module: str) -> str:
    top = module.split(".")[0]
    return "leaf" if top in LEAVES else top


def harness_imports(path: Path, name: str | None = None) -> set[str]:
    """harness modules that `path` imports anywhere in its body (top level or in functions)."""
    out = set()
    known = set(MODULES)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name.removeprefix("harness.") for a in node.names if a.name.startswith("harness.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module + ".").startswith("harness."):
            # `from harness.evals import ce` names the module evals.ce; `from harness.evals.ce import x` too
            base = node.module.removeprefix("harness").lstrip(".")
            names = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in known else base
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out - {name or module_name(path)}


def private_imports(path: Path) -> list[str]:
    """`from harness.x import _name`: a private name taken from another module."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness"):
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return bad


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): harness_imports(p) for p in PKG.rglob("*.py")
            if p.name != "__main__.py" and "tasks" not in p.parts}


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
    f.write_text("def f():\n    from harness.evals.ce import evaluate\n    from harness.splice import splicer\n")
    assert harness_imports(f, "jobs.mod") == {"evals.ce", "splice.splicer"}


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "jobs.pipeline" in graph["cli.app"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_subpackages_import_in_one_direction():
    """A module imports only its own subpackage and those below it: nothing reaches up."""
    graph = import_graph()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if rank[layer(b)] > rank[layer(a)]]
    assert not upward, "imports that reach up a layer: " + ", ".join(sorted(upward))
    for leaf in ("scaling", "errors", "files", "known_models"):  # pure leaves: no harness import at all
        assert not graph[leaf], (leaf, graph[leaf])
    assert graph["lawfit"] <= {"scaling"}


def test_no_module_imports_a_private_name_of_another():
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in [*PKG.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
           for name in private_imports(p)]
    assert not bad, bad


def layout_modules(design: str) -> set[str]:
    """Modules named in docs/design.md's layout tree: `name.py` lines, inside `folder/` lines."""
    block = design.split("## Layout", 1)[1].split("```")[1]
    names, folder = set(), None
    for line in block.splitlines():
        entry = line.strip().split(" ", 1)[0] if line.strip() else ""
        indent = len(line) - len(line.lstrip())
        if indent <= 2:
            folder = entry[:-1] if entry.endswith("/") and indent == 2 else None
        if entry.endswith(".py"):
            stem = entry[:-3]
            names.add(f"{folder}.{stem}" if folder and indent > 2 else stem)
    return names


def test_design_doc_names_every_module():
    """docs/design.md is the map of record: a module its layout does not name fails the test."""
    named = layout_modules((ROOT / "docs" / "design.md").read_text())
    missing = [m for m in MODULES if m not in named and m not in LAYERS and m != "__init__"]
    assert not missing, f"docs/design.md does not name: {missing}"


def test_layout_parser_sees_a_missing_module():
    tree = "## Layout\n```\nharness/\n  errors.py   x\n  model/   y\n    loading.py   z\n```\n"
    assert layout_modules(tree) == {"errors", "model.loading"}


_IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "harness" or m.startswith("harness.")]:
        del sys.modules[loaded]  # third-party libraries stay loaded; every harness module is fresh
    if "lm_eval.api.registry" in sys.modules:  # backend registers its model again on re-import
        sys.modules["lm_eval.api.registry"].model_registry._objs.pop("sae-spliced", None)
    try:
        importlib.import_module("harness." + name if name != "__init__" else "harness")
    except Exception as e:
        print(f"harness.{name}: {type(e).__name__}: {e}")
        raise SystemExit(1)
"""


def _python(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)


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

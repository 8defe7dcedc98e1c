"""The package's import graph: no cycles, and each layer imports only what docs/architecture.md allows.

The graph is read from the source (every import statement, module-level or
inside a function), so a lazy import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"ssattn": ROOT / "ssattn"}


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for prefix, base in PACKAGE_DIRS.items():
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _target(name: str) -> str | None:
    """The longest package module that `name` names (a submodule, or the package for an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> set[str]:
    """The package modules that module `name` imports (edges to its own parent packages excluded)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    here = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for t in targets:
            t = _target(t) if t.startswith("ssattn") else None
            # Importing a module always runs its parent packages first; that is not a cycle.
            if t is not None and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    # A reader that found nothing would pass every rule below.
    assert "ssattn.functional" in GRAPH["ssattn"]
    assert "ssattn._backends" in GRAPH["ssattn.ops.attention"]
    assert len(MODULES) > 30


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _violations(layer: str, allowed) -> list[str]:
    bad = []
    for name, deps in GRAPH.items():
        if name == layer or name.startswith(layer + "."):
            bad += [f"{name} -> {d}" for d in sorted(deps) if not allowed(name, d)]
    return bad


def _inside(dep: str, *prefixes: str) -> bool:
    return any(dep == p or dep.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer,allowed", [
    # the registry knows no op
    ("ssattn._backends", lambda n, d: False),
    ("ssattn._checks", lambda n, d: False),
    ("ssattn._heads", lambda n, d: False),
    ("ssattn._progress", lambda n, d: False),
    # kernels hold kernels and their launchers: nothing from the library
    ("ssattn.kernels", lambda n, d: _inside(d, "ssattn.kernels")),
    # references are the ground truth: only each other
    ("ssattn.reference", lambda n, d: _inside(d, "ssattn.reference")),
    # ops: the registry and the references, never another op
    ("ssattn.ops", lambda n, d: _inside(d, "ssattn._backends", "ssattn.reference") or (n, d) == ("ssattn.ops", d)),
    # the caption room: the functional API and the layers below, model loading, the cache, tiny test models
    ("ssattn.caption", lambda n, d: _inside(d, "ssattn.caption", "ssattn.functional", "ssattn._checks",
                                           "ssattn._backends", "ssattn.reference", "ssattn.ops",
                                           "ssattn.guidance.hub", "ssattn.guidance.feature_cache",
                                           "ssattn.guidance.testing")),
    # the metrics room: a library room (the checks below it), never the apps
    ("ssattn.metrics", lambda n, d: _inside(d, "ssattn.metrics", "ssattn._checks")),
])
def test_layer_imports(layer, allowed):
    assert _violations(layer, allowed) == []


def test_library_never_imports_the_apps():
    library = [n for n in GRAPH if not _inside(n, "ssattn.apps", "ssattn.__main__")]  # `python -m ssattn` is the CLI
    bad = [f"{n} -> {d}" for n in library for d in GRAPH[n] if _inside(d, "ssattn.apps")]
    assert bad == []


def test_import_ssattn_loads_no_app():
    import subprocess
    import sys

    code = "import sys, ssattn; print(sorted(m for m in sys.modules if m.startswith('ssattn.apps')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _readme_layout() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return [line.split("`")[1] for line in section.splitlines() if line.startswith("- `")]


def test_readme_layout_matches_the_tree():
    listed = _readme_layout()
    assert listed, "README.md has no Layout list"
    for path in listed:
        assert (ROOT / path).exists(), f"README Layout lists {path}, which does not exist"
    rooms = {f"ssattn/{p.name}/" for p in (ROOT / "ssattn").iterdir() if (p / "__init__.py").exists()}
    rooms |= {f"ssattn/{p.name}" for p in (ROOT / "ssattn").glob("*.py") if not p.name.startswith("__")}
    rooms -= {"ssattn/_checks.py"}  # internal helper of every layer, described in docs/architecture.md
    missing = sorted(rooms - set(listed))
    assert missing == [], f"README Layout does not list {missing}"

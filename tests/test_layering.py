"""The package's layers (README "Development"): every import in src/pnnh goes down or sideways,
never up, and no module imports itself back through a chain of others.

Imports are read from the source with ``ast``, function-level ones included (a lazy import
is still a dependency), so the check covers code paths the tests do not run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# What each layer may import besides itself. models and data know nothing of each other;
# probe sits beside train but below it (train calls the probe, never the reverse).
MAY_IMPORT = {
    "io": set(),
    "models": {"io"},
    "data": {"io"},
    "probe": {"io", "models", "data"},
    "train": {"io", "models", "data", "probe"},
    "experiments": {"io", "models", "data", "probe", "train"},
    "cli": {"io", "models", "data", "probe", "train", "experiments"},
    "api": {"io", "models", "data", "probe", "train", "experiments", "cli"},
}


def layer(module: str) -> str:
    """The layer of a ``pnnh...`` module name."""
    parts = module.split(".")
    if parts == ["pnnh"]:
        return "api"  # the package's public face: it re-exports, nothing below imports it
    top = parts[1]
    if top == "theory":
        return "probe"  # the probe's theory, beside it
    if top == "__main__":
        return "cli"
    if top not in MAY_IMPORT:
        raise AssertionError(f"module {module} is in no layer: add its package to MAY_IMPORT")
    return top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The pnnh modules ``path`` imports, anywhere in the file (``from a import b`` counts
    as importing ``a.b`` when that is a module, else ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pnnh")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "pnnh":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted((SRC / "pnnh").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_runs_up_the_layers():
    upward = [f"{source} ({layer(source)}) imports {target} ({layer(target)})"
              for source, targets in import_graph().items() for target in sorted(targets)
              if layer(target) != layer(source) and layer(target) not in MAY_IMPORT[layer(source)]]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_claim():
    """The graph sees function-level and relative imports, and both checks fire on a bad graph."""
    graph = import_graph()
    assert "pnnh.models" in graph["pnnh.train.trainer"]  # imported inside a function
    assert "pnnh.data.datasets" in graph["pnnh.data"]  # `from .datasets import ...`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "train" not in MAY_IMPORT[layer("pnnh.models.fold")]
    with pytest.raises(AssertionError, match="in no layer"):
        layer("pnnh.nowhere")

"""The package's layers: every import (module level or inside a function) goes down the layer order, and
no set of modules imports each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decodelab"
# Lowest first: a module may import from its own layer and the layers before it. A module's layer is its longest
# prefix here: kernels.linear (the C++ matmul's loader, torch only) sits below the decoding core that calls it; the
# rest of kernels (the provider, the references of the core's own rules) above it.
LAYERS = ["decodelab", "decodelab.errors", "decodelab.config", "decodelab.kernels.linear", "decodelab.decoding",
          "decodelab.kernels",
          "decodelab.models", "decodelab.drafters", "decodelab.tasks", "decodelab.strategies", "decodelab.engines",
          "decodelab.tracking",
          "decodelab.experiment", "decodelab.training", "decodelab.analysis", "decodelab.sweeps", "decodelab.cli"]
# The decoding core is torch and transformers only: no schema, no config, no experiment.
DECODING_MAY_IMPORT = ("decodelab.decoding", "decodelab.kernels", "decodelab.errors")


def module_files() -> Dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        parts = ["decodelab", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Project modules ``name`` imports anywhere in its file (``from pkg import submodule`` included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # package/submodule edge
                found.add(target)
    return found


def layer_of(module: str) -> int:
    return max(((len(prefix), i) for i, prefix in enumerate(LAYERS)
                if module == prefix or module.startswith(prefix + ".")))[1]


def graph() -> Dict[str, Set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{a} -> {b}" for a, deps in graph().items() for b in sorted(deps) if layer_of(b) > layer_of(a)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_decoding_imports_nothing_of_the_experiment():
    edges = [f"{a} -> {b}" for a, deps in graph().items() if a.startswith("decodelab.decoding")
             for b in sorted(deps) if not b.startswith(DECODING_MAY_IMPORT)]
    assert not edges, "\n".join(edges)


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The walker is not vacuous: a two-module cycle and an upward edge are both caught."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert layer_of("decodelab.cli") > layer_of("decodelab.decoding.engine")
    assert "decodelab.decoding.verify" in graph()["decodelab.decoding.engine"]

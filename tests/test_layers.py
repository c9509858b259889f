"""The package's import graph, read with ``ast``: no cycles (function-level imports included), and each layer
imports only the layers below it."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

import diffadapt

ROOT = Path(diffadapt.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["diffadapt", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its body. ``from pkg import sub`` counts as ``pkg.sub``, not
    as ``pkg`` (a submodule importing a sibling does not depend on its package's ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & known
            if len(subs) < len(node.names) and module in known:
                found.add(module)
            found.update(subs)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read(graph):
    assert "diffadapt.methods.lora" in graph["diffadapt.methods"]
    assert "diffadapt.peft_bridge" in graph["diffadapt.backends.inject"]
    assert "diffadapt.compose" in graph["diffadapt.backends.slot"]


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# module pattern → package modules it may import (patterns); everything else in the package is above it
ALLOWED = {
    "diffadapt.errors": [],
    "diffadapt.methods*": ["diffadapt.errors", "diffadapt.methods*"],
    "diffadapt.compose": ["diffadapt.methods.base"],
    "diffadapt.peft_bridge": ["diffadapt.errors", "diffadapt.methods.base"],
    "diffadapt.export*": ["diffadapt.errors", "diffadapt.methods*", "diffadapt.peft_bridge", "diffadapt.keys*",
                          "diffadapt.io", "diffadapt.export*"],
    "diffadapt.guards": ["diffadapt.errors", "diffadapt.methods.base"],
    "diffadapt.backends*": ["diffadapt.errors", "diffadapt.methods*", "diffadapt.peft_bridge", "diffadapt.compose",
                            "diffadapt.guards", "diffadapt.backends*"],
    "diffadapt.architectures": [],
}
TEST_HELPERS = ("diffadapt.testing", "diffadapt.fixtures")


@pytest.mark.parametrize("pattern", list(ALLOWED))
def test_layers_import_only_what_is_below_them(graph, pattern):
    allowed = ALLOWED[pattern]
    bad = {m: sorted(d for d in deps if not any(fnmatch.fnmatchcase(d, a) for a in allowed))
           for m, deps in graph.items() if fnmatch.fnmatchcase(m, pattern)}
    assert {m: d for m, d in bad.items() if d} == {}


def test_library_code_does_not_use_the_test_helpers(graph):
    users = {m for m, deps in graph.items() if deps & set(TEST_HELPERS)}
    # the command line's and the studio's demos build a tiny pipeline; below them, nothing reaches for test helpers
    assert users <= {*TEST_HELPERS, "diffadapt.cli", "diffadapt.models", "diffadapt.studio.demo"}

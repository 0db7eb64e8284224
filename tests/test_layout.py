"""The code's layout: imports inside training/ run one way (no cycle, counting imports inside functions),
and the scoring runtime (triage/) never imports torch or training."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def local_imports(package: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports anywhere in its file (top level or inside functions)}."""
    modules = {p.stem: p for p in (REPO / package).glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith(package + "."):
                    found.add(node.module.split(".")[1])
        graph[name] = found & set(modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})[-1] == find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})[0]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_training_imports_run_one_way():
    assert find_cycle(local_imports("training")) == []


def test_the_runtime_core_never_imports_torch_or_training():
    for path in (REPO / "triage").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "training", "monai") for n in names), path

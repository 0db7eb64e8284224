"""The code's layout: imports run one way (no cycle, counting imports inside functions) in training/ and across
the whole repository, subpackages included; the scoring runtime (triage/) never imports torch, training, deploy
or dashboards."""

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


def module_name(path: Path) -> str:
    """triage/audit/store.py -> triage.audit.store; a package's __init__.py -> the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: modules of the repository it imports anywhere in its file}, for every module of ``package`` and its
    subpackages; ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``."""
    files = {module_name(p): p for top in ("triage", "deploy", "dashboards", "training")
             for p in (REPO / top).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if not (name == package or name.startswith(package + ".")):
            continue
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1]) if node.level else ""
                source = ".".join(p for p in (base, node.module or "") if p)
                found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names}
        graph[name] = {m for m in found if m in files} - {name}
    return graph


def test_imports_run_one_way_across_the_repository():
    graph = {module: imported for package in ("triage", "deploy", "dashboards", "training")
             for module, imported in import_graph(package).items()}
    assert find_cycle(graph) == []


def test_the_runtime_core_imports_nothing_above_it():
    for module, imported in import_graph("triage").items():
        above = {m for m in imported if m.split(".")[0] != "triage"}
        assert not above, f"{module} imports {sorted(above)}: triage/ is the core deploy/, dashboards/ and training/ use"


def test_the_import_graph_sees_a_cycle_through_a_subpackage():
    graph = import_graph("triage")
    assert "triage.audit.store" in graph["triage.audit"] and "triage.audit.records" in graph["triage.audit.store"]
    assert find_cycle({**graph, "triage.audit.records": graph["triage.audit.records"] | {"triage.audit.store"}})

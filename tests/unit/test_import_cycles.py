"""No import cycles among drove's modules, lazy and TYPE_CHECKING imports included.

A lazy import (inside a function) only hides a cycle from the interpreter, and an import
under ``if TYPE_CHECKING:`` is still a dependency of the layout: both count here. Where one
module needs another's type without depending on it, a ``typing.Protocol`` states it.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "drove"



@dataclass(frozen=True)
class Edge:
    """One import of ``target`` by ``source``, at ``line``."""

    source: str
    target: str
    line: int
    lazy: bool


def module_files() -> dict[str, Path]:
    """Every module under src/drove by dotted name (a package by its __init__)."""
    modules: dict[str, Path] = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a drove module (None outside drove)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _from_base(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def _lazy_lines(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside a function, method or lambda."""
    lines: set[int] = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    lines.add(node.lineno)
    return lines


def imports_in(
    module: str, source: str, is_package: bool, modules: dict[str, Path]
) -> list[Edge]:
    """Every import of a drove module in ``module``'s source, wherever it stands."""
    # Only the module an import names counts, not the parent packages Python runs first
    # (importing drove.a.b runs drove/a/__init__.py): those edges would make every package
    # whose __init__ re-exports a submodule a "cycle" with each sibling of it.
    tree = ast.parse(source, filename=module)
    lazy = _lazy_lines(tree)
    edges: list[Edge] = []

    def add(name: str, line: int) -> None:
        target = _known(name, modules)
        if target is not None and target != module:
            edges.append(Edge(module, target, line, line in lazy))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node, is_package)
            for alias in node.names:
                # `from drove.x import y` imports drove.x.y when y is a submodule
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)
    return edges


def import_graph() -> dict[str, dict[str, Edge]]:
    """module -> {imported module -> the first import of it}."""
    modules = module_files()
    graph: dict[str, dict[str, Edge]] = {name: {} for name in modules}
    for name, path in modules.items():
        edges = imports_in(name, path.read_text(), path.name == "__init__.py", modules)
        for edge in sorted(edges, key=lambda e: e.line):
            graph[name].setdefault(edge.target, edge)
    return graph


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_through(component: list[str], graph: dict[str, dict[str, Edge]]) -> list[Edge]:
    """A shortest import path from the component's first module back to itself."""
    members = set(component)
    start = component[0]
    came_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target, edge in sorted(graph[node].items()):
            if target not in members:
                continue
            if target == start:
                path = [edge]
                while path[0].source != start:
                    path.insert(0, came_by[path[0].source])
                return path
            if target not in came_by:
                came_by[target] = edge
                queue.append(target)
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(component: list[str], graph: dict[str, dict[str, Edge]]) -> str:
    """The component's modules and one concrete cycle, each import with its line."""
    steps = [
        f"    {edge.source}:{edge.line}{' (lazy)' if edge.lazy else ''} imports {edge.target}"
        for edge in cycle_through(component, graph)
    ]
    return "  {" + ", ".join(component) + "}\n" + "\n".join(steps)


def test_graph_sees_the_kinds_of_import() -> None:
    """The parser catches relative, lazy, submodule and TYPE_CHECKING imports."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from .c import name\n"
        "if TYPE_CHECKING:\n"
        "    from drove.pkg.d import Thing\n"
        "def later():\n"
        "    import drove.pkg.e\n"
    )
    modules = {f"drove.pkg.{m}": Path(m) for m in "abcde"} | {"drove.pkg": Path("pkg")}
    edges = {(e.target, e.lazy) for e in imports_in("drove.pkg.a", source, False, modules)}
    assert edges == {
        ("drove.pkg.b", False),
        ("drove.pkg.c", False),
        ("drove.pkg.d", False),
        ("drove.pkg.e", True),
    }


def test_tarjan_finds_a_cycle_and_a_path() -> None:
    """A three-module ring is one component, and the path walks it."""
    ring = {"a": "b", "b": "c", "c": "a"}
    graph = {s: {t: Edge(s, t, 1, False)} for s, t in ring.items()} | {"d": {}}
    graph["d"]["a"] = Edge("d", "a", 1, False)
    components = [c for c in strongly_connected(graph) if len(c) > 1]
    assert components == [["a", "b", "c"]]
    assert [e.target for e in cycle_through(components[0], graph)] == ["b", "c", "a"]


def test_no_import_cycles() -> None:
    """No module of drove reaches itself through its imports."""
    graph = import_graph()
    found = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not found, "import cycles in src/drove:\n" + "\n".join(
        describe(c, graph) for c in found
    )

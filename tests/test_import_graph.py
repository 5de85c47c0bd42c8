"""The import graph of ``agent/`` has no cycle, lazy and type-checking imports included.

Read from the source with :mod:`ast`, not by importing: every ``import`` and ``from ... import``
anywhere in a module (at the top, in a function, under ``if TYPE_CHECKING``) is an edge.  The one
exception ``docs/DESIGN.md`` allows: a package's own lazy factory of its submodules (an import
inside a function of ``pkg/__init__.py`` of a module below ``pkg``), which imports nothing at
load time (``agent.collect.open_sampler`` picks its backend that way).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

AGENT = Path(__file__).resolve().parent.parent / "agent"

Edge = Tuple[str, str, bool]
"""(importer, imported, inside a function)"""


def module_name(path: Path, root: Path = AGENT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = AGENT) -> Dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: Dict[str, Path]) -> Optional[str]:
    """The longest known module that ``name`` is, or lies in (``agent.x.y.Z`` -> ``agent.x.y``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(known: Dict[str, Path]) -> List[Edge]:
    found: List[Edge] = []
    for importer, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        functions = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                    for alias in node.names
                ]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != importer:
                    found.append((importer, resolved, id(node) in inside))
    return found


def allowed(edge: Edge, known: Dict[str, Path]) -> bool:
    importer, imported, lazy = edge
    is_package = known[importer].name == "__init__.py"
    return lazy and is_package and imported.startswith(importer + ".")


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every elementary cycle's first appearance in a depth-first walk (enough to fail on)."""
    found: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def graph_of(root: Path = AGENT) -> Dict[str, Set[str]]:
    known = modules(root)
    graph: Dict[str, Set[str]] = {name: set() for name in known}
    for edge in edges(known):
        if not allowed(edge, known):
            graph[edge[0]].add(edge[1])
    return graph


def test_the_agent_has_no_import_cycle() -> None:
    found = cycles(graph_of())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_reader_finds_a_cycle_it_is_shown(tmp_path: Path) -> None:
    """The checker itself: a planted lazy cycle between two modules is found, and a package's
    lazy import of its own submodule is not one."""
    package = tmp_path / "agent"
    (package / "pkg").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from agent.b import g\n")
    (package / "b.py").write_text("from agent import a\n")
    (package / "pkg" / "__init__.py").write_text("def make():\n    from agent.pkg.impl import X\n")
    (package / "pkg" / "impl.py").write_text("from agent.pkg import make\n")
    found = cycles(graph_of(package))
    assert found == [["agent.a", "agent.b", "agent.a"]]


def test_every_module_is_seen() -> None:
    known = modules()
    assert "agent.collect.netns" in known and "agent.pipeline.agent" in known
    assert len(known) > 40

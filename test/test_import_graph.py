"""The package's modules import each other without a cycle, imports inside functions included (issue #26).

The graph is read from the source with ``ast`` (every ``import`` statement anywhere in a module, relative ones
resolved), not from ``sys.modules``: a function-level import that has not run yet is an edge all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusemycells"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``fusemycells.a.b`` of ``root/a/b.py`` (``fusemycells.a`` of ``root/a/__init__.py``)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module name an ``import`` or ``from … import …`` anywhere in ``tree`` (module ``name``) names:
    for ``from a import b`` both ``a.b`` (when ``b`` is a submodule) and ``a``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports (edges to itself and to its own parent packages left out)."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        names = imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {n for n in names if n in paths and n != name and n not in parents}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle_function_level_imports_included() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "fusemycells.ops" in graph["fusemycells.preprocess"]  # really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle_through_an_import_inside_a_function(tmp_path: Path) -> None:
    root = tmp_path / "fusemycells"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from fusemycells.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(root)
    assert graph["fusemycells.a"] == {"fusemycells.sub", "fusemycells.sub.b"} and graph["fusemycells.sub.b"] == {"fusemycells.a"}
    assert find_cycle(graph) == ["fusemycells.a", "fusemycells.sub.b", "fusemycells.a"]
    (root / "sub" / "b.py").write_text("def f():\n    import os\n")
    assert find_cycle(import_graph(root)) is None

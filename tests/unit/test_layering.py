"""House rules of the package's imports, checked on the source: every module is visible to the
import graph, no import circle between modules of mvllm/, and no `_private` name imported from
another module. pyproject's import-linter contracts state the layers; this states what they cannot."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import grimp

import mvllm

PACKAGE_DIR = Path(mvllm.__file__).parent


def module_name(path: Path) -> str:
    parts = ("mvllm", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def strongly_connected(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each one an import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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


def private_imports(path: Path, name: str) -> Iterator[str]:
    """`from mvllm.x import _y` (or the relative form) in the module `name` at `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if source != "mvllm" and not source.startswith("mvllm."):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                yield f"{name} (line {node.lineno}) imports {source}.{alias.name}"


def test_tarjan_finds_circles_and_only_circles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert strongly_connected(edges) == [["a", "b", "c"]]


def test_every_module_is_in_the_import_graph() -> None:
    # A folder without __init__.py is a namespace package that grimp (so import-linter) never reads.
    graph = grimp.build_graph("mvllm", cache_dir=None)
    unseen = sorted(set(source_modules()) - graph.modules)
    assert not unseen, f"modules the import graph cannot see (add the package's __init__.py): {unseen}"


def test_no_import_circle_between_modules() -> None:
    graph = grimp.build_graph("mvllm", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules}
    circles = strongly_connected(edges)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_name_imported_from_another_module() -> None:
    found = [line for name, path in source_modules().items() for line in private_imports(path, name)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)

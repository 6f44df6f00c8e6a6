"""The router's layering, read from its source: it imports no dashboard, CLI or agent code, and its
modules import each other without a circle (imports at module level are the edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import mvllm.router

ROUTER = Path(mvllm.router.__file__).parent
FORBIDDEN = ("mvllm.tui", "mvllm.ctl", "mvllm.agent")


def _module_name(path: Path) -> str:
    parts = ("mvllm", "router", *path.relative_to(ROUTER).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return names


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROUTER.rglob("*.py"))}


def test_router_never_imports_dashboard_cli_or_agent() -> None:
    found = [(m, n) for m, tree in _sources().items() for n in _imports(tree) if n.startswith(FORBIDDEN)]
    assert found == []


def test_router_modules_form_no_import_circle() -> None:
    sources = _sources()
    graph = {
        m: {n for stmt in tree.body for n in _imports(stmt) if n in sources and n != m}
        for m, tree in sources.items()
    }
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert "mvllm.router.proxy" in graph and len(graph) > 30  # the walk saw the real tree

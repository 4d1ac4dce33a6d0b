"""The package's shape: imports flow one way, the speed-ups and the CLI sit at the edges, modules stay small.

Read from the source (ast), so a cycle hidden in a function-level import counts too. Imports under
`if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftcli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The peftcli modules `path` imports (a `from peftcli.x import y` names x.y where that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("peftcli"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("peftcli"):
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    found.add(candidate if candidate in MODULES else child.module)
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if not (top_level_only and nested):
                visit(child, depth + nested)

    visit(tree, 0)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _area(module: str) -> str:
    """The package a module belongs to: peftcli.methods.lora -> methods; peftcli.cli -> cli."""
    return module.split(".")[1] if module.count(".") else "peftcli"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_modules_import_each_other_without_cycles():
    graph = {name: _imports(path, top_level_only=True) & set(MODULES) for name, path in MODULES.items()}
    # a package's __init__ is imported with any of its modules; that is not an edge back to it
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_packages_depend_on_each_other_one_way():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps = {_area(d) for d in _imports(path, top_level_only=False)} - {_area(name), "peftcli"}
        graph.setdefault(_area(name), set()).update(deps)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_speedups_and_the_cli_sit_at_the_edges():
    importers = {
        target: sorted(
            name
            for name, path in MODULES.items()
            if _area(name) != target and any(_area(d) == target for d in _imports(path, top_level_only=False))
        )
        for target in ("fast", "cli")
    }
    assert importers["cli"] == []
    assert importers["fast"] == ["peftcli.train.loop"]  # installed once, by the training setup


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_doing_two_jobs(name):
    lines = MODULES[name].read_text(encoding="utf-8").count("\n")
    assert lines <= 420, f"{name}: {lines} lines"


def test_no_function_runs_past_a_screen():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 65:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long

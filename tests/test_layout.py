"""The house rules of framework/, checked over its import graph (read with ast; nothing is imported):
- the `pretrain` commands (framework/commands/) are imported by nothing outside them but the entry point;
- models/ and objectives/ (pure modules and losses) import nothing from tasks/, data/, callbacks/ or commands/;
- no import cycles, counting imports inside functions and a package's __init__ importing a module that imports the
  package back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "framework"
ENTRY_POINTS = {"framework.__main__"}  # `python -m framework`: enters through framework.commands.main


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of the package at `root` it imports anywhere in its body (a package counts as its
    __init__)."""
    top = root.name
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != top:
                    continue
                edges.add(target)
                edges |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as the list of modules around it), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_entry_point_imports_the_commands():
    graph = import_graph()
    assert any(_in(m, "framework.commands") for m in graph), "framework/commands/ not found"
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                       if _in(t, "framework.commands") and not _in(m, "framework.commands") and m not in ENTRY_POINTS)
    assert not offenders, offenders


def test_models_and_objectives_stay_pure():
    graph = import_graph()
    banned = ("framework.tasks", "framework.data", "framework.callbacks", "framework.commands")
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                       if (_in(m, "framework.models") or _in(m, "framework.objectives"))
                       and any(_in(t, b) for b in banned))
    assert not offenders, offenders


def test_the_checker_sees_every_kind_of_cycle(tmp_path):
    """On a toy package: an import inside a function and a package __init__ importing a module that imports the
    package back are both cycles; a relative import resolves to its module."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from toy.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from toy.sub import g\n")
    (pkg / "b.py").write_text("from .sub import a\n")
    graph = import_graph(pkg)
    assert graph["toy.sub.a"] == {"toy.sub"} and graph["toy.b"] == {"toy.sub", "toy.sub.a"}
    assert find_cycle(graph) == ["toy.sub", "toy.sub.a", "toy.sub"]
    (pkg / "sub" / "a.py").write_text("def f():\n    import toy.b\n")
    assert find_cycle(import_graph(pkg)) == ["toy.b", "toy.sub", "toy.sub.a", "toy.b"]
    (pkg / "sub" / "a.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None

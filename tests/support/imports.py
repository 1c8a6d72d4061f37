"""The project's own import graph, read from the source (ast): which module imports which."""
from __future__ import annotations

import ast
from pathlib import Path

from support.env import ROOT

SKIP = {".venv", ".git", "tests", "bench", "__pycache__", "var", "build"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the project outside tests/ and bench/."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP & set(relative.parts[:-1]) or relative.parts[0].startswith(".") or path.name == "gunicorn.conf.py":
            continue
        name = ".".join(relative.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, at module level or inside functions."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    wanted = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            wanted.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            wanted.add(base)
            wanted.update(f"{base}.{alias.name}" for alias in node.names)  # `from store import outbox`
    found = set()
    for target in wanted:
        while target and target not in modules:  # `import a.b.c` also imports a and a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, modules) for name in modules}


def reachable(starts, edges: dict[str, set[str]]) -> set[str]:
    """Every module that one of `starts` imports, directly or through others (the starts included)."""
    seen, queue = set(), [s for s in starts if s in edges]
    while queue:
        name = queue.pop()
        if name not in seen:
            seen.add(name)
            queue.extend(edges[name])
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import circles, each as the list of modules around it (empty when the graph is a tree of layers)."""
    found, state, stack = [], {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)
    return found

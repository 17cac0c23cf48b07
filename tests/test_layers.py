"""The import structure of ``mtp``, read from the source with ``ast`` (nothing is imported): no cycle,
the core reaches no MLflow and no Ray, the product never imports the bench package.

Every import statement counts, those inside functions included; only ``if TYPE_CHECKING:``
blocks are skipped (they never run). Importing a module also runs its packages'
``__init__``, so what a module reaches includes what its parents import.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SOURCE_ROOT

CORE = ("mtp.model", "mtp.loss", "mtp.train", "mtp.checkpoint", "mtp.data", "mtp.config", "mtp.decoding",
        "mtp.sandbox")
OUTSIDE_THE_CORE = ("mlflow", "ray")


def _modules() -> dict[str, Path]:
    """Every module under platform/mtp by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted((SOURCE_ROOT / "mtp").rglob("*.py")):
        parts = list(path.relative_to(SOURCE_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The dotted names a module's import statements name: ``from a import b`` names ``a.b``
    where that is a module, else ``a`` (a package's ``__init__`` runs before its modules anyway)."""
    names: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                pending.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolved against this module's package
                    package = module.split(".")
                    package = package[: len(package) - child.level + (1 if is_package else 0)]
                    base = ".".join(package + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                for alias in child.names:
                    names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            pending.append(child)
    return names


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the mtp modules it imports, module -> the outside top-level packages it imports)."""
    modules = _modules()
    inside: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for name, path in modules.items():
        names = _imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", set(modules))
        inside[name] = {n for n in names if n in modules and n != name}
        outside[name] = {n.split(".")[0] for n in names if n.split(".")[0] != "mtp"}
    return inside, outside


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _reach(module: str, inside: dict[str, set[str]]) -> set[str]:
    """Every mtp module that importing ``module`` runs (its parents' ``__init__`` included)."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        pending.extend(inside[current])
        pending.extend(p for p in _parents(current) if p in inside)
    return seen


def _cycles(inside: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(inside[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(inside):
        if node not in index:
            visit(node)
    return found


def _chain(start: str, target: str, inside: dict[str, set[str]], outside: dict[str, set[str]]) -> list[str]:
    """One import chain from ``start`` to a module importing ``target`` (breadth first), for the message."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        current = queue.pop(0)
        if target in outside[current]:
            path = [target, current]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for successor in sorted(inside[current] | {p for p in _parents(current) if p in inside}):
            if successor not in previous:
                previous[successor] = current
                queue.append(successor)
    return []


def test_the_reader_sees_function_level_imports():
    source = "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n" \
             "def f():\n    from mtp.tracking import runs\n    from . import sibling\n"
    names = _imported_names(ast.parse(source), "mtp.decoding.engine", False, {"mtp.tracking.runs"})
    assert names == {"os", "typing", "mtp.tracking.runs", "mtp.decoding"}


def test_no_import_cycle_between_modules():
    inside, _ = _graph()
    assert len(inside) > 50, "the reader found too few modules: is SOURCE_ROOT right?"
    assert _cycles(inside) == []


def test_the_core_reaches_no_mlflow_and_no_ray():
    inside, outside = _graph()
    core = [m for m in inside if any(m == c or m.startswith(c + ".") for c in CORE)]
    assert len(core) > 20
    reached = {}
    for module in core:
        for target in OUTSIDE_THE_CORE:
            if any(target in outside[m] for m in _reach(module, inside)):
                reached[f"{module} -> {target}"] = " -> ".join(_chain(module, target, inside, outside))
    assert reached == {}


def test_the_product_never_imports_the_bench_package():
    """Measurement (``mtp.bench``) is imported by jobs/ and tests/ only, never by the product."""
    inside, _ = _graph()
    product = [m for m in inside if m != "mtp.bench" and not m.startswith("mtp.bench.")]
    reached = {m: sorted(r for r in _reach(m, inside) if r.startswith("mtp.bench")) for m in product}
    assert {m: r for m, r in reached.items() if r} == {}

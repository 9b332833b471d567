"""qpeft's import graph, read with ``ast`` (every ``import`` statement, at module level and
inside functions), for tests/test_layering.py.

Modules are named as Python imports them: ``core/`` is ``qpeft.core``, ``plugins/`` is
``qpeft.plugins`` (pyproject.toml's ``package-dir``), and the example plugin under
``examples/`` by its own module names. An edge A → B means A's source imports B, where B is
the deepest qpeft module the statement names (``from qpeft.core.plugin import registry`` is an edge
to ``qpeft.core.plugin.registry``; ``from qpeft.core.base.errors import QpeftError`` to
``qpeft.core.base.errors``). Importing a submodule also runs its packages' ``__init__``; those
implicit edges are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name → directory, as pyproject.toml's package-dir maps them
PACKAGES = {"qpeft": ROOT / "qpeft", "qpeft.core": ROOT / "core", "qpeft.plugins": ROOT / "plugins"}
EXAMPLES = ROOT / "examples"


def _module_name(path: Path, package: str, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts]) if package else ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of qpeft (``qpeft``, ``qpeft.core…``, ``qpeft.plugins…``): name → file."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path, package, root)] = path
    return found


def example_files() -> list[Path]:
    """Every Python file of the example plugin packages (their modules and their tests)."""
    return sorted(p for p in EXAMPLES.rglob("*.py") if not {"__pycache__", "build"} & set(p.parts)
                  and not any(part.endswith(".egg-info") for part in p.parts))


def imported_names(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module name an ``import`` statement in ``path`` names, with its line: module
    level and inside functions; relative imports resolved against ``module``; for
    ``from X import Y`` the name ``X.Y`` (:func:`edges` keeps the deepest module of it:
    ``X.Y`` when Y is a module, else ``X``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _target(name: str, known: set[str]) -> str | None:
    """The deepest known module that ``name`` is or lies in (None outside qpeft)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(files: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """module → {imported qpeft module → first line}; a module's imports of itself and of its
    own packages are left out."""
    files = modules() if files is None else files
    known = set(modules())
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        out = graph.setdefault(module, {})
        for name, line in imported_names(path, module):
            target = _target(name, known)
            if target and target != module and not module.startswith(target + "."):
                out.setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one
    concrete circle ``[a, b, …, a]`` through it, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
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
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_circle(graph, component) for component in components)


def _circle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """One shortest circle through the first module of ``component`` (breadth first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                return paths[node] + [start]
            if nxt in component and nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return sorted(component)


if __name__ == "__main__":
    graph = edges()
    print(len(graph), "modules,", sum(map(len, graph.values())), "edges")
    for circle in cycles(graph):
        print("cycle:", " → ".join(circle))

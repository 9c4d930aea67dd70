"""The import graph of our packages, read from the source (AST), and the architecture's rules.

Used by tests/test_boundaries.py on the real tree, and on planted trees to show that each rule
fails when broken. An import counts wherever it is written (module level or inside a function:
a lazy import is still a dependency), except under `if TYPE_CHECKING:`, which never runs.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("orchestrator", "remote_payload", "ngp_train")


@dataclass(frozen=True, slots=True)
class Edge:
    source: str          # importing module, dotted
    target: str          # imported module, dotted (the longest prefix that is one of ours)
    line: int
    top_level: bool      # executed when `source` is imported (not inside a def)


@dataclass(slots=True)
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    external: list[Edge] = field(default_factory=list)   # imports of third-party top-level names

    def targets(self, source: str) -> set[str]:
        return {e.target for e in self.edges if e.source == source and e.target != source}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, top_level) for every import outside `if TYPE_CHECKING:` blocks."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other, top)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def build(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    g = Graph()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            g.modules[_module_name(root, path)] = path
    for name, path in g.modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node, top in _imports(tree):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                candidates = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in g.modules else mod
                              for a in node.names]
            for target in candidates:
                resolved = _resolve(target, g.modules)
                edge = Edge(name, resolved or target, node.lineno, top)
                (g.edges if resolved else g.external).append(edge)
    return g


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def cycles(adjacency: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adjacency.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(adjacency):
        if v not in index:
            strong(v)
    return out


def module_cycles(g: Graph) -> list[list[str]]:
    """Cycles between modules (a package counts as its `__init__`: a submodule importing the
    package that re-exports it is a cycle too)."""
    adj: dict[str, set[str]] = {m: set() for m in g.modules}
    for e in g.edges:
        if e.target != e.source:
            adj[e.source].add(e.target)
    return cycles(adj)


def part_of(module: str) -> str:
    """The architecture part a module belongs to: `orchestrator.<folder>` (or the top-level
    module), `remote_payload`, `ngp_train`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "orchestrator" and len(parts) > 1 else parts[0]


def part_cycles(g: Graph) -> list[list[str]]:
    """Cycles between parts (folders): each folder one part, depending one way only."""
    adj: dict[str, set[str]] = {}
    for e in g.edges:
        a, b = part_of(e.source), part_of(e.target)
        adj.setdefault(a, set())
        if a != b:
            adj[a].add(b)
    return cycles(adj)


def forbidden(g: Graph, source_prefix: str, target_prefixes: tuple[str, ...],
              allowed: tuple[str, ...] = (), top_level_only: bool = False,
              external: bool = False) -> list[Edge]:
    """Edges from modules under `source_prefix` to any of `target_prefixes` (ours, or third-party
    names when `external`), except targets in `allowed`."""
    pool = g.external if external else g.edges
    bad = []
    for e in pool:
        if not (e.source == source_prefix or e.source.startswith(source_prefix + ".")):
            continue
        if top_level_only and not e.top_level:
            continue
        if e.target in allowed:
            continue
        if any(e.target == t or e.target.startswith(t + ".") for t in target_prefixes):
            bad.append(e)
    return bad

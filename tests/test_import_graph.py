"""jaxserve's own import graph has no cycles, counting imports inside functions (a lazy import
that closes a circle still ties the two modules together: neither can be read, tested or moved
alone). Read statically from the source, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxserve", "pallas_kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool):
    """(target, names) for every import statement that can run (not under `if TYPE_CHECKING`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_pkg else module.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            yield base, tuple(a.name for a in node.names)
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules importing it runs. `from P import name` runs P's
    __init__ (and any lazy `__getattr__` there) unless name is a submodule; importing a.b.c also
    runs the __init__ of a and a.b, except those the importer is itself inside (already run)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        own = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")))}
        tree = ast.parse(path.read_text(), str(path))
        for base, names in _imports(tree, m, path.name == "__init__.py"):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods]
            if base in mods and (not names or len(targets) < len(names)):
                targets.append(base)
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts)):
                    anc = ".".join(parts[:i])
                    if anc in mods and anc not in own and anc != m:
                        graph[m].add(anc)
                if t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_edges_that_mattered():
    g = import_graph()
    assert "jaxserve.llm" in g["jaxserve.evaluation"]  # evaluation drives LLMs: one way
    assert {"jaxserve.loading.corpus", "jaxserve.model.awq"} <= g["jaxserve.llm"]
    assert "jaxserve.loading.fetch" in g["jaxserve.loading.corpus"]
    assert "jaxserve.llm" in g["jaxserve"]  # the facade's lazy __getattr__ counts


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_lazy_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

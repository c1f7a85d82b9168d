"""The modules of lampq_jax import one another one way: no cycle, counting every import statement."""

import ast
from pathlib import Path

import lampq_jax

PACKAGE_ROOT = Path(lampq_jax.__file__).parent


def module_name(path: Path) -> str:
    """lampq_jax/quant/uniform.py → 'lampq_jax.quant.uniform'; a package's __init__.py → the package."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of the file names, at any depth (lazy and TYPE_CHECKING ones too)."""
    name, is_package = module_name(path), path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the lampq_jax modules it imports}, edges to its own enclosing packages left out.

    An imported name maps to the innermost module it lies in, and to each package above that module
    (importing `a.b.c` runs `a/b/__init__.py` first).
    """
    modules = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            while target.startswith("lampq_jax"):
                if target != name and not name.startswith(target + "."):
                    edges.add(target)
                target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_real_imports():
    graph = import_graph()
    assert "lampq_jax.pipeline" in graph and "lampq_jax.quant.uniform" in graph
    assert "lampq_jax.allocation" in graph["lampq_jax.pipeline"]
    assert "lampq_jax.apply.dynamic" in graph["lampq_jax.pipeline"]
    assert "lampq_jax.apply" in graph["lampq_jax.pipeline"]  # the package runs first


def test_no_import_cycle_inside_lampq_jax():
    assert cycles(import_graph()) == []

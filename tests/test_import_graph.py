"""The package import graph: no cycles between packages, and ``kernels/`` imports only leaf modules.

Every module under src/qwen1m is parsed with ``ast`` (imports at the top and inside functions alike:
an import hidden in a function is still a dependency) and each import is mapped to a node: a
sub-package (``qwen1m.attention``, ``qwen1m.kernels``, ...) or a top-level module (``qwen1m.llm``,
``qwen1m.config``, ...; the package's own ``__init__`` is the node ``qwen1m``).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "qwen1m"

# Shared data types and helpers that import nothing from qwen1m but each other. ``kernels/`` may
# import these and nothing else of qwen1m.
LEAVES = {
    "qwen1m.errors",
    "qwen1m.config",  # frozen model / DCA configs
    "qwen1m.sparse_config",  # frozen sparse-attention config
    "qwen1m.transfer",  # host_to_device
    "qwen1m.rope",  # RoPE, YaRN and the DCA position maps
    "qwen1m.sparse_index",  # the vertical-slash block index types
}


# Packages below others: none of them imports any of the packages listed after it.
NOT_ABOVE = {
    "qwen1m.kernels": {"qwen1m.attention", "qwen1m.model", "qwen1m.cache", "qwen1m.engine", "qwen1m.parallel"},
    "qwen1m.attention": {"qwen1m.model", "qwen1m.engine", "qwen1m.parallel"},
    "qwen1m.model": {"qwen1m.engine", "qwen1m.parallel"},
    "qwen1m.engine": {"qwen1m.parallel", "qwen1m.llm"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The qwen1m modules ``name`` imports, anywhere in its body (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import qwen1m.a.b`` of an attribute: its module
                target = target.rpartition(".")[0]
            if target.startswith("qwen1m"):
                found.add(target)
    return found


def _node(module: str) -> str:
    """qwen1m.attention.dca -> qwen1m.attention; qwen1m.llm -> qwen1m.llm; qwen1m -> qwen1m."""
    return ".".join(module.split(".")[:2])


def _module_edges() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _package_edges() -> dict[tuple[str, str], list[str]]:
    """(node, node) -> the module imports that make the edge, e.g. 'qwen1m.a.x -> qwen1m.b.y'."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in _module_edges().items():
        for dst in sorted(targets):
            edge = (_node(src), _node(dst))
            if edge[0] != edge[1]:
                edges[edge].append(f"{src} -> {dst}")
    return edges


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def _describe(cycle: list[str], edges: dict[tuple[str, str], list[str]]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines.append(f"  {a} -> {b}: " + "; ".join(edges[(a, b)][:3]))
    return "\n".join(lines)


def test_finds_a_cycle_and_names_its_imports():
    """The checker itself: a planted cycle is found and printed with the imports behind it."""
    edges = {("a", "b"): ["a.x -> b.y"], ("b", "c"): ["b.y -> c.z"], ("c", "a"): ["c.z -> a.x"],
             ("a", "d"): ["a.x -> d"]}
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycle = _find_cycle(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert "c -> a: c.z -> a.x" in _describe(cycle, edges)
    graph["c"].discard("a")
    assert _find_cycle(graph) is None


def test_parser_sees_imports_inside_functions_and_relative_imports(tmp_path):
    src = tmp_path / "qwen1m" / "pkg" / "mod.py"
    src.parent.mkdir(parents=True)
    src.write_text("from . import other\n\ndef f():\n    from qwen1m.lower.leaf import thing\n")
    known = {"qwen1m.pkg.mod", "qwen1m.pkg.other", "qwen1m.lower.leaf", "qwen1m.lower"}
    assert _imports("qwen1m.pkg.mod", src, known) == {"qwen1m.pkg.other", "qwen1m.lower.leaf"}


def test_no_cycles_between_packages():
    edges = _package_edges()
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle between packages:\n" + _describe(cycle, edges)


def test_leaves_import_only_leaves():
    edges = _module_edges()
    for leaf in sorted(LEAVES):
        assert leaf in edges, f"{leaf} is listed as a leaf module but does not exist"
        above = edges[leaf] - LEAVES
        assert not above, f"leaf module {leaf} imports {sorted(above)}"


def test_kernels_import_only_leaf_modules():
    bad = [f"{src} -> {dst}" for src, targets in _module_edges().items() if _node(src) == "qwen1m.kernels"
           for dst in sorted(targets) if _node(dst) != "qwen1m.kernels" and dst not in LEAVES]
    assert not bad, "kernels/ imports from above it:\n" + "\n".join(bad)


@pytest.mark.parametrize("lower", sorted(NOT_ABOVE))
def test_layering(lower):
    bad = [line for (a, b), lines in _package_edges().items() if a == lower and b in NOT_ABOVE[lower]
           for line in lines]
    assert not bad, f"{lower} imports a package above it:\n" + "\n".join(bad)

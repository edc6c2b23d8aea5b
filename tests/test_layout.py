"""The package layout: no import cycles between swavctl's parts, and size limits on modules and functions.

A *part* is a package directly under ``swavctl/`` (``swavctl.train``, ``swavctl.weights``, ...) or a
module at the root (``swavctl.api``). Part A depends on part B when any module of A imports any
module of B, at the top or inside a function (a deferred import is still a dependency). The graph
of parts must have no cycle: no part imports a part that imports it back, directly or in a loop.

The root ``swavctl/__init__.py`` is left out of the graph: it imports nothing of swavctl when it
runs (its public names are loaded on first use through ``importlib``), which
:func:`test_package_root_imports_nothing_at_run_time` checks; every part reads ``__version__``
from it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "swavctl"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# Being restructured on branch cliopts (issue 19: options declared once, one module per eval mode).
CLIOPTS_OWNED = ("commands", "eval", "inspect")


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every swavctl module ``module`` imports, at any depth of its code."""
    found: set[str] = set()
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from swavctl.x import y`` imports the module swavctl.x.y when y is one.
            found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
    return {name for name in found if name.startswith("swavctl.") and _is_module(name)}


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def part_graph() -> dict[str, set[str]]:
    """Part -> the parts it imports (itself excluded)."""
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        if module == "swavctl":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = graph.setdefault(_part(module), set())
        edges.update(_part(t) for t in _imported(tree, module, path.name == "__init__.py"))
        edges.discard(_part(module))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of parts (Tarjan), as a list of parts."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycle_between_parts() -> None:
    graph = part_graph()
    assert {"swavctl.train", "swavctl.eval", "swavctl.weights", "swavctl.distributed"} <= set(graph)
    groups = _cycles(graph)
    described = [
        ", ".join(f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group) for group in groups
    ]
    assert not groups, "parts that import each other: " + " | ".join(described)


#: The parts in the order docs/design.md gives ("Direction of imports"): a part imports only parts
#: of earlier groups. Parts of one group do not import each other.
ORDER = [
    ["errors"],
    ["files"],
    ["config"],
    ["distributed"],
    ["reporting"],
    ["model", "data"],
    ["clustering"],
    ["objective"],
    ["weights"],
    ["eval"],
    ["inspect"],
    ["train"],
    ["bench"],
    ["commands"],
    ["cli"],
    ["api", "__main__"],
]


def test_imports_follow_the_documented_direction() -> None:
    rank = {f"swavctl.{name}": i for i, group in enumerate(ORDER) for name in group}
    graph = part_graph()
    assert set(graph) == set(rank), "a part is missing from ORDER (and from docs/design.md)"
    wrong = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if rank[b] >= rank[a])
    assert not wrong, "imports against the direction in docs/design.md: " + ", ".join(wrong)


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check itself: a loop through three parts, or a deferred import back, is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from swavctl.train import loop\n")
    assert _imported(tree, "swavctl.eval.run", is_package=False) == {"swavctl.train", "swavctl.train.loop"}


def test_package_root_imports_nothing_at_run_time() -> None:
    """``swavctl/__init__.py`` imports swavctl modules only for type checkers (and lazily by name)."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                names = [inner.module or ""]
            elif isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            else:
                continue
            assert not any(n.startswith("swavctl") for n in names), ast.unparse(inner)


def _owned_by_cliopts(path: Path) -> bool:
    return path.relative_to(ROOT).parts[0] in CLIOPTS_OWNED


def _long_modules(cliopts: bool) -> list[str]:
    found = []
    for _, path in _modules():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES and _owned_by_cliopts(path) == cliopts:
            found.append(f"{path.relative_to(ROOT.parent)}: {lines} lines")
    return found


def _long_functions(cliopts: bool) -> list[str]:
    """Functions longer than the limit, counted from the ``def`` line to the function's last line."""
    found = []
    for _, path in _modules():
        if _owned_by_cliopts(path) != cliopts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT.parent)}::{node.name}: {length} lines")
    return found


def test_no_module_over_500_lines() -> None:
    assert not _long_modules(cliopts=False)


def test_no_function_over_80_lines() -> None:
    assert not _long_functions(cliopts=False)


def test_commands_eval_inspect_within_the_limits() -> None:
    assert not _long_modules(cliopts=True) + _long_functions(cliopts=True)

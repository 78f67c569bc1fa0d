"""The package's layering: no import cycle between nbkit modules, and ``formats/`` (pure tensor-dict <-> file
functions) never reaches back into the networks or the trainers.

Every ``import`` statement counts, also the ones inside functions (a lazy import still ties the two modules
together). ``from nbkit.x import y`` is an edge to ``nbkit.x`` (its ``__init__`` runs) and to ``nbkit.x.y`` when
that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nbkit"


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package __init__)}`` of every module under nbkit/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported nbkit module: first line}}``, module-level and function-level imports alike."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub`` runs ``pkg/__init__`` too: an edge to both
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            else:
                continue
            for target in targets:
                if target != "nbkit" and not target.startswith("nbkit."):
                    continue
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return found


def test_the_checker_finds_a_lazy_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert "nbkit.networks.base" in import_graph()["nbkit.train.lora"]  # a function-level import counts


def test_no_import_cycle_in_nbkit():
    graph = import_graph()
    cycles = strongly_connected(graph)
    described = [
        "\n".join(f"  {a} -> {b} (line {graph[a][b]})" for a in component for b in graph[a] if b in component)
        for component in cycles
    ]
    assert not cycles, "import cycles (move the shared code to the lower module):\n" + "\n\n".join(described)


def test_formats_never_import_networks_or_training():
    graph = import_graph()
    bad = [f"{module} -> {target} (line {line})"
           for module, targets in graph.items() if module == "nbkit.formats" or module.startswith("nbkit.formats.")
           for target, line in targets.items()
           if target.split(".")[:2] in (["nbkit", "networks"], ["nbkit", "train"])]
    assert not bad, "formats/ must hold pure tensor-dict <-> file functions:\n" + "\n".join(bad)

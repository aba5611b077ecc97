"""The import graph of src/mustafar: acyclic, and no module imports another's private name (issue 12).

Built from the source with ``ast`` (lazy imports inside functions count too): an edge ``a -> b`` for every
``import``/``from ... import`` in ``a`` that names module ``b`` of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mustafar

ROOT = Path(mustafar.__file__).resolve().parent
PACKAGE = "mustafar"
#: Modules allowed to import private names of others: the backend launchers reach into their kernels.
BACKEND_MODULES = ("mustafar.backends", "mustafar.launch.")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules) -> tuple[set[str], list[tuple[str, str]]]:
    """``(modules name imports, [(module, private name)] it imports)``."""
    base = name if is_package else name.rsplit(".", 1)[0]
    targets, private = set(), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                targets.add(full if full in modules else source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and full not in modules:
                    private.append((source, alias.name))
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name in modules)
    targets.discard(name)
    return {t for t in targets if t in modules}, private


def _graph():
    modules = _modules()
    edges, private = {}, {}
    for name, (path, is_package) in modules.items():
        edges[name], private[name] = _imports(name, path, is_package, modules)
    return edges, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of module names, or ``None``."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_found():
    edges, _ = _graph()
    assert "mustafar.format" in edges and "mustafar.ops" in edges
    assert "mustafar.format" in edges["mustafar.ops"]
    assert "mustafar.backends" in edges["mustafar.ops"]


def test_the_import_graph_is_acyclic():
    edges, _ = _graph()
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_format_imports_no_compute_layer():
    edges, _ = _graph()
    below = {"mustafar._checks", "mustafar.pruning", "mustafar.fp8"}  # fp8: the FP8 kept-value rule (issue 15)
    assert edges["mustafar.format"] <= below, edges["mustafar.format"]
    assert edges["mustafar.fp8"] <= {"mustafar._checks"}, edges["mustafar.fp8"]


def test_no_private_name_is_imported_across_modules():
    _, private = _graph()
    offenders = {name: names for name, names in private.items() if names and not name.startswith(BACKEND_MODULES)}
    assert not offenders, f"private names imported: {offenders}"

"""The package's shape: its modules import each other in one direction (no circle), and only at
the top of a file (no import inside a function to dodge a circle)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "discrete_vae"


def own_imports(path: Path) -> tuple[set[str], list[str]]:
    """The package modules `path` imports, and those imported below the top level (file:line)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("discrete_vae"):
            names = [node.module] if node.module != "discrete_vae" else [f"discrete_vae.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("discrete_vae")]
        else:
            continue
        found.update(names)
        if names and id(node) not in top:
            nested.append(f"{path.name}:{node.lineno}")
    return {n.split(".")[1] for n in found if "." in n}, nested


def test_no_import_circle_and_no_import_inside_a_function():
    graph, nested = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):  # a subpackage (estimators/) is one node, all its files together
        node = path.stem if path.parent == PACKAGE else path.parent.name
        imports, inner = own_imports(path)
        graph[node] = graph.get(node, set()) | (imports - {node})
        nested += inner
    assert not nested, f"imports of the package below the top level: {nested}"

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for nxt in sorted(graph.get(node, ())):
            if (found := cycle_from(nxt, stack + [node])) is not None:
                return found
        return None

    for module in graph:
        assert cycle_from(module, []) is None, f"import circle: {' -> '.join(cycle_from(module, []))}"
    # the maths stands apart from Lightning: the model and its parts import no Lightning module
    for module in ("vae", "sbn", "chain", "latents", "sampling", "networks", "evaluation", "diagnostics", "temperature"):
        assert "lightning" not in (PACKAGE / f"{module}.py").read_text(), module
    for path in (PACKAGE / "estimators").glob("*.py"):
        assert "lightning" not in path.read_text(), path.name

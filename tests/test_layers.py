"""The package's layering: module-level imports point one way (no cycles), and the
layers sit in the order the README and ``audit/__init__`` describe."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "audit"

# bottom to top; a module may import only modules of its own layer or below
LAYERS = [
    {"_compat", "errors", "progress", "tables", "calibration"},
    {"metrics", "config", "device", "fastconv", "imagecache"},
    {"data", "model", "acquire", "flags", "curves", "dupes", "confident"},
    {"datachecks"},
    {"mc", "decisions"},
    {"runs", "cluster"},
    {"train"},
    {"score", "alstate"},
    {"curate", "active"},
    {"loop"},
    {"report"},
    {"cli", "__init__"},
]


def module_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        nodes = [node]
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not imports at run time
            continue
        for n in nodes:
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                if n.module:
                    out.add(n.module.split(".")[0])
                else:
                    out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("audit."):
                out.add(n.module.split(".")[1])
            elif isinstance(n, ast.Import):
                out.update(a.name.split(".")[1] for a in n.names if a.name.startswith("audit."))
    return out


def graph() -> dict[str, set[str]]:
    return {p.stem: module_imports(p) for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d in g and state.get(d) is None:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if state.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer_and_imports_point_down():
    g = graph()
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    assert set(g) == set(layer), f"modules without a layer (or layers without a module): {set(g) ^ set(layer)}"
    upward = [(m, d) for m, deps in g.items() for d in deps if d in layer and layer[d] > layer[m]]
    assert not upward, f"imports that point up a layer: {upward}"

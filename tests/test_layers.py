"""The layering of DESIGN.md: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deepmetric"

#: low to high; a module may import its own layer and the ones before it
LAYERS = [
    ["checks", "files", "distributed", "distances", "tiles"],
    ["mining"],
    ["losses"],
    ["neighbors"],
    ["models"],
    ["config", "checkpoints", "devices"],
    ["components"],
    ["data"],
    ["runs"],
    ["training"],
    ["evaluate"],
    ["inference"],
    ["gallery"],
    ["service"],
    ["demo", "demo_oneshot", "cli", "__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("deepmetric.") else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(_top(node.module))
            if node.module == "deepmetric":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(_top(alias.name) for alias in node.names)
    return found - {""}


FILES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC or p.stem != "__init__")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_higher_layer(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    assert own in RANK, f"{own} is in no layer: add it to LAYERS (and DESIGN.md)"
    higher = {m for m in _imports(path) if RANK.get(m, -1) > RANK[own]}
    assert not higher, f"{path.relative_to(SRC)} imports the higher layer(s) {sorted(higher)}"


#: the layers that use a trained run without training one: they reach it through deepmetric.runs
USES_RUNS = ("evaluate", "inference", "gallery", "service")


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if p.relative_to(SRC).parts[0] in USES_RUNS],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_evaluation_and_inference_never_import_training(path):
    assert "training" not in _imports(path), f"{path.relative_to(SRC)} imports training"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["deepmetric", *parts])


def _module_imports(path: Path, known: set[str]) -> set[str]:
    """The deepmetric modules ``path`` imports (``from deepmetric.x import y``: ``x.y`` when
    that is a module, else ``x``), package faces (``__init__``) left out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
                break
    return found


def test_no_import_cycles():
    """No two modules import each other, directly or through others (package faces aside:
    an ``__init__`` only hands names on)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py") if p.stem != "__init__"}
    graph = {name: _module_imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(cycles)

"""The layering of DESIGN.md: a lower layer never imports a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deepmetric"

#: low to high; a module may import its own layer and the ones before it
LAYERS = [
    ["distributed", "distances", "tiles"],
    ["mining"],
    ["losses"],
    ["neighbors"],
    ["models"],
    ["config", "checkpoints"],
    ["data"],
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

"""docs/reliability.md names the tests that prove each guarantee: every one it names exists.

A reference is ``tests/FILE.py::NAME`` (optionally ``[params]``), or ``::NAME`` for the file named
last before it, or a bare ``tests/FILE.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)|(tests/[\w/]+\.py)")


def references(text: str) -> list[tuple[str, str | None]]:
    """(file, test name or None) for each reference in ``text``, in order."""
    out: list[tuple[str, str | None]] = []
    last: str | None = None
    for m in REF.finditer(text):
        if m.group(3):
            last = m.group(3)
            out.append((last, None))
            continue
        last = m.group(1) or last
        assert last is not None, f"::{m.group(2)} before any test file is named"
        out.append((last, m.group(2)))
    return out


def test_references_are_parsed() -> None:
    text = "`tests/a.py::t1`, `::t2[x]` and `tests/b.py`; `tests/c.py::t3`"
    assert references(text) == [
        ("tests/a.py", "t1"),
        ("tests/a.py", "t2"),
        ("tests/b.py", None),
        ("tests/c.py", "t3"),
    ]


def test_every_test_docs_reliability_names_exists() -> None:
    refs = references(DOC.read_text())
    assert len(refs) > 50
    missing = []
    for file, name in refs:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name and not re.search(rf"^(async )?def {name}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


ARCHITECTURE = ROOT / "docs" / "architecture.md"
MODULE = re.compile(r"\b([a-z_]+(?:/[a-z_]+)*(?:\.py|/))(?=[\s,):]|$)")


def test_the_architecture_page_names_modules_that_exist() -> None:
    """Every module or package docs/architecture.md's layer list names is in src/deepmetric."""
    text = ARCHITECTURE.read_text()
    block = text.split("## Layers, low to high", 1)[1].split("```")[1]
    names = {m.group(1) for m in MODULE.finditer(block)}
    assert len(names) >= 20, names
    src = ROOT / "src" / "deepmetric"
    missing = sorted(n for n in names if not (src / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"

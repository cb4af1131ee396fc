"""What several commands share: the ``--import`` and ``--device`` options and their checks,
the model loader, image file listing, the one-line warnings and text made safe to show."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepmetric.files import print_stderr

DEVICE_HELP = "where a run's network runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:N"
MODEL_HELP = "a run folder, or an .onnx file written by `deepmetric export`"
GALLERY_HELP = "the gallery file (SQLite; its index is the folder GALLERY.index)"


def import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=[],
        help="import a Python module first (repeatable): the one that registers a run's model "
        "builder with deepmetric.models.register_model (runs trained by deepmetric.fit)",
    )


def import_modules(names: list[str]) -> None:
    """Import each module named by ``--import`` (from the current folder too), or say why not."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"--import {name}: {error}") from None


def check_device(device: str | None) -> None:
    """``--device`` (every command but train, which has train.device) checked before any work:
    CUDA absent, a GPU not here, a typo: one line, now."""
    if device is not None:
        from deepmetric.devices import resolve_device

        resolve_device(device)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Warnings (a damaged latest checkpoint, collapsed embeddings, ...) as one line each on
    stderr, ``deepmetric: warning: MESSAGE``, not Python's ``FILE:LINE: Category: ...`` and
    the source line."""

    def show(message: Any, category: Any, filename: str, lineno: int, file=None, line=None):
        print(f"deepmetric: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def load_embedder(source: str, device: str, *, calibrate: bool) -> Any:
    """An Embedder of a run folder, or of an exported ``.onnx`` file."""
    from deepmetric.inference import Embedder

    return Embedder.load(source, device=device, calibrate=calibrate, progress=print_stderr)


def image_files(paths: list[str]) -> list[Path]:
    """Files as given; folders: their image files (by extension), recursively, sorted, hidden
    files and folders left out."""
    from deepmetric.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def shown(text: str) -> str:
    """``text`` for a terminal: characters that are not printable (escape sequences,
    direction overrides, zero-width characters) as Python escapes, never raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def plural(n: int, word: str) -> str:
    """``"1 example"``, ``"2 examples"``."""
    return f"{n} {word}{'s' * (n != 1)}"

"""Writing a file so that a reader sees the old file or the new one, never half of either;
and the one progress printer.

:func:`write_atomically` writes into ``NAME.partial`` next to the target and renames it over
the target (``os.replace``: atomic on one file system); the partial file is removed whatever
happens, so a failed write leaves the old file as it was and no litter beside it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Where long work says how it goes: one line of text at a time.
Progress = Callable[[str], None]


def print_stderr(text: str) -> None:
    """The default :data:`Progress`: ``text`` as one line on stderr, flushed."""
    print(text, file=sys.stderr, flush=True)


def partial_path(path: str | os.PathLike[str]) -> Path:
    """``path`` + ``.partial``: where :func:`write_atomically` writes before the rename."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[Path], None], *, fsync: bool = False
) -> Path:
    """``write(partial)`` fills ``path.partial`` (a path it opens itself: a library that
    wants a file name gets one), which then replaces ``path``; with ``fsync`` the data reach
    the disk before the rename. Returns ``path``."""
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        if fsync:
            with open(partial, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_bytes_atomically(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]
) -> Path:
    """``write(fh)`` into a binary file opened on ``path.partial``, then the rename."""

    def fill(partial: Path) -> None:
        with open(partial, "wb") as fh:
            write(fh)

    return write_atomically(path, fill)


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` (UTF-8) as the whole new content of ``path``."""
    return write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / inf float (e.g. a metric of a class with a single item) as
    ``None``, in nested dicts, lists and tuples: strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json_atomically(path: str | os.PathLike[str], value: Any) -> Path:
    """``value`` as indented JSON, the whole new content of ``path``."""
    return write_text_atomically(path, json.dumps(value, indent=2))


__all__ = [
    "Progress",
    "partial_path",
    "print_stderr",
    "strict_json",
    "write_atomically",
    "write_bytes_atomically",
    "write_json_atomically",
    "write_text_atomically",
]

"""Fixed pairs and triplets without classes: the ``pairs:FILE`` and ``triplets:FILE`` specs.

For data that has no classes, only judgements: two images and whether they show the same thing
(Quora-style duplicates), or rankings as triplets (RankIQA-style: an anchor, an image closer to
it, an image farther from it). ``FILE`` is a CSV file with a header row::

    a,b,same                    pairs: same is 1/0, true/false or same/different
    anchor,positive,negative    triplets: d(anchor, positive) should be < d(anchor, negative)

Paths are relative to the CSV file's folder (absolute ones are taken as they are). The images
are decoded exactly as :func:`~deepmetric.data.datasets.load_image_folder` decodes a folder's
(the same size, channels, resample filter and safety rules: raster formats only, a pixel
budget), each distinct file once, into one uint8 ``(N, C, H, W)`` tensor; the tuples are rows
of indices into it (:class:`Tuples`). Anything wrong is one line, a :class:`DatasetError`
naming the file and, where it is a row's fault, the line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from deepmetric.config import TUPLE_SPECS
from deepmetric.data.datasets import DatasetError, _decode_image, _PixelBuffer

TupleKind = Literal["pairs", "triplets"]

#: The header row each kind of file must have (compared without case and surrounding spaces).
HEADERS: dict[str, tuple[str, ...]] = {
    "pairs": ("a", "b", "same"),
    "triplets": ("anchor", "positive", "negative"),
}
#: The values the ``same`` column takes (compared without case and surrounding spaces).
SAME_VALUES: dict[str, bool] = {
    "1": True,
    "true": True,
    "same": True,
    "0": False,
    "false": False,
    "different": False,
}
assert set(HEADERS) == set(TUPLE_SPECS)


@dataclass(frozen=True)
class Tuples:
    """Fixed tuples over a set of images.

    ``images``: uint8 ``(N, C, H, W)``, each distinct file once (``paths[i]`` is image ``i``'s
    file); ``index``: int64 ``(P, 2)`` for pairs, ``(T, 3)`` for triplets (anchor, positive,
    negative), indices into ``images``; ``same``: bool ``(P,)`` for pairs, ``None`` for
    triplets; ``source``: the CSV file."""

    kind: TupleKind
    images: torch.Tensor
    index: torch.Tensor
    same: torch.Tensor | None
    paths: tuple[Path, ...]
    source: str

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (
            f"Tuples({self.kind}: {len(self)} of {len(self.paths)} images "
            f"{tuple(self.images.shape[1:])} from {self.source})"
        )

    def subset(self, rows: Sequence[int] | torch.Tensor | np.ndarray) -> Tuples:
        """The tuples at ``rows`` (in that order), over the same images."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        same = None if self.same is None else self.same[idx]
        return Tuples(self.kind, self.images, self.index[idx], same, self.paths, self.source)


def _check_kind(kind: str) -> TupleKind:
    if kind not in HEADERS:
        raise ValueError(f"kind must be one of {', '.join(HEADERS)}, got {kind!r}")
    return kind  # type: ignore[return-value]


def _read_rows(path: Path, kind: TupleKind) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of the rows after the header, blank lines left out; the header
    checked against :data:`HEADERS`."""
    header = HEADERS[kind]
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: a folder, not a CSV file") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text (a CSV file is expected)") from None
    except csv.Error as error:
        raise DatasetError(f"{path}: not a readable CSV file ({error})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error})") from None
    if not rows:
        raise DatasetError(f"{path}: empty; the first line must be the header {','.join(header)}")
    first = tuple(c.strip().lower() for c in rows[0][1])
    if first != header:
        other = next((k for k, h in HEADERS.items() if h == first and k != kind), None)
        hint = f" (that is a {other} file: use {other}:{path})" if other else ""
        raise DatasetError(
            f"{path}: the header must be {','.join(header)} for {kind}:FILE, got "
            f"{','.join(rows[0][1])!r}{hint}"
        )
    return rows[1:]


def _same(value: str, path: Path, line: int) -> bool:
    key = value.strip().lower()
    if key not in SAME_VALUES:
        raise DatasetError(
            f"{path} line {line}: same must be 1/0, true/false or same/different, got {value!r}"
        )
    return SAME_VALUES[key]


def load_tuple_file(
    file: str | os.PathLike[str],
    kind: str,
    *,
    mode: Literal["L", "RGB"] | None = None,
    size: int | tuple[int, int] = 64,
    resample: str = "bilinear",
) -> Tuples:
    """The pairs (``kind="pairs"``) or triplets (``"triplets"``) of the CSV ``file``, their
    images decoded as :func:`~deepmetric.data.datasets.load_image_folder` decodes a folder's
    (``mode``, ``size``, ``resample`` as there), each distinct file once (paths are compared
    resolved: ``a.png`` and ``./a.png`` are one image).

    ``DatasetError`` (one line) for a missing file, a wrong header, a row of the wrong length,
    a bad ``same`` value, a missing or unreadable image (naming the line) and fewer than 2
    rows."""
    kind = _check_kind(kind)
    path = Path(file)
    if mode not in (None, "L", "RGB"):
        raise ValueError(f"mode must be 'L', 'RGB' or None, got {mode!r}")
    from deepmetric.data.preprocess import RESAMPLE

    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE)}, got {resample!r}")
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    header = HEADERS[kind]
    rows = _read_rows(path, kind)
    if len(rows) < 2:
        raise DatasetError(f"{path}: {len(rows)} {kind[:-1]} row(s); at least 2 are needed")
    n_paths = 2 if kind == "pairs" else 3
    folder = path.parent
    ids: dict[Path, int] = {}
    first_line: list[int] = []  # the line that names image i first
    index = np.empty((len(rows), n_paths), dtype=np.int64)
    same = np.empty(len(rows), dtype=bool)
    for r, (line, cells) in enumerate(rows):
        if len(cells) != len(header):
            raise DatasetError(
                f"{path} line {line}: {len(cells)} value(s), expected {len(header)} "
                f"({','.join(header)})"
            )
        for c, cell in enumerate(cells[:n_paths]):
            name = cell.strip()
            if not name:
                raise DatasetError(f"{path} line {line}: no path in column {header[c]}")
            image = Path(name) if Path(name).is_absolute() else folder / name
            if not image.is_file():
                raise DatasetError(f"{path} line {line}: image {name!r} not found ({image})")
            key = image.resolve()
            if key not in ids:
                ids[key] = len(ids)
                first_line.append(line)
            index[r, c] = ids[key]
        if kind == "pairs":
            same[r] = _same(cells[2], path, line)
    paths = tuple(ids)
    buffer = _PixelBuffer(len(paths), hw, rgb=mode == "RGB")
    for i, image in enumerate(paths):
        try:
            buffer.put(i, _decode_image(image, mode, hw, resample))
        except DatasetError as error:
            raise DatasetError(f"{path} line {first_line[i]}: {error}") from None
    return Tuples(
        kind,
        torch.from_numpy(buffer.pixels),
        torch.from_numpy(index),
        torch.from_numpy(same) if kind == "pairs" else None,
        paths,
        str(path),
    )


def split_tuples(data: Tuples, val_fraction: float, seed: int = 0) -> tuple[Tuples, Tuples]:
    """``(train, validation)``: about ``val_fraction`` of the tuples held out, drawn with
    ``seed``. Pairs are stratified by ``same``: each of the two groups gives
    ``round(val_fraction * its size)`` pairs, at least 1 when it has 2 or more (so that the
    validation pairs have both kinds whenever the file does: a threshold and an ROC need them),
    and keeps at least 1. Both parts keep the file's order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups = (
        [np.arange(len(data))]
        if data.same is None
        else [np.flatnonzero(data.same.numpy() == flag) for flag in (True, False)]
    )
    val_mask = np.zeros(len(data), dtype=bool)
    for group in groups:
        n_val = min(round(val_fraction * len(group)), len(group) - 1)
        if val_fraction > 0 and len(group) >= 2:
            n_val = max(n_val, 1)
        val_mask[rng.permutation(group)[:n_val]] = True
    return data.subset(np.flatnonzero(~val_mask)), data.subset(np.flatnonzero(val_mask))


__all__ = [
    "HEADERS",
    "SAME_VALUES",
    "TupleKind",
    "Tuples",
    "load_tuple_file",
    "split_tuples",
]

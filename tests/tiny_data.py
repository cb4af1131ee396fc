"""Tiny data sets on disk, in the real formats, for tests that run the command line.

Images are 28x28 uint8: a bright bar whose place depends on the class, jittered by a pixel
and noised, so a few training steps already separate the classes.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def patterns(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(N, 28, 28)`` uint8 images: class ``c`` is a 5x10 bar at one of 10 grid places."""
    rng = np.random.default_rng(seed)
    images = rng.normal(20.0, 10.0, size=(len(labels), 28, 28))
    for i, c in enumerate(labels):
        dr, dc = rng.integers(-1, 2, size=2)
        row = 3 + (int(c) // 5 % 2) * 13 + dr
        col = 1 + (int(c) % 5) * 5 + dc
        images[i, row : row + 10, col : col + 5] += 200.0
    return np.clip(images, 0, 255).astype(np.uint8)


def _labels(classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(classes, dtype=np.uint8), per_class)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file: magic ``0x0000 08 ndim``, big-endian dims, then the uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_idx_dir(
    directory: Path, *, classes: int = 10, n_train: int = 24, n_test: int = 8, seed: int = 0
) -> Path:
    """The four MNIST files (``train-images-idx3-ubyte.gz``, ...) with ``n_*`` per class."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = _labels(classes, per_class)
        image_name, label_name = IDX_NAMES[split]
        write_idx(directory / image_name, patterns(labels, seed + (split == "test")))
        write_idx(directory / label_name, labels)
    return directory


def make_image_folder(
    directory: Path, *, classes: int = 5, n_train: int = 16, n_test: int = 8, seed: int = 0
) -> Path:
    """``directory/{train,test}/class_C/I.png``: grayscale PNGs, one subfolder per class."""
    from PIL import Image

    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = _labels(classes, per_class)
        for i, (c, image) in enumerate(zip(labels, patterns(labels, seed + (split == "test")))):
            folder = directory / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return directory


def make_npz(
    file: Path, *, classes: int = 10, n_train: int = 24, n_test: int = 8, seed: int = 0
) -> Path:
    """One ``.npz`` with ``x``/``y`` (train) and ``x_test``/``y_test``."""
    file.parent.mkdir(parents=True, exist_ok=True)
    y, y_test = _labels(classes, n_train), _labels(classes, n_test)
    np.savez(file, x=patterns(y, seed), y=y, x_test=patterns(y_test, seed + 1), y_test=y_test)
    return file


def make_identity_folders(directory: Path, *, per_identity: int = 2, seed: int = 0) -> Path:
    """``directory/NAME/I.png`` for the gallery's ``enroll --from-dir``: one subfolder per
    identity (``alice``, ``bob``, ``carol``: the patterns of classes 1, 2, 3), grayscale."""
    from PIL import Image

    for c, name in ((1, "alice"), (2, "bob"), (3, "carol")):
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.full(per_identity, c, dtype=np.uint8)
        for i, image in enumerate(patterns(labels, seed + c)):
            Image.fromarray(image).save(folder / f"{i}.png")
    return directory


def make_photos(directory: Path, seed: int = 0) -> list[Path]:
    """``photo1.png`` (RGB, 56x56) and ``photo2.png`` (grayscale, 28x28): two images of class 0
    for the ``verify`` / ``embed`` examples, of another size and mode than the training data."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    first, second = patterns(np.zeros(2, dtype=np.uint8), seed)
    big = Image.fromarray(first).resize((56, 56), Image.Resampling.BILINEAR).convert("RGB")
    big.save(directory / "photo1.png")
    Image.fromarray(second).save(directory / "photo2.png")
    return [directory / "photo1.png", directory / "photo2.png"]


def _tuple_images(directory: Path, labels: np.ndarray, seed: int) -> list[str]:
    """``directory/images/I.png``: the patterns of ``labels``; their paths relative to
    ``directory``."""
    from PIL import Image

    (directory / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(patterns(labels, seed)):
        names.append(f"images/{i:04d}.png")
        Image.fromarray(image).save(directory / names[-1])
    return names


def make_pairs_csv(
    directory: Path, *, classes: int = 5, per_class: int = 6, pairs: int = 60, seed: int = 0
) -> Path:
    """``directory/pairs.csv`` (``a,b,same``) over ``directory/images/*.png``: half the pairs
    of two images of one class (same), half of two classes (different); no class is written."""
    labels = _labels(classes, per_class)
    names = _tuple_images(directory, labels, seed)
    rng = np.random.default_rng(seed)
    lines = ["a,b,same"]
    for p in range(pairs):
        i = int(rng.integers(len(labels)))
        same = p % 2 == 0
        pool = np.flatnonzero((labels == labels[i]) == same)
        pool = pool[pool != i]
        j = int(rng.choice(pool))
        lines.append(f"{names[i]},{names[j]},{'same' if same else 'different'}")
    (directory / "pairs.csv").write_text("\n".join(lines) + "\n")
    return directory / "pairs.csv"


def make_triplets_csv(
    directory: Path, *, classes: int = 5, per_class: int = 6, triplets: int = 60, seed: int = 0
) -> Path:
    """``directory/triplets.csv`` (``anchor,positive,negative``) over
    ``directory/images/*.png``: the positive of the anchor's class, the negative of another."""
    labels = _labels(classes, per_class)
    names = _tuple_images(directory, labels, seed)
    rng = np.random.default_rng(seed)
    lines = ["anchor,positive,negative"]
    for _ in range(triplets):
        a = int(rng.integers(len(labels)))
        positives = np.flatnonzero(labels == labels[a])
        p = int(rng.choice(positives[positives != a]))
        n = int(rng.choice(np.flatnonzero(labels != labels[a])))
        lines.append(f"{names[a]},{names[p]},{names[n]}")
    (directory / "triplets.csv").write_text("\n".join(lines) + "\n")
    return directory / "triplets.csv"

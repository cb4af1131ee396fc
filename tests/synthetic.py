"""Small data sets the tests write themselves (no downloads)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> IDX file content (magic 0x0000 08 ndim, big-endian dims)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_learnable_idx(
    directory: Path, n_classes: int = 6, n_train: int = 40, n_test: int = 20, seed: int = 0
) -> Path:
    """An IDX folder (MNIST layout) whose classes a small CNN can tell apart: each class is a
    fixed random 28x28 template, each image that template shifted by up to 2 pixels plus noise.
    ``n_train`` / ``n_test`` images per class."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.random((n_classes, 28, 28)) > 0.7
    for prefix, per_class in (("train", n_train), ("t10k", n_test)):
        labels = np.repeat(np.arange(n_classes), per_class)
        rng.shuffle(labels)
        shifts = rng.integers(-2, 3, size=(len(labels), 2))
        images = np.stack(
            [np.roll(templates[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)]
        ).astype(np.float64)
        images = np.clip(images * 200 + rng.normal(0, 40, images.shape), 0, 255)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return directory


def train_tiny_run(data: Path, out: Path, *overrides: str) -> Path:
    """Train a tiny run on the IDX folder ``data`` into ``out`` (16-d, P = K = 4, one epoch
    unless ``overrides`` say otherwise, e.g. ``"epochs=2"``, ``"mode=batch"``); return ``out``.
    SmallCNN at lr 1e-3 without warm-up: it learns the toy data within these few steps (the
    default VGGSmall, BatchNorm and warm-up are made for 20 epochs of Fashion-MNIST). On the
    CPU (``train.device=cpu``) unless an override names another device: the same weights on
    every machine, GPU or not (tests/test_cuda.py trains on CUDA)."""
    from deepmetric.config import load_config
    from deepmetric.training import train

    base = [f"data=idx:{data}", f"out={out}", "model.dim=16", "train.p=4", "train.k=4", "epochs=1"]
    base += ["model.backbone=small_cnn", "train.lr=0.001", "train.warmup_epochs=0"]
    base += ["train.device=cpu"]
    train(load_config(None, [*base, *overrides]), stream=None)
    return out

"""What the training loop reads: a data set as index access (``Source``), and the same data
with every class split into its images' eight symmetries (``DihedralSource``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from deepmetric.data import DIHEDRAL, ArrayDataset, dihedral


def check_finite_inputs(x: torch.Tensor, name: str) -> None:
    """A ``ValueError`` naming ``name`` and counting the NaN / inf values of inputs ``x``
    (N, ...): images with NaN pixels are the data's fault, not a diverged training."""
    if not x.is_floating_point() or x.numel() == 0:
        return
    finite = torch.isfinite(x)
    bad = int(x.numel() - finite.sum())
    if bad:
        items = int((~finite.reshape(len(x), -1)).any(1).sum())
        raise ValueError(
            f"{name} holds {bad:,} non-finite input values (NaN or inf) in {items:,} of its "
            f"{len(x):,} items: fix or drop those items (not a diverged training)"
        )


class Source:
    """Index access to a data set: ``labels`` (N,) int64 and ``fetch(idx) -> inputs (B, ...)``.

    An :class:`~deepmetric.data.ArrayDataset` is indexed directly; any other map-style
    ``Dataset`` of ``(input, label)`` is read item by item (its labels once, at the start,
    unless given)."""

    def __init__(self, data: Dataset, labels: Any = None, *, name: str = "the data") -> None:
        self.data = data
        if isinstance(data, ArrayDataset) and data.data.is_floating_point():
            check_finite_inputs(data.data, name)
        if labels is not None:
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        elif isinstance(data, ArrayDataset):
            self.labels = data.y
        else:
            self.labels = torch.as_tensor([int(data[i][1]) for i in range(len(data))])  # type: ignore[arg-type]
        if self.labels.dim() != 1 or len(self.labels) != len(data):  # type: ignore[arg-type]
            raise ValueError(
                f"labels must be (N,) = ({len(data)},), got {tuple(self.labels.shape)}"  # type: ignore[arg-type]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.data, ArrayDataset):
            return self.data.inputs[idx]
        return torch.stack([torch.as_tensor(self.data[int(i)][0]) for i in idx])


class DihedralSource(Source):
    """Every class of ``base`` made eight classes: item ``j`` is image ``i = j // 8`` of ``base``
    under symmetry ``t = j mod 8`` of the square (:func:`~deepmetric.data.dihedral`), with label
    ``8 y_i + t``; N images give 8N items.

    Class augmentation for the open set: a Sandal turned upside down is not a Sandal, so the
    network must tell 8x as many classes apart, with features that are not only those of the
    few training classes (joint class x transformation labels: Lee, Hwang, Shin, "Self-supervised
    label augmentation via input transformations", ICML 2020)."""

    def __init__(self, base: Source) -> None:
        sample = base.fetch(torch.zeros(1, dtype=torch.long))
        if sample.dim() != 4 or sample.shape[-1] != sample.shape[-2]:
            raise ValueError(
                "train.dihedral_classes needs square images (N, C, S, S); the data's items are "
                f"{tuple(sample.shape[1:])}"
            )
        self.base = base
        self.data = base.data
        t = torch.arange(DIHEDRAL)
        self.labels = (base.labels[:, None] * DIHEDRAL + t).flatten()

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return dihedral(self.base.fetch(idx // DIHEDRAL), idx % DIHEDRAL)


def training_source(source: Source, dihedral_classes: bool) -> Source:
    """``source``, or its :class:`DihedralSource` when ``dihedral_classes``."""
    return DihedralSource(source) if dihedral_classes else source

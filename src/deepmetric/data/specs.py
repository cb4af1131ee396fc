"""A data set by its spec: ``load_dataset("fashion-mnist")``, ``load_dataset("folder:DIR")``,
... (:data:`~deepmetric.data.datasets.SPEC_FORMS`): the one dispatcher over the loaders of
:mod:`~deepmetric.data.datasets` (the MNIST family, IDX, image folders, npz),
:mod:`~deepmetric.data.omniglot` and :mod:`~deepmetric.data.benchmarks`, which sit below it."""

from __future__ import annotations

import os
from collections.abc import Callable

from deepmetric.config import tuple_kind
from deepmetric.data.benchmarks import BENCHMARK_NAMES, load_benchmark
from deepmetric.data.datasets import (
    MNIST_FAMILY,
    SPEC_FORMS,
    ArrayDataset,
    DatasetError,
    Split,
    load_idx_dir,
    load_image_folder,
    load_mnist_family,
    load_npz,
)
from deepmetric.data.omniglot import load_omniglot
from deepmetric.data.tuples import Tuples, load_tuple_file


def load_dataset(
    spec: str,
    split: Split = "train",
    *,
    root: str | os.PathLike[str] | None = None,
    **opts: object,
) -> ArrayDataset:
    """Load a dataset by spec: ``mnist``, ``fashion-mnist``, ``kmnist``, ``omniglot``,
    ``idx:DIR``, ``folder:DIR`` or ``npz:FILE``.

    ``root`` is the download cache of the named datasets (see :func:`data_home`); path
    specs ignore it. ``opts`` go to the loader: :func:`fetch_mnist_family` (``download``,
    ``mirrors``, ``search_dirs``, ``fetch``), :func:`~deepmetric.data.omniglot.load_omniglot`
    (the same, with ``md5`` and ``size``) or :func:`load_image_folder` (``mode``, ``size``,
    ``resample``).
    See each loader for what ``split="test"`` means for it.
    """
    kind, sep, arg = spec.partition(":")
    if tuple_kind(spec) is not None:
        raise DatasetError(
            f"{spec} holds fixed {kind} and no classes: it trains with mode="
            f"{'siamese' if kind == 'pairs' else 'triplet'} and is read by load_tuples, not as "
            "a data set of classes"
        )
    if not sep and spec in MNIST_FAMILY:
        return load_mnist_family(spec, split, root=root, **opts)
    if spec == "omniglot":
        return load_omniglot(split, root=root, **opts)  # type: ignore[arg-type]
    if kind in BENCHMARK_NAMES:  # lazy ImageFiles: data/benchmarks.py
        return load_benchmark(kind, arg or None, split, root=root, **opts)  # type: ignore[return-value, arg-type]
    loaders: dict[str, Callable[..., ArrayDataset]] = {
        "idx": load_idx_dir,
        "folder": load_image_folder,
        "npz": load_npz,
    }
    if not sep or kind not in loaders or not arg:
        raise ValueError(f"unknown dataset spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    return loaders[kind](arg, split, **opts)


def load_tuples(spec: str, **opts: object) -> Tuples:
    """The fixed pairs or triplets of a ``pairs:FILE`` / ``triplets:FILE`` spec
    (:func:`~deepmetric.data.tuples.load_tuple_file`; ``opts``: ``mode``, ``size``,
    ``resample`` as for image folders). Any other spec is a ``ValueError``."""
    kind = tuple_kind(spec)
    if kind is None:
        raise ValueError(f"{spec!r} is not a tuples spec (pairs:FILE or triplets:FILE)")
    return load_tuple_file(spec.partition(":")[2], kind, **opts)  # type: ignore[arg-type]


__all__ = ["load_dataset", "load_tuples"]

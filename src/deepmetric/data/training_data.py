"""The data a run trains on, from its config: the training split (restricted to
``train.classes``), its validation split (``train.val_classes`` or ``train.val_fraction``) and
the loader options of the data spec. Training, evaluation and inference all read a run's data
through here, so they hold out the same items."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from deepmetric.config import Config, ConfigError, tuple_kind
from deepmetric.data.benchmarks import BENCHMARK_NAMES
from deepmetric.data.datasets import (
    ArrayDataset,
    class_split,
    draw_val_classes,
    train_val_split,
)
from deepmetric.data.specs import load_dataset, load_tuples
from deepmetric.data.tuples import Tuples, split_tuples


def load_options(config: Config) -> dict[str, object]:
    """Loader options of the config's data spec: the image size (``image_size``) for image
    folders, the benchmarks and the images of ``pairs:`` / ``triplets:`` files, which are
    resized when read."""
    resized = config.data.startswith("folder:") or tuple_kind(config.data) is not None
    if resized or config.data.partition(":")[0] in BENCHMARK_NAMES:
        return {"size": (config.image_size, config.image_size)}
    return {}


class TrainingData(NamedTuple):
    """The training set, its validation split and the resolved ``train.val_classes`` (sorted
    ids; ``None`` when validation is a stratified ``train.val_fraction``)."""

    train: ArrayDataset
    val: ArrayDataset
    val_classes: list[int] | None


def _training_split(config: Config) -> ArrayDataset:
    """The data set's train split, restricted to ``train.classes`` when set."""
    data = load_dataset(config.data, "train", **load_options(config))  # type: ignore[arg-type]
    if config.train.classes is not None:
        data, _ = class_split(data, config.train.classes)
    if len(data) == 0:
        raise ConfigError(f"no training samples in {config.data} (train.classes filter?)")
    return data


def resolve_val_classes(config: Config, labels: torch.Tensor | None = None) -> list[int] | None:
    """``train.val_classes`` as sorted class ids: the one place a count or a fraction becomes
    ids (:func:`~deepmetric.data.datasets.draw_val_classes`, with ``config.seed``), called by
    training's validation split and by evaluation alike, so both hold out the same classes.

    The classes drawn from are those of ``train.classes`` when set, else the classes present
    in the training split, whose ``labels`` (after the ``train.classes`` filter) are read from
    the data set when not given. A list is returned as its ids. ``None`` when unset; a count
    the classes cannot give is a one-line ``ConfigError`` naming the key and the value.
    """
    spec = config.train.val_classes
    if spec is None or isinstance(spec, list):
        return None if spec is None else draw_val_classes((), spec, config.seed)
    if config.train.classes is not None:
        class_ids: list[int] = sorted(set(config.train.classes))
    else:
        labels = _training_split(config).y if labels is None else labels
        class_ids = torch.unique(labels).tolist()
    try:
        return draw_val_classes(class_ids, spec, config.seed)
    except ValueError as error:
        raise ConfigError(f"train.val_classes={spec} on {config.data}: {error}") from None


def load_training_data(config: Config) -> TrainingData:
    """The training set (restricted to ``train.classes`` if set), its validation split and
    the resolved validation classes: the items of ``train.val_classes`` when set
    (class-disjoint; see :func:`resolve_val_classes`), else a stratified
    ``train.val_fraction`` of every class."""
    data = _training_split(config)
    val_classes = resolve_val_classes(config, data.y)
    if val_classes is not None:
        val, train = class_split(data, val_classes)
        if len(torch.unique(val.y)) < 2:
            raise ConfigError(
                f"train.val_classes {config.train.val_classes}: fewer than 2 of them have "
                f"items in {config.data}"
            )
        return TrainingData(train, val, val_classes)
    if config.train.val_fraction == 0:
        return TrainingData(data, data.subset(np.zeros(0, dtype=np.int64)), None)
    return TrainingData(*train_val_split(data, config.train.val_fraction, seed=config.seed), None)


class TrainingTuples(NamedTuple):
    """The fixed tuples a ``pairs:`` / ``triplets:`` run trains on and its validation tuples
    (``train.val_fraction`` of them, drawn with the seed; none at 0)."""

    train: Tuples
    val: Tuples


def load_training_tuples(config: Config) -> TrainingTuples:
    """The tuples of the config's ``pairs:FILE`` / ``triplets:FILE`` spec, split into training
    and validation tuples (:func:`~deepmetric.data.tuples.split_tuples` with ``config.seed``):
    training, threshold calibration and evaluation all hold out the same ones."""
    data = load_tuples(config.data, **load_options(config))
    return TrainingTuples(*split_tuples(data, config.train.val_fraction, seed=config.seed))


def load_data(config: Config) -> tuple[ArrayDataset, ArrayDataset]:
    """The training set and its validation split (:func:`load_training_data`)."""
    data = load_training_data(config)
    return data.train, data.val


__all__ = [
    "TrainingData",
    "TrainingTuples",
    "load_data",
    "load_options",
    "load_training_data",
    "load_training_tuples",
    "resolve_val_classes",
]

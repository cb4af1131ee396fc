"""Run folders: ``train(config)`` (config -> objects -> the loop -> summary), resuming, and
loading a trained run back (``load_trained``) for evaluation and inference.

A run folder (``config.run_dir``) holds ``config.yaml`` (the resolved config), ``log.jsonl``
(one record per logged step, per epoch, and the summary), ``preprocess.json`` (for image data:
how images became inputs, read by :mod:`deepmetric.inference`), ``checkpoints/`` (after every epoch
and on Ctrl-C / SIGTERM; see :mod:`deepmetric.checkpoints`) and TensorBoard events when
tensorboard is installed. Resuming restores weights, optimiser, the position in the schedule
and the RNG, so a CPU run interrupted at any batch ends with the same weights as an
uninterrupted one (in ``offline`` mode, at any epoch boundary).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from torch import nn

from deepmetric import distributed
from deepmetric.components import check_components
from deepmetric.config import Config, tuple_kind
from deepmetric.data import Preprocessing, load_dataset, pixels_to_float
from deepmetric.data.training_data import load_training_tuples
from deepmetric.models import embed, embedding_part
from deepmetric.neighbors import nearest_other
from deepmetric.runs import Run, mirror_of
from deepmetric.training.builders import (
    build_loss,
    build_model,
    load_data,
    load_options,
    resolve_device,
)
from deepmetric.training.fit import check_resumable, run_config
from deepmetric.training.log import RunLog
from deepmetric.training.source import Source, training_source
from deepmetric.training.tuples import TupleSource


def train(
    config: Config, *, resume: bool = False, stream: TextIO | None = sys.stderr
) -> dict[str, Any]:
    """Train ``config`` into ``config.run_dir``; return the final summary (also logged), with
    the test split's precision@1 when the data set has one.

    Inside a process group (``deepmetric train --nproc N``, ``torchrun``) every rank trains its
    slice of each global batch; rank 0 alone writes the run folder and tests the result (the
    other ranks return the training summary only)."""
    # config.yaml says whether the trained network averages mirror images (never null)
    config = replace(
        config, out=str(config.run_dir), model=replace(config.model, mirror=mirror_of(config))
    )
    if distributed.process_device(config.train.device) is None:
        resolve_device(config.train.device)  # CUDA absent, a GPU not here: said before loading
    # a new run's config is what a user wrote: its names and loss options too
    check_components(config, written=not resume)
    if resume:
        check_resumable(config.run_dir)  # every checkpoint damaged: refused, nothing written
    train_source, val_source, pixels, sample = _sources(config)
    main = distributed.is_main()
    if main:
        _record_preprocessing(config, pixels, resume)
    classes = torch.unique(train_source.labels)
    torch.manual_seed(config.seed)  # the same initial weights for the same seed
    model = build_model(config, sample, len(classes))
    summary = run_config(
        config,
        model,
        train_source,
        val_source,
        build_loss(config, classes.tolist()),
        resume=resume,
        stream=stream,
    )
    if not main:
        return {"kind": "summary", "run_dir": str(config.run_dir), **summary}
    net = embedding_part(model)
    summary = {
        "kind": "summary",
        **test_report(config, net),  # where it trained
        "run_dir": str(config.run_dir),
        **summary,
    }
    log = RunLog(config.run_dir, None)
    log.write(summary)
    log.close()
    return summary


def _sources(config: Config) -> tuple[Source, Source | None, Any, torch.Tensor]:
    """The training and validation sources of the config's data, its stored inputs (what
    ``preprocess.json`` is made from) and one input (the network's input shape). A ``pairs:``
    / ``triplets:`` spec gives its fixed tuples (:class:`TupleSource`), any other its
    classes."""
    if tuple_kind(config.data) is not None:
        tuples = load_training_tuples(config)
        val = TupleSource(tuples.val, name="the validation tuples") if len(tuples.val) else None
        images = tuples.train.images
        return TupleSource(tuples.train, name=config.data), val, images, pixels_to_float(images[:1])
    train_set, val_set = load_data(config)
    train = training_source(Source(train_set, name=config.data), config.train.dihedral_classes)
    val_source = Source(val_set) if len(val_set) else None
    return train, val_source, train_set.data, train_set.inputs[:1]


def _record_preprocessing(config: Config, x: torch.Tensor, resume: bool) -> None:
    """Write ``RUN_DIR/preprocess.json`` when the data are images (N, C, H, W) in [0, 1]; not
    into the folder of another run (``train`` refuses that one next), and not over the file
    of the run being resumed."""
    pre = Preprocessing.from_images(x)
    run = Run(config.run_dir, config)
    if pre is None or (run.holds_checkpoints() and (not resume or run.preprocess_path.exists())):
        return
    run.write_preprocessing(pre)


def test_report(
    config: Config, net: nn.Module, device: torch.device | None = None
) -> dict[str, Any]:
    """Precision@1 on the data set's test split (each test item a query against the others);
    with ``train.classes``, also on the test items of the classes never trained on. The
    network runs on ``device`` (``None``: where it is)."""
    try:
        test_set = load_dataset(config.data, "test", **load_options(config))  # type: ignore[arg-type]
    except (ValueError, OSError):  # no test split (a plain folder or npz): nothing to report
        return {}
    report: dict[str, Any] = {"test_items": len(test_set)}
    emb = embed(net, test_set.inputs, device)
    metric = config.loss.metric
    report["test_precision_at_1"] = float(nearest_other(emb, test_set.y, metric)[1].float().mean())
    if config.train.classes is not None:
        unseen = ~torch.isin(test_set.y, torch.as_tensor(config.train.classes))
        if int(unseen.sum()) >= 2:
            correct = nearest_other(emb[unseen], test_set.y[unseen], metric)[1]
            report["unseen_classes_precision_at_1"] = float(correct.float().mean())
    return report


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config saved in ``run_dir`` (:meth:`Run.open <deepmetric.runs.Run.open>`);
    ``epochs=N`` may be overridden to train longer (the learning-rate schedule is then
    re-planned over N epochs: see :mod:`deepmetric.training.schedule`)."""
    return Run.open(run_dir, overrides).config


class TrainedRun(NamedTuple):
    """A run loaded back by :func:`open_trained`."""

    config: Config
    net: nn.Module
    checkpoint: Path  # the checkpoint folder the weights came from
    #: why that is not the checkpoint ``checkpoints/latest`` names (``None``: it is); the
    #: ``threshold.json`` of the run is then left alone (it belongs to the latest weights)
    fallback: str | None


def open_trained(run_dir: str | Path) -> TrainedRun:
    """The config and the embedding network of a run (:meth:`Run.network
    <deepmetric.runs.Run.network>`: the latest checkpoint that loads, eval mode, on the CPU,
    no classifier head) and where the weights came from."""
    run = Run.open(run_dir)
    loaded = run.network()
    return TrainedRun(run.config, loaded.net, loaded.checkpoint, loaded.fallback)


def load_trained(run_dir: str | Path) -> tuple[Config, nn.Module]:
    """``(config, net)`` of :func:`open_trained`."""
    trained = open_trained(run_dir)
    return trained.config, trained.net


def untrained_network(config: Config, sample: torch.Tensor) -> nn.Module:
    """The run's embedding network with its initial random weights
    (:meth:`Run.untrained_network <deepmetric.runs.Run.untrained_network>`)."""
    return Run(config.run_dir, config).untrained_network(sample)


__all__ = [
    "TrainedRun",
    "load_trained",
    "open_trained",
    "resume_config",
    "test_report",
    "train",
    "untrained_network",
]

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

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from torch import nn

from deepmetric import distributed
from deepmetric.checkpoints import holds_checkpoints, load_latest, load_model_state
from deepmetric.config import Config, ConfigError, config_from_dict, read_yaml_file
from deepmetric.data import Preprocessing, load_dataset
from deepmetric.models import build_registered, embed
from deepmetric.neighbors import nearest_other
from deepmetric.training.builders import (
    build_loss,
    build_model,
    load_data,
    load_options,
    mirror_of,
    resolve_device,
)
from deepmetric.training.fit import check_resumable, run_config
from deepmetric.training.log import RunLog
from deepmetric.training.source import Source, training_source


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
    if resume:
        check_resumable(config.run_dir)  # every checkpoint damaged: refused, nothing written
    train_set, val_set = load_data(config)
    main = distributed.is_main()
    if main:
        _record_preprocessing(config, train_set.data, resume)
    train_source = training_source(
        Source(train_set, name=config.data), config.train.dihedral_classes
    )
    classes = torch.unique(train_source.labels)
    torch.manual_seed(config.seed)  # the same initial weights for the same seed
    model = build_model(config, train_set.inputs[:1], len(classes))
    summary = run_config(
        config,
        model,
        train_source,
        Source(val_set) if len(val_set) else None,
        build_loss(config, classes.tolist()),
        resume=resume,
        stream=stream,
    )
    if not main:
        return {"kind": "summary", "run_dir": str(config.run_dir), **summary}
    net = model.embedding_net if hasattr(model, "embedding_net") else model
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


#: How the run's images became inputs (:class:`~deepmetric.data.Preprocessing`), for inference.
PREPROCESS_FILE = "preprocess.json"


def read_preprocessing(run_dir: str | os.PathLike[str]) -> Preprocessing | None:
    """``RUN_DIR/preprocess.json`` (``None`` when the run has none: vector data, or a run
    older than the file); a damaged file is a ``ValueError`` naming it."""
    path = Path(run_dir) / PREPROCESS_FILE
    if not path.is_file():
        return None
    try:
        return Preprocessing.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _record_preprocessing(config: Config, x: torch.Tensor, resume: bool) -> None:
    """Write ``RUN_DIR/preprocess.json`` atomically when the data are images (N, C, H, W) in
    [0, 1]; not into the folder of another run (``train`` refuses that one next), and not
    over the file of the run being resumed."""
    pre = Preprocessing.from_images(x)
    run_dir = config.run_dir
    if pre is None or (
        holds_checkpoints(run_dir) and (not resume or (run_dir / PREPROCESS_FILE).exists())
    ):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    partial = run_dir / f"{PREPROCESS_FILE}.partial"
    partial.write_text(json.dumps(pre.to_dict(), indent=2))
    os.replace(partial, run_dir / PREPROCESS_FILE)


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
    """The config saved in ``run_dir``; ``epochs=N`` may be overridden to train longer (the
    learning-rate schedule is then re-planned over N epochs: see
    :mod:`deepmetric.training.schedule`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {path} is missing")
    values = read_yaml_file(path, "run config")  # the hardened loader, as for any config
    if not isinstance(values, dict):
        raise ConfigError(f"run config {path}: expected a mapping, got {type(values).__name__}")
    values["out"] = str(run_dir)
    if isinstance(values.get("model"), dict):  # runs made before model.mirror: without
        values["model"].setdefault("mirror", False)
    try:
        config = config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"run config {path}: {error}") from None
    for text in overrides or []:
        key, _, value = text.partition("=")
        if key != "epochs":
            raise ConfigError(f"only epochs=N can change on resume, got {key!r}")
        try:
            config.epochs = int(value)
        except ValueError:
            raise ConfigError(f"epochs must be an integer, got {value!r}") from None
        if config.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {config.epochs}")
    return config


class TrainedRun(NamedTuple):
    """A run loaded back by :func:`open_trained`."""

    config: Config
    net: nn.Module
    checkpoint: Path  # the checkpoint folder the weights came from
    #: why that is not the checkpoint ``checkpoints/latest`` names (``None``: it is); the
    #: ``threshold.json`` of the run is then left alone (it belongs to the latest weights)
    fallback: str | None


def open_trained(run_dir: str | Path) -> TrainedRun:
    """The config and the embedding network (weights of the latest checkpoint that loads,
    eval mode, on the CPU) of a run, and where the weights came from; a damaged latest
    checkpoint falls back to the previous one with a one-line warning
    (:func:`~deepmetric.checkpoints.load_latest`). In joint mode the classifier head is
    dropped. A run of ``fit`` with a registered ``builder`` is rebuilt with it (the module
    registering it must be imported)."""
    run_dir = Path(run_dir)
    config = resume_config(run_dir)
    folder, model_state, _, fallback = load_latest(run_dir)
    prefix = "embedding_net."
    if any(k.startswith(prefix) for k in model_state):
        model_state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    net = _embedding_network(config, _sample_input(config, model_state), run_dir)
    load_model_state(net, model_state, source=folder)
    net.eval()
    return TrainedRun(config, net, folder, fallback)


def load_trained(run_dir: str | Path) -> tuple[Config, nn.Module]:
    """``(config, net)`` of :func:`open_trained`."""
    trained = open_trained(run_dir)
    return trained.config, trained.net


def untrained_network(config: Config, sample: torch.Tensor) -> nn.Module:
    """The run's embedding network with random weights, drawn after ``torch.manual_seed(
    config.seed)`` as :func:`train` draws them: for a run of ``deepmetric train`` these are its
    initial weights (joint mode builds the embedding network before its head). The baseline
    that says what training added to the architecture. Eval mode, on the CPU; the global RNG
    state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = _embedding_network(config, sample, config.run_dir)
    return net.eval()


def _embedding_network(config: Config, sample: torch.Tensor, run_dir: Path) -> nn.Module:
    """A new embedding network of the run's architecture (its registered builder, else the
    config's backbone, sized for inputs like ``sample``); no classifier head."""
    if config.model.builder is not None:
        return build_registered(config.model.builder, **config.model.builder_args)
    if config.data == "(python objects)":
        raise ConfigError(
            f"{run_dir} was trained by fit() with a model of its own and no builder: pass "
            "builder= (a function registered with deepmetric.models.register_model) to fit"
        )
    return build_model(replace(config, mode="batch"), sample, 1)


#: the first layer of each built-in backbone, whose weight says the input's channels / features
#: (a checkpoint's keys come sorted by name, not in the network's order)
FIRST_LAYER = {
    "small_cnn": "backbone.conv1.0.weight",
    "vgg_small": "backbone.features.0.weight",
    "resnet_small": "backbone.stem.0.weight",
    "mlp": "backbone.net.0.weight",
}


def _sample_input(config: Config, model_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A dummy input of the shape the saved backbone expects (read from its first layer);
    empty for a run of ``fit`` (its builder, if any, needs none)."""
    if config.model.builder is not None or config.data == "(python objects)":
        return torch.zeros(0)
    name = FIRST_LAYER[config.model.backbone]
    first = next((v for k, v in model_state.items() if k.endswith(name)), None)
    if first is None:
        raise ConfigError(
            f"the checkpoint has no {name}: not a model.backbone={config.model.backbone} network"
        )
    if config.model.backbone == "mlp":
        return torch.zeros(1, first.shape[1])
    return torch.zeros(1, first.shape[1], 28, 28)


__all__ = [
    "PREPROCESS_FILE",
    "TrainedRun",
    "load_trained",
    "open_trained",
    "read_preprocessing",
    "resume_config",
    "test_report",
    "train",
    "untrained_network",
]

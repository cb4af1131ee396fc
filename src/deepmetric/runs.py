"""A run folder and its one owner, :class:`Run`.

A run folder is the contract between training, evaluation, inference, the gallery and the
service. Its files, each with one writer::

    RUN_DIR/config.yaml       the resolved config (training writes it)
    RUN_DIR/checkpoints/      weights and training state (deepmetric.checkpoints)
    RUN_DIR/preprocess.json   how images became inputs (training, for image data)
    RUN_DIR/threshold.json    the verification threshold and how it was chosen
    RUN_DIR/log.jsonl         one JSON record per logged step, epoch and the summary
    RUN_DIR/eval/             what ``deepmetric evaluate`` writes

:class:`Run` names them, reads the config through the hardened loader, loads the embedding
network (no classifier head; its input shape from ``preprocess.json``), and reads and writes
the threshold record (:class:`Threshold`) and the preprocessing. :class:`ModelIdentity` is what
makes two models interchangeable. Nothing here trains, evaluates or embeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from deepmetric.checkpoints import (
    CHECKPOINTS_DIR,
    holds_checkpoints,
    load_checkpoint,
    load_latest,
    load_model_state,
)
from deepmetric.components import check_components
from deepmetric.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    read_yaml_file,
)
from deepmetric.data import Preprocessing
from deepmetric.data.training_data import load_data
from deepmetric.distances import check_metric
from deepmetric.files import write_json_atomically
from deepmetric.models import (
    BACKBONES,
    EmbeddingNet,
    build_registered,
    embedding_state,
    first_layer_keys,
)

CONFIG_FILE = "config.yaml"
PREPROCESS_FILE = "preprocess.json"
THRESHOLD_FILE = "threshold.json"
LOG_FILE = "log.jsonl"
EVAL_DIR = "eval"

#: The protocol of a threshold chosen on the run's validation split at best accuracy.
VALIDATION_PROTOCOL = "threshold chosen on the run's validation split, not on these pairs"


def far_protocol(far: float) -> str:
    """The protocol of a threshold chosen on the validation split at a false accept rate."""
    return (
        f"threshold chosen on the run's validation split at a false accept rate <= {far:g} "
        "on its pairs (the largest such threshold), not on these pairs"
    )


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Threshold:
    """A verification threshold and where it came from.

    ``value``: the distance threshold (accept ``d <= value``); ``metric``: the distance it is
    in; ``protocol``: how it was chosen; ``far``: the false accept rate target (``None``: the
    accuracy-maximising threshold); ``validation_items``: items it was chosen on;
    ``weights_sha256``: the weights it was chosen for (``None`` when unknown: files written
    before the record carried it).
    """

    value: float
    metric: str
    protocol: str
    far: float | None = None
    validation_items: int | None = None
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        value = self.value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"threshold must be >= 0 (a distance), got {value!r}")
        check_metric(self.metric)
        if self.far is not None and not 0.0 <= self.far <= 1.0:
            raise ValueError(f"far must be in [0, 1], got {self.far!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``threshold.json`` record (``value`` is stored as ``threshold``)."""
        record = asdict(self)
        return {"threshold": record.pop("value"), **record}

    @classmethod
    def from_json(cls, record: Any, source: str = "threshold record") -> Threshold:
        """Read a ``threshold.json`` record; ``ValueError`` naming ``source`` when invalid."""
        if not isinstance(record, dict) or "threshold" not in record or "metric" not in record:
            raise ValueError(f"{source}: not a threshold record (needs threshold and metric)")
        try:
            return cls(
                value=record["threshold"],
                metric=record["metric"],
                protocol=str(record.get("protocol", "unknown")),
                far=record.get("far"),
                validation_items=record.get("validation_items"),
                weights_sha256=record.get("weights_sha256"),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


def read_threshold(path: str | os.PathLike[str]) -> Threshold | None:
    """The record in the file ``path``; ``None`` when there is no such file; a damaged one is
    a ``ValueError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return Threshold.from_json(record, str(path))


def write_threshold(path: str | os.PathLike[str], threshold: Threshold) -> None:
    """The one writer of a threshold record: atomically (temporary file, then rename)."""
    write_json_atomically(path, threshold.to_json())


class ModelIdentity(NamedTuple):
    """What makes two models interchangeable: the same weights (``weights_sha256``, see
    :func:`deepmetric.checkpoints.weights_sha256`), the same preprocessing (its dict, or
    ``None`` for tensors in), embedding size ``dim`` and ``metric``."""

    weights_sha256: str
    preprocessing: dict[str, Any] | None
    dim: int
    metric: str

    def to_dict(self) -> dict[str, Any]:
        """The identity as the plain dict galleries, exports and the service record."""
        return self._asdict()


# ----------------------------------------------------------------------------- networks


def embedding_network(config: Config, sample: torch.Tensor) -> EmbeddingNet:
    """A new embedding network of the config's architecture (``model.*``), sized for inputs
    like ``sample`` (N, C, H, W) for images or (N, F) for a vector backbone (``mlp``); random
    weights, no classifier head. ``ConfigError`` when the backbone cannot take the data."""
    name, m = config.model.backbone, config.model
    if name not in BACKBONES:
        raise ConfigError(
            f"model.backbone={name} is not registered (registered: {', '.join(BACKBONES)}): "
            "import the module that registers it (--import MODULE)"
        )
    entry = BACKBONES[name]
    options = {key: getattr(m, key) for key in entry.options}  # its model.* options
    if entry.input_ndim == 2:  # vectors: each item flattened
        if m.mirror is True:
            raise ConfigError(
                f"model.mirror=true averages images with their mirror images: not {name}"
            )
        features = 1
        for size in sample.shape[1:]:
            features *= int(size)
        backbone = entry.build(features, **options)
    else:
        if sample.dim() != 4:
            raise ConfigError(
                f"model.backbone={name} needs images (N, C, H, W); the data is "
                f"{tuple(sample.shape)}: use model.backbone=mlp"
            )
        backbone = entry.build(sample.shape[1], **options)
    return EmbeddingNet(
        backbone,
        dim=m.dim,
        normalize=m.normalize,
        mirror=mirror_of(config),
        projection_head=m.projection_head,
        conv_readout=m.conv_readout,
    )


def mirror_of(config: Config) -> bool:
    """``model.mirror``, or when it is null, whether training flips images (``train.augment``
    with an image backbone)."""
    m = config.model
    if m.mirror is None:
        entry = BACKBONES.get(m.backbone)
        return config.train.augment and (entry is None or entry.input_ndim == 4)
    return m.mirror


#: the first layer of each registered backbone (its entry's ``first_layer``), whose weight
#: says the input's channels / features (for runs older than ``preprocess.json``: a
#: checkpoint's keys come sorted by name); a live view of :data:`deepmetric.models.BACKBONES`
FIRST_LAYER: Mapping[str, str] = first_layer_keys()


class LoadedNetwork(NamedTuple):
    """The embedding network of a run (eval mode, on the CPU) and where its weights came
    from: ``checkpoint`` (the folder), ``latest`` (it is the checkpoint ``latest`` names and it
    loaded), ``fallback`` (why the weights are not the latest's: it is damaged; else None)."""

    net: nn.Module
    checkpoint: Path
    latest: bool
    fallback: str | None


# ----------------------------------------------------------------------------- the run


class Run:
    """The run folder ``path`` with its resolved ``config``.

    ``Run.open(path)`` reads an existing run; ``Run.create(config)`` makes the folder of a new
    one and writes its config. The constructor only holds the two.

    Example::

        run = Run.open("runs/fashion_mnist")
        net = run.network().net           # the embedding network, no classifier head
        run.threshold()                   # Threshold | None
    """

    def __init__(self, path: str | os.PathLike[str], config: Config) -> None:
        self.path = Path(path)
        self.config = config

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], overrides: list[str] | None = None) -> Run:
        """The run in ``path``: its ``config.yaml`` through the hardened loader (a missing or
        damaged file is a one-line ``ConfigError``). ``overrides``: only ``epochs=N`` (train
        longer on resume)."""
        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError(f"{path} is not a run folder: {config_path} is missing")
        values = read_yaml_file(config_path, "run config")
        if not isinstance(values, dict):
            raise ConfigError(
                f"run config {config_path}: expected a mapping, got {type(values).__name__}"
            )
        values["out"] = str(path)
        if isinstance(values.get("model"), dict):  # runs made before model.mirror: without
            values["model"].setdefault("mirror", False)
        try:
            config = config_from_dict(values)
            check_components(config)
        except ConfigError as error:
            raise ConfigError(f"run config {config_path}: {error}") from None
        for text in overrides or []:
            config = _override(config, text)
        return cls(path, config)

    @classmethod
    def create(cls, config: Config, path: str | os.PathLike[str] | None = None) -> Run:
        """The folder ``path`` (default ``config.run_dir``; made when missing) with
        ``config.yaml`` written."""
        run = cls(config.run_dir if path is None else path, config)
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config()
        return run

    # ------------------------------------------------------------------ files

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def preprocess_path(self) -> Path:
        return self.path / PREPROCESS_FILE

    @property
    def threshold_path(self) -> Path:
        return self.path / THRESHOLD_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def from_fit(self) -> bool:
        """Whether ``fit()`` trained it on Python objects (no data spec to reload)."""
        return self.config.from_fit

    def holds_checkpoints(self) -> bool:
        return holds_checkpoints(self.path)

    def write_config(self) -> None:
        """``config.yaml``: the resolved config."""
        dump_config(self.config, self.config_path)

    # ------------------------------------------------------------------ preprocessing

    def preprocessing(self) -> Preprocessing | None:
        """``preprocess.json`` (``None`` when the run has none: vector data, a ``fit()`` run,
        or a run older than the file); a damaged file is a ``ValueError`` naming it."""
        path = self.preprocess_path
        if not path.is_file():
            return None
        try:
            return Preprocessing.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def inference_preprocessing(self) -> Preprocessing | None:
        """The preprocessing inference applies: ``preprocess.json``; for runs older than it,
        derived from the training data (its (C, H, W), scaled by 1/255); ``None`` for a
        ``fit()`` run without one. ``ValueError`` when it can be neither read nor derived."""
        recorded = self.preprocessing()
        if recorded is not None or self.from_fit:
            return recorded
        try:
            train_set, _ = load_data(self.config)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.path} has no {PREPROCESS_FILE} and its training data cannot be read "
                f"to derive it ({error}): pass preprocessing= (deepmetric.data.Preprocessing)"
            ) from None
        return Preprocessing.from_images(train_set.data)

    def write_preprocessing(self, preprocessing: Preprocessing) -> None:
        """``preprocess.json``, atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.preprocess_path, preprocessing.to_dict())

    # ------------------------------------------------------------------ threshold

    def threshold(self) -> Threshold | None:
        """The saved threshold record (``None``: none saved)."""
        return read_threshold(self.threshold_path)

    def write_threshold(self, threshold: Threshold) -> Path:
        """Save ``threshold`` as the run's record (for its latest weights); returns the
        path."""
        write_threshold(self.threshold_path, threshold)
        return self.threshold_path

    # ------------------------------------------------------------------ networks

    def network(self, checkpoint: str = "latest") -> LoadedNetwork:
        """The embedding network with the weights of ``checkpoint`` (``latest``, or a name in
        ``checkpoints/``), eval mode, on the CPU; no classifier head. A damaged latest
        checkpoint falls back to the previous one with a one-line warning
        (:func:`~deepmetric.checkpoints.load_latest`). A ``fit()`` run with a registered
        builder is rebuilt with it (the module registering it must be imported)."""
        folder, state, _, fallback = load_latest(self.path)
        latest = checkpoint in ("latest", folder.name)
        if not latest:
            folder = self.checkpoints_dir / checkpoint
            if "/" in checkpoint or checkpoint.startswith(".") or not folder.is_dir():
                raise ValueError(
                    f"{self.path}: no checkpoint named {checkpoint!r} in {folder.parent}"
                )
            state, _ = load_checkpoint(folder)
        state = embedding_state(state)
        net = self._new_network(self._sample_input(state))
        load_model_state(net, state, source=folder)
        net.eval()
        return LoadedNetwork(net, folder, latest and fallback is None, fallback)

    def untrained_network(self, sample: torch.Tensor) -> nn.Module:
        """The embedding network with random weights drawn after ``torch.manual_seed(
        config.seed)`` as ``train`` draws them: for a run of ``deepmetric train`` these are its
        initial weights (joint mode builds the embedding network before its head). The
        baseline that says what training added to the architecture. Eval mode, on the CPU;
        the global RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            net = self._new_network(sample)
        return net.eval()

    def _new_network(self, sample: torch.Tensor) -> nn.Module:
        """A new embedding network of the run's architecture: its registered builder, else the
        config's backbone sized for inputs like ``sample``."""
        config = self.config
        if config.model.builder is not None:
            return build_registered(config.model.builder, **config.model.builder_args)
        if self.from_fit:
            raise ConfigError(
                f"{self.path} was trained by fit() with a model of its own and no builder: "
                "pass builder= (a function registered with deepmetric.models.register_model) "
                "to fit"
            )
        return embedding_network(replace(config, mode="batch"), sample)

    def _sample_input(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """A dummy input of the shape the network takes: from ``preprocess.json``; for runs
        older than it, read from the saved backbone's first layer (28 x 28 images: the
        built-in backbones pool globally, so any size builds the same weights). Empty for a
        network a builder makes (it needs none)."""
        if self.config.model.builder is not None or self.from_fit:
            return torch.zeros(0)
        pre = self.preprocessing()
        if pre is not None:
            return torch.zeros(1, *pre.shape)
        backbone = self.config.model.backbone
        entry = BACKBONES.get(backbone)
        if entry is None:
            raise ConfigError(
                f"model.backbone={backbone} is not registered (registered: "
                f"{', '.join(BACKBONES)}): import the module that registers it (--import MODULE)"
            )
        first = next((v for k, v in state.items() if k.endswith(entry.first_layer)), None)
        if first is None:
            raise ConfigError(
                f"the checkpoint has no {entry.first_layer}: not a model.backbone={backbone} "
                "network"
            )
        if entry.input_ndim == 2:  # vectors
            return torch.zeros(1, first.shape[1])
        return torch.zeros(1, first.shape[1], 28, 28)


def _override(config: Config, text: str) -> Config:
    """``config`` with ``epochs=N`` applied: the only key that may change on resume."""
    key, _, value = text.partition("=")
    if key != "epochs":
        raise ConfigError(f"only epochs=N can change on resume, got {key!r}")
    try:
        epochs = int(value)
    except ValueError:
        raise ConfigError(f"epochs must be an integer, got {value!r}") from None
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    config.epochs = epochs
    return config


__all__ = [
    "CONFIG_FILE",
    "EVAL_DIR",
    "FIRST_LAYER",
    "LOG_FILE",
    "PREPROCESS_FILE",
    "THRESHOLD_FILE",
    "VALIDATION_PROTOCOL",
    "LoadedNetwork",
    "ModelIdentity",
    "Run",
    "Threshold",
    "embedding_network",
    "far_protocol",
    "mirror_of",
    "read_threshold",
    "write_threshold",
]

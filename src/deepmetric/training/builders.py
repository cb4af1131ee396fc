"""From a config to the objects the loop takes: device, data, model, loss, mode, optimiser.

``fit`` takes these objects from the user directly; ``train(config)`` builds them here. The
training mode (:mod:`deepmetric.training.modes`) is built here for both, from the config's
``mode`` and ``train`` options.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, TextIO

import numpy as np
import torch
from torch import nn

from deepmetric.config import Config, ConfigError
from deepmetric.data import ArrayDataset, class_split, load_dataset, train_val_split
from deepmetric.data.datasets import draw_val_classes
from deepmetric.losses import (
    ContrastiveLoss,
    CrossBatchMemory,
    LiftedStructuredLoss,
    MarginSoftmaxLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    TripletLoss,
    triplet_margin_loss,
)
from deepmetric.models import EmbeddingNet, JointNet, build_backbone
from deepmetric.training.modes import (
    JointMode,
    Mode,
    OfflineMode,
    PKMode,
    SiameseMode,
    TripletMode,
)
from deepmetric.training.schedule import LRPlan


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available (the current GPU), else CPU; otherwise the named device
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked: a name that is no device, CUDA on a
    machine without it, or a GPU index this machine does not have is a one-line
    ``ConfigError`` (nothing is allocated here)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {str(name)!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU"
            raise ConfigError(f"device {str(name)!r}: CUDA is not available here ({why})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {str(name)!r}: this machine has {count} GPU{'s' * (count != 1)} "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(name)!r}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"device {str(name)!r}: not available here")
    return device


def load_options(config: Config) -> dict[str, object]:
    """Loader options of the config's data spec (folders: the image size)."""
    if config.data.startswith("folder:"):
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


def load_data(config: Config) -> tuple[ArrayDataset, ArrayDataset]:
    """The training set and its validation split (:func:`load_training_data`)."""
    data = load_training_data(config)
    return data.train, data.val


def mirror_of(config: Config) -> bool:
    """``model.mirror``, or when it is null, whether training flips images (``train.augment``
    with an image backbone)."""
    m = config.model
    if m.mirror is None:
        return config.train.augment and m.backbone != "mlp"
    return m.mirror


def build_model(config: Config, sample: torch.Tensor, num_classes: int) -> nn.Module:
    """``EmbeddingNet`` (or ``JointNet`` in joint mode) sized for inputs like ``sample``."""
    name, m = config.model.backbone, config.model
    if name == "mlp":
        if m.mirror is True:
            raise ConfigError("model.mirror=true averages images with their mirror images: not mlp")
        backbone = build_backbone(name, in_features=int(np.prod(sample.shape[1:])))
    else:
        if sample.dim() != 4:
            raise ConfigError(
                f"model.backbone={name} needs images (N, C, H, W); the data is "
                f"{tuple(sample.shape)}: use model.backbone=mlp"
            )
        extra = {"batch_norm": m.batch_norm, "padding": m.padding} if name == "small_cnn" else {}
        backbone = build_backbone(name, in_channels=sample.shape[1], **extra)
    net = EmbeddingNet(
        backbone,
        dim=m.dim,
        normalize=m.normalize,
        mirror=mirror_of(config),
        projection_head=m.projection_head,
        conv_readout=m.conv_readout,
    )
    return JointNet(net, num_classes) if config.mode == "joint" else net


def build_loss(config: Config, classes: Sequence[int] = ()) -> Callable[..., torch.Tensor]:
    """The loss of the config's mode: a batch loss ``(embeddings, labels)`` for ``batch`` and
    ``joint``, a pair loss ``(e1, e2, same)`` for ``siamese``, a triplet loss
    ``(ea, ep, en)`` for ``triplet`` and ``offline``. ``classes``: the training label values
    (the proxy losses keep one learnable vector per class; items of other classes, such as a
    class-disjoint validation batch, are left out of their loss)."""
    c = config.loss
    if config.mode == "siamese" and c.name != "contrastive":
        raise ConfigError("mode=siamese trains on pairs: set loss.name=contrastive")
    if config.mode in ("triplet", "offline"):
        if c.name != "triplet":
            raise ConfigError(f"mode={config.mode} trains on triplets: set loss.name=triplet")
        return functools.partial(triplet_margin_loss, margin=c.margin, metric=c.metric, soft=c.soft)
    loss: nn.Module
    if c.name == "triplet":
        loss = TripletLoss(margin=c.margin, mining=c.mining, metric=c.metric, soft=c.soft)
    elif c.name == "multi_similarity":
        loss = MultiSimilarityLoss()
    elif c.name == "proxy_anchor":
        loss = ProxyAnchorLoss(classes=list(classes), dim=config.model.dim, ignore_unknown=True)
    elif c.name in ("arcface", "cosface"):
        loss = MarginSoftmaxLoss(
            classes=list(classes),
            dim=config.model.dim,
            kind=c.name,  # type: ignore[arg-type]
            scale=c.scale,
            margin=c.margin,
            ignore_unknown=True,
        )
    elif c.name == "contrastive":
        loss = ContrastiveLoss(margin=c.margin, metric=c.metric)
    else:
        loss = LiftedStructuredLoss(margin=c.margin, metric=c.metric)
    if c.memory:
        return CrossBatchMemory(loss, size=c.memory, start=c.memory_start)
    return loss


def adapt_p(config: Config, labels: torch.Tensor, stream: TextIO | None = sys.stderr) -> int:
    """P = min(train.p, classes present), saying so once when it is smaller; a P x K batch
    needs at least 2 classes."""
    present = len(torch.unique(labels))
    if present < 2:
        raise ConfigError(
            f"the training data has {present} class(es): metric learning needs at least 2"
        )
    if config.train.p > present:
        if stream is not None:
            print(
                f"note: train.p={config.train.p} but the training data has {present} classes: "
                f"using P={present} classes per batch",
                file=stream,
            )
        return present
    return config.train.p


def build_mode(
    config: Config,
    labels: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    fetch: Callable[[torch.Tensor], torch.Tensor],
    embed_net: nn.Module,
    device: torch.device,
    stream: TextIO | None = sys.stderr,
) -> Mode:
    """The training mode of ``config.mode`` over a training set with these ``labels``."""
    t = config.train
    if config.mode in ("batch", "joint"):
        p = adapt_p(config, labels, stream)
        c = config.loss
        views = (
            (NTXentLoss(temperature=c.temperature), c.ntxent_weight) if c.ntxent_weight else None
        )
        if config.mode == "batch":
            return PKMode(labels, loss_fn, p=p, k=t.k, seed=config.seed, views=views)  # type: ignore[arg-type]
        return JointMode(
            labels,
            loss_fn,  # type: ignore[arg-type]
            p=p,
            k=t.k,
            seed=config.seed,
            classes=torch.unique(labels),
            weight=config.loss.softmax_weight,
            label_smoothing=t.label_smoothing,
            views=views,
        )
    if config.mode == "siamese":
        return SiameseMode(labels, loss_fn, batch_size=t.batch_size, seed=config.seed)
    if config.mode == "triplet":
        return TripletMode(labels, loss_fn, batch_size=t.batch_size, seed=config.seed)
    return OfflineMode(
        labels,
        loss_fn,
        batch_size=t.batch_size,
        seed=config.seed,
        fetch=fetch,
        embed_net=embed_net,
        device=device,
        metric=config.loss.metric,
        every=t.offline_every,
        mine_p=t.offline_p,
        mine_k=t.offline_k,
    )


def build_optimizer(config: Config, model: nn.Module, loss: object = None) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer`` over the model's parameters and the loss's own
    (the proxies of a proxy-based loss), when it has any."""
    t = config.train
    params: list[dict[str, object]] = [
        {"params": [p for p in model.parameters() if p.requires_grad]}
    ]
    own = [p for p in loss.parameters() if p.requires_grad] if isinstance(loss, nn.Module) else []
    if own:  # proxies / class vectors, at their own rate
        params.append({"params": own, "lr": t.lr * config.loss.proxy_lr_factor})
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def build_plan(config: Config, steps_per_epoch: int) -> LRPlan:
    t = config.train
    return LRPlan(
        schedule=t.schedule,
        total=max(1, config.epochs * steps_per_epoch),
        per_epoch=steps_per_epoch,
        step_size=t.step_size,
        gamma=t.gamma,
        warmup=round(t.warmup_epochs * steps_per_epoch),
    )


def embedding_part(model: nn.Module) -> nn.Module:
    """The part of ``model`` that maps inputs to embeddings (a joint net without its head)."""
    return model.embedding_net if isinstance(model, JointNet) else model


__all__ = [
    "adapt_p",
    "build_loss",
    "build_mode",
    "build_model",
    "build_optimizer",
    "build_plan",
    "embedding_part",
    "load_data",
    "load_options",
    "resolve_device",
]

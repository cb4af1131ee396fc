"""From a config to the objects the loop takes: device, data, model, loss, mode, optimiser.

``fit`` takes these objects from the user directly; ``train(config)`` builds them here. The
training mode (:mod:`deepmetric.training.modes`) is built here for both, from the config's
``mode`` and ``train`` options.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

import torch
from torch import nn

from deepmetric.config import Config, ConfigError, tuple_kind
from deepmetric.data.training_data import (
    TrainingData,
    load_data,
    load_options,
    load_training_data,
    resolve_val_classes,
)
from deepmetric.devices import resolve_device
from deepmetric.losses import LOSSES, CrossBatchMemory, NTXentLoss, triplet_margin_loss
from deepmetric.models import JointNet, embedding_part
from deepmetric.runs import embedding_network
from deepmetric.training.modes import (
    JointMode,
    Mode,
    OfflineMode,
    PairTuplesMode,
    PKMode,
    SiameseMode,
    TripletMode,
    TripletTuplesMode,
)
from deepmetric.training.schedule import LRPlan


def build_model(config: Config, sample: torch.Tensor, num_classes: int) -> nn.Module:
    """The embedding network of the config (:func:`~deepmetric.runs.embedding_network`)
    sized for inputs like ``sample``; in joint mode a ``JointNet`` with its classifier head."""
    net = embedding_network(config, sample)
    return JointNet(net, num_classes) if config.mode == "joint" else net


def build_loss(config: Config, classes: Sequence[int] = ()) -> Callable[..., torch.Tensor]:
    """The loss of the config's mode: a batch loss ``(embeddings, labels)`` for ``batch`` and
    ``joint``, a pair loss ``(e1, e2, same)`` for ``siamese``, a triplet loss
    ``(ea, ep, en)`` for ``triplet`` and ``offline``. ``classes``: the training label values
    (the proxy losses keep one learnable vector per class; items of other classes, such as a
    class-disjoint validation batch, are left out of their loss). The batch loss is the
    ``loss.name`` entry of :data:`deepmetric.losses.LOSSES`, built from its options."""
    c = config.loss
    if config.mode == "siamese" and c.name != "contrastive":
        raise ConfigError("mode=siamese trains on pairs: set loss.name=contrastive")
    if config.mode in ("triplet", "offline"):
        if c.name != "triplet":
            raise ConfigError(f"mode={config.mode} trains on triplets: set loss.name=triplet")
        return functools.partial(triplet_margin_loss, margin=c.margin, metric=c.metric, soft=c.soft)
    entry = LOSSES.get(c.name)
    if entry is None:
        raise ConfigError(
            f"loss.name={c.name} is not registered (registered: {', '.join(LOSSES)}): import "
            "the module that registers it (--import MODULE)"
        )
    options = {key: getattr(c, key) for key in entry.options}
    loss = entry.build(options, list(classes), config.model.dim)
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


class ModeParts(NamedTuple):
    """What a mode may need besides the config, the labels and the loss: the training
    source's ``fetch`` (offline mining embeds items), the embedding network and its device,
    and where notes go."""

    fetch: Callable[[torch.Tensor], torch.Tensor]
    embed_net: nn.Module
    device: torch.device
    stream: TextIO | None


def _views(config: Config) -> tuple[NTXentLoss, float] | None:
    """The NT-Xent term between two views of every image (``loss.ntxent_weight``), or None."""
    c = config.loss
    return (NTXentLoss(temperature=c.temperature), c.ntxent_weight) if c.ntxent_weight else None


def _batch_mode(config: Config, labels: torch.Tensor, loss_fn: Any, parts: ModeParts) -> Mode:
    p = adapt_p(config, labels, parts.stream)
    return PKMode(labels, loss_fn, p=p, k=config.train.k, seed=config.seed, views=_views(config))


def _joint_mode(config: Config, labels: torch.Tensor, loss_fn: Any, parts: ModeParts) -> Mode:
    t = config.train
    return JointMode(
        labels,
        loss_fn,
        p=adapt_p(config, labels, parts.stream),
        k=t.k,
        seed=config.seed,
        classes=torch.unique(labels),
        weight=config.loss.softmax_weight,
        label_smoothing=t.label_smoothing,
        views=_views(config),
    )


def _siamese_mode(config: Config, labels: torch.Tensor, loss_fn: Any, parts: ModeParts) -> Mode:
    t = config.train
    if tuple_kind(config.data) == "pairs":  # the file's pairs: 2 items each (TupleSource)
        return PairTuplesMode(len(labels) // 2, loss_fn, batch_size=t.batch_size, seed=config.seed)
    return SiameseMode(labels, loss_fn, batch_size=t.batch_size, seed=config.seed)


def _triplet_mode(config: Config, labels: torch.Tensor, loss_fn: Any, parts: ModeParts) -> Mode:
    t = config.train
    if tuple_kind(config.data) == "triplets":  # the file's triplets: 3 items each
        return TripletTuplesMode(
            len(labels) // 3, loss_fn, batch_size=t.batch_size, seed=config.seed
        )
    return TripletMode(labels, loss_fn, batch_size=t.batch_size, seed=config.seed)


def _offline_mode(config: Config, labels: torch.Tensor, loss_fn: Any, parts: ModeParts) -> Mode:
    t = config.train
    return OfflineMode(
        labels,
        loss_fn,
        batch_size=t.batch_size,
        seed=config.seed,
        fetch=parts.fetch,
        embed_net=parts.embed_net,
        device=parts.device,
        metric=config.loss.metric,
        every=t.offline_every,
        mine_p=t.offline_p,
        mine_k=t.offline_k,
    )


class ModeEntry(NamedTuple):
    """A training mode by name: ``build(config, labels, loss_fn, parts)`` and the ``train.*``
    options it reads (besides ``seed``)."""

    build: Callable[[Config, torch.Tensor, Any, ModeParts], Mode]
    options: tuple[str, ...]


#: The training modes by ``mode`` name (``config.mode``).
MODES: dict[str, ModeEntry] = {
    "batch": ModeEntry(_batch_mode, ("p", "k")),
    "joint": ModeEntry(_joint_mode, ("p", "k", "label_smoothing")),
    "siamese": ModeEntry(_siamese_mode, ("batch_size",)),
    "triplet": ModeEntry(_triplet_mode, ("batch_size",)),
    "offline": ModeEntry(_offline_mode, ("batch_size", "offline_every", "offline_p", "offline_k")),
}


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
    """The training mode of ``config.mode`` (its :data:`MODES` entry) over a training set with
    these ``labels``."""
    entry = MODES.get(config.mode)
    if entry is None:
        raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {config.mode!r}")
    return entry.build(config, labels, loss_fn, ModeParts(fetch, embed_net, device, stream))


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


__all__ = [
    "MODES",
    "ModeEntry",
    "ModeParts",
    "TrainingData",
    "adapt_p",
    "build_loss",
    "build_mode",
    "build_model",
    "build_optimizer",
    "build_plan",
    "embedding_part",
    "load_data",
    "load_options",
    "load_training_data",
    "resolve_device",
    "resolve_val_classes",
]

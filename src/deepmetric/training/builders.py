"""From a config to the objects the loop takes: device, data, model, loss, mode, optimiser.

``fit`` takes these objects from the user directly; ``train(config)`` builds them here. The
training mode (:mod:`deepmetric.training.modes`) is built here for both, from the config's
``mode`` and ``train`` options.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import torch
from torch import nn

from deepmetric.config import Config, ConfigError
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
    PKMode,
    SiameseMode,
    TripletMode,
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


__all__ = [
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

"""Training, readable top to bottom: data -> batches -> model -> loss -> optimiser -> checkpoints.

``train(config)`` runs one experiment into ``config.run_dir``:

- ``config.yaml``: the resolved config;
- ``log.jsonl``: one JSON object per logged step (``"kind": "step"``) and per epoch
  (``"kind": "epoch"``);
- ``checkpoints/``: one after every epoch and on Ctrl-C (see :mod:`deepmetric.checkpoints`);
- TensorBoard event files in ``tensorboard/`` when tensorboard is installed.

Modes (``config.mode``): ``batch`` (P x K batches, online mining with the configured loss),
``joint`` (the same plus cross-entropy on a classifier head), ``siamese`` (balanced pairs,
contrastive loss), ``triplet`` (random explicit triplets through a three-branch network),
``offline`` (FaceNet-style: every N steps embed P x K samples, mine semi-hard triplets, train on
them).

Resuming (``train(config, resume=True)``) restores weights, optimiser, scheduler, the sampler's
position and the RNG, so a CPU run interrupted at any step ends with the same weights as an
uninterrupted one (in ``offline`` mode, at any epoch boundary).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from deepmetric import mining
from deepmetric.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from deepmetric.config import Config, ConfigError, config_from_dict, config_to_yaml, dump_config
from deepmetric.data import (
    ArrayDataset,
    PairSampler,
    PKSampler,
    class_split,
    load_dataset,
    random_triplets,
    train_val_split,
)
from deepmetric.distances import pairwise
from deepmetric.losses import (
    ContrastiveLoss,
    LiftedStructuredLoss,
    TripletLoss,
    triplet_margin_loss,
)
from deepmetric.models import EmbeddingNet, JointNet, SiameseNet, TripletNet, build_backbone
from deepmetric.neighbors import nearest_other

# ----------------------------------------------------------------------------- building blocks


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}, but CUDA is not available here")
    return device


def _load_options(config: Config) -> dict[str, Any]:
    if config.data.startswith("folder:"):
        return {"size": (config.image_size, config.image_size)}
    return {}


def load_data(config: Config) -> tuple[ArrayDataset, ArrayDataset]:
    """The training set (restricted to ``train.classes`` if set) and its validation split."""
    data = load_dataset(config.data, "train", **_load_options(config))
    if config.train.classes is not None:
        data, _ = class_split(data, config.train.classes)
    if len(data) == 0:
        raise ConfigError(f"no training samples in {config.data} (train.classes filter?)")
    if config.train.val_fraction == 0:
        return data, data.subset(np.zeros(0, dtype=np.int64))
    return train_val_split(data, config.train.val_fraction, seed=config.seed)


def build_model(config: Config, sample: torch.Tensor, num_classes: int) -> nn.Module:
    """``EmbeddingNet`` (or ``JointNet`` in joint mode) sized for inputs like ``sample``."""
    name = config.model.backbone
    if name == "mlp":
        backbone = build_backbone(name, in_features=int(np.prod(sample.shape[1:])))
    else:
        if sample.dim() != 4:
            raise ConfigError(
                f"model.backbone={name} needs images (N, C, H, W); the data is "
                f"{tuple(sample.shape)}: use model.backbone=mlp"
            )
        extra = {"batch_norm": config.model.batch_norm} if name == "small_cnn" else {}
        backbone = build_backbone(name, in_channels=sample.shape[1], **extra)
    net = EmbeddingNet(backbone, dim=config.model.dim, normalize=config.model.normalize)
    return JointNet(net, num_classes) if config.mode == "joint" else net


def build_loss(config: Config) -> nn.Module:
    """The metric loss of ``batch``, ``joint`` and ``siamese`` modes."""
    c = config.loss
    if config.mode == "siamese" and c.name != "contrastive":
        raise ConfigError("mode=siamese trains on pairs: set loss.name=contrastive")
    if config.mode in ("triplet", "offline") and c.name != "triplet":
        raise ConfigError(f"mode={config.mode} trains on triplets: set loss.name=triplet")
    if c.name == "triplet":
        return TripletLoss(margin=c.margin, mining=c.mining, metric=c.metric, soft=c.soft)
    if c.name == "contrastive":
        return ContrastiveLoss(margin=c.margin, metric=c.metric)
    return LiftedStructuredLoss(margin=c.margin, metric=c.metric)


def build_optimizer(
    config: Config, model: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    t = config.train
    if t.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=t.lr, weight_decay=t.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    total = max(1, config.epochs * steps_per_epoch)
    if t.schedule == "cosine":  # stepped every batch
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=total
        )
    elif t.schedule == "step":  # decays every step_size epochs, stepped every batch
        sched = torch.optim.lr_scheduler.StepLR(
            opt, step_size=t.step_size * steps_per_epoch, gamma=t.gamma
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


# ----------------------------------------------------------------------------- batches


def _epoch_seed(config: Config, epoch: int) -> int:
    return config.seed * 1_000_003 + epoch


def steps_per_epoch(config: Config, train: ArrayDataset) -> int:
    if config.mode in ("batch", "joint"):
        return len(PKSampler(train.y, config.train.p, config.train.k, seed=config.seed))
    return max(1, math.ceil(len(train) / config.train.batch_size))


def batches(config: Config, train: ArrayDataset, epoch: int) -> Iterator[torch.Tensor]:
    """The index batches of one epoch, a pure function of (config, data, epoch).

    ``batch`` / ``joint``: (P*K,) indices. ``siamese``: (2B,) indices, first halves paired with
    second halves. ``triplet``: (3B,) indices, anchors, positives, negatives.
    """
    t = config.train
    if config.mode in ("batch", "joint"):
        sampler: PKSampler | PairSampler = PKSampler(train.y, t.p, t.k, seed=config.seed)
    elif config.mode == "siamese":
        sampler = PairSampler(train.y, t.batch_size, seed=config.seed)
    else:
        a, p, n = random_triplets(train.y, len(train), seed=_epoch_seed(config, epoch))
        for start in range(0, len(a), t.batch_size):
            sl = slice(start, start + t.batch_size)
            yield torch.cat([a[sl], p[sl], n[sl]])
        return
    sampler.set_epoch(epoch)
    for idx in sampler:
        yield torch.as_tensor(idx)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips (p = 1/2) and shifts of up to ``max_shift`` pixels each way,
    zero-filled; (B, C, H, W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


@torch.no_grad()
def mine_offline(
    config: Config,
    net: nn.Module,
    train: ArrayDataset,
    device: torch.device,
    rng: np.random.Generator,
) -> torch.Tensor:
    """FaceNet-style offline mining: embed ``offline_p`` classes x ``offline_k`` samples with the
    current network and select the semi-hard triplet of every positive pair. Returns (T, 3)
    indices into ``train``, shuffled."""
    t = config.train
    labels = train.y.numpy()
    classes = np.unique(labels)
    chosen = rng.choice(classes, size=min(t.offline_p, len(classes)), replace=False)
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[: t.offline_k] for c in chosen]
    )
    emb = embed(net, train.x[idx], device)
    triplets = mining.semi_hard(pairwise(emb, metric=config.loss.metric), train.y[idx])
    found = torch.stack(list(triplets), dim=1)
    found = torch.as_tensor(idx)[found]
    return found[torch.as_tensor(rng.permutation(len(found)))]


# ----------------------------------------------------------------------------- one step


@dataclass
class StepStats:
    loss: float
    active: float = float("nan")  # share of valid triplets with a positive hinge
    mean_dist: float = float("nan")


def _check_finite(*embeddings: torch.Tensor) -> torch.Tensor:
    """Stop with a clear message when the network's output is no longer finite (divergence)."""
    for e in embeddings:
        if not torch.isfinite(e).all():
            raise FloatingPointError(
                "the network produced NaN or inf embeddings (training diverged): try a lower "
                "train.lr or train.grad_clip; the last checkpoint is kept"
            )
    return embeddings[0]


def step_loss(
    config: Config,
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    class_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss of one batch, the embeddings it used and their labels (None for pairs)."""
    if config.mode in ("batch", "joint"):
        if config.mode == "joint":
            emb, logits = model(x)
            _check_finite(emb)
            ce = F.cross_entropy(logits.float(), class_index[y])
            return loss_fn(emb.float(), y) + config.loss.softmax_weight * ce, emb, y
        emb = _check_finite(model(x))
        return loss_fn(emb.float(), y), emb, y
    if config.mode == "siamese":
        b = len(x) // 2
        e1, e2 = SiameseNet(model)(x[:b], x[b:])
        _check_finite(e1, e2)
        return loss_fn(e1.float(), e2.float(), y[:b] == y[b:]), torch.cat([e1, e2]), None
    b = len(x) // 3
    ea, ep, en = TripletNet(model)(x[:b], x[b : 2 * b], x[2 * b :])
    _check_finite(ea, ep, en)
    loss = triplet_margin_loss(
        ea.float(),
        ep.float(),
        en.float(),
        margin=config.loss.margin,
        metric=config.loss.metric,
        soft=config.loss.soft,
    )
    return loss, torch.cat([ea, ep, en]), None


@torch.no_grad()
def batch_stats(
    config: Config, loss: float, emb: torch.Tensor, y: torch.Tensor | None
) -> StepStats:
    """Diagnostics of a logged step: active-triplet share and mean pairwise distance."""
    emb = emb.detach().float()
    d = pairwise(emb, metric=config.loss.metric)
    n = len(emb)
    stats = StepStats(loss=loss, mean_dist=float(d.sum() / max(1, n * (n - 1))))
    if y is not None:
        cats = mining.triplet_categories(d, y, margin=max(config.loss.margin, 1e-12))
        stats.active = (cats.hard + cats.semi_hard) / cats.total if cats.total else 0.0
    return stats


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed(net: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 1024) -> torch.Tensor:
    """(N, dim) embeddings of ``x`` in eval mode, on the CPU."""
    was_training = net.training
    net.eval()
    out = [net(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(net, "dim", 0))


def precision_at_1(emb: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean") -> float:
    """Share of items whose nearest other item has the same label."""
    return float(nearest_other(emb, labels, metric)[1].float().mean())


# ----------------------------------------------------------------------------- logging


class RunLog:
    """``log.jsonl`` lines, an optional TensorBoard writer and a one-line progress display."""

    def __init__(self, run_dir: Path, stream: TextIO | None) -> None:
        self.file = (run_dir / "log.jsonl").open("a")
        self.stream = stream
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            step = record.get("step", record.get("epoch", 0))
            for key, value in record.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)

    def progress(self, text: str, *, final: bool = False) -> None:
        if self.stream is None:
            return
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------- the loop


@dataclass
class Position:
    """Where training stands: the next batch to run is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimiser steps so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's batch losses so far


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequested(KeyboardInterrupt):
    """Ctrl-C, acted on at a batch boundary, where the state is consistent."""


class _StopAtBatchBoundary:
    """While it exists, Ctrl-C only sets ``requested``; the loop checks it between batches, so a
    checkpoint never catches a half-done step. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise _StopRequested

    def restore(self) -> None:
        """Give Ctrl-C back to the previous handler."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    config: Config, *, resume: bool = False, stream: TextIO | None = sys.stderr
) -> dict[str, Any]:
    """Train ``config`` into ``config.run_dir``; return the final summary (also logged)."""
    run_dir = config.run_dir
    if not resume and (run_dir / "checkpoints").exists():
        raise ConfigError(
            f"{run_dir} already holds a run: resume it (--resume {run_dir}) or set out=ANOTHER_DIR"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    config_yaml = config_to_yaml(config)  # also stored in every checkpoint

    torch.manual_seed(config.seed)
    device = resolve_device(config.train.device)
    use_amp = config.train.amp and device.type == "cuda"
    if config.train.amp and not use_amp:
        warnings.warn("train.amp=true needs CUDA; training in float32 on the CPU", stacklevel=2)

    train_set, val_set = load_data(config)
    classes = torch.unique(train_set.y)
    class_index = torch.full((int(train_set.y.max()) + 1,), -1, dtype=torch.long)
    class_index[classes] = torch.arange(len(classes))
    model = build_model(config, train_set.x[:1], len(classes)).to(device)
    net = model.embedding_net if isinstance(model, JointNet) else model
    loss_fn = build_loss(config)
    per_epoch = steps_per_epoch(config, train_set)
    optimizer, scheduler = build_optimizer(config, model, per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    pos = Position()
    if resume:
        model_state, state = load_checkpoint(latest_checkpoint(run_dir))
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        pos = Position(**state["position"])

    def checkpoint() -> None:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": _rng_state(),
            "position": vars(pos),
        }
        name = f"epoch{pos.epoch:04d}-batch{pos.batch:06d}"
        save_checkpoint(run_dir, name, model.state_dict(), state, config_yaml)

    log = RunLog(run_dir, stream)
    started = time.perf_counter()
    class_index = class_index.to(device)
    stop = _StopAtBatchBoundary()
    try:
        while pos.epoch < config.epochs:
            model.train()
            offline_rng = np.random.default_rng(_epoch_seed(config, pos.epoch))
            source = (
                _offline_batches(config, net, train_set, device, offline_rng, per_epoch)
                if config.mode == "offline"
                else batches(config, train_set, pos.epoch)
            )
            for b, idx in enumerate(source):
                if b < pos.batch:  # resuming inside an epoch: these ran already
                    continue
                stop.check()
                x = train_set.x[idx]
                if config.train.augment and x.dim() == 4:
                    seed = _epoch_seed(config, pos.epoch) * 1_000_003 + b  # stateless: resumable
                    x = augment(x, torch.Generator().manual_seed(seed))
                x = x.to(device, non_blocking=True)
                y = train_set.y[idx].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    loss, emb, emb_labels = step_loss(config, model, loss_fn, x, y, class_index)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"loss is {value} at step {pos.step + 1}: try a lower train.lr or "
                        "train.grad_clip; the last checkpoint is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.train.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                pos.batch, pos.step = b + 1, pos.step + 1
                pos.epoch_losses.append(value)
                if pos.step % config.train.log_every == 0 or b + 1 == per_epoch:
                    stats = batch_stats(config, value, emb, emb_labels)
                    _warn_collapse(config, stats)
                    log.write(
                        {
                            "kind": "step",
                            "step": pos.step,
                            "epoch": pos.epoch,
                            "lr": scheduler.get_last_lr()[0],
                            **vars(stats),
                        }
                    )
                    log.progress(
                        f"epoch {pos.epoch + 1}/{config.epochs} [{b + 1}/{per_epoch}] "
                        f"loss {value:.4f} active {stats.active:.2f} dist {stats.mean_dist:.3f}"
                    )
            record = _epoch_record(config, net, loss_fn, val_set, device, pos, pos.epoch_losses)
            pos.history.append(record)
            log.write(record)
            log.progress(
                f"epoch {pos.epoch + 1}/{config.epochs} loss {record['train_loss']:.4f} "
                f"val loss {record['val_loss']:.4f} val precision@1 "
                f"{record['val_precision_at_1']:.3f}",
                final=True,
            )
            pos.epoch, pos.batch, pos.epoch_losses = pos.epoch + 1, 0, []
            checkpoint()
            stop.check()
    except _StopRequested:
        if config.mode == "offline":  # offline batches depend on the weights: redo the epoch
            pos.batch, pos.epoch_losses = 0, []
        checkpoint()
        log.progress(f"interrupted: checkpoint saved; continue with --resume {run_dir}", final=True)
        log.close()
        raise
    except BaseException:
        log.progress("stopped; the last checkpoint is kept", final=True)
        log.close()
        raise
    finally:
        stop.restore()
    summary = {
        "kind": "summary",
        **test_report(config, net, device),
        "run_dir": str(run_dir),
        "epochs": config.epochs,
        "steps": pos.step,
        "seconds": round(time.perf_counter() - started, 1),
        "train_loss": pos.history[-1]["train_loss"] if pos.history else float("nan"),
        "val_precision_at_1": pos.history[-1]["val_precision_at_1"]
        if pos.history
        else float("nan"),
    }
    log.write(summary)
    log.close()
    return summary


def _offline_batches(
    config: Config,
    net: nn.Module,
    train_set: ArrayDataset,
    device: torch.device,
    rng: np.random.Generator,
    per_epoch: int,
) -> Iterator[torch.Tensor]:
    """Batches of offline-mined triplets, re-mined every ``offline_every`` steps."""
    t = config.train
    done = 0
    while done < per_epoch:
        triplets = mine_offline(config, net, train_set, device, rng)
        if len(triplets) == 0:
            raise ConfigError("offline mining found no triplet: need 2+ classes with 2+ samples")
        for start in range(0, len(triplets), t.batch_size):
            chunk = triplets[start : start + t.batch_size]
            yield torch.cat([chunk[:, 0], chunk[:, 1], chunk[:, 2]])
            done += 1
            if done >= per_epoch or done % t.offline_every == 0:
                break


def test_report(config: Config, net: nn.Module, device: torch.device) -> dict[str, Any]:
    """Precision@1 on the data set's test split (each test item a query against the others);
    with ``train.classes``, also on the test items of the classes never trained on."""
    try:
        test_set = load_dataset(config.data, "test", **_load_options(config))
    except (ValueError, OSError):  # no test split (a plain folder or npz): nothing to report
        return {}
    report: dict[str, Any] = {"test_items": len(test_set)}
    emb = embed(net, test_set.x, device)
    report["test_precision_at_1"] = precision_at_1(emb, test_set.y, config.loss.metric)
    if config.train.classes is not None:
        unseen = ~torch.isin(test_set.y, torch.as_tensor(config.train.classes))
        report["unseen_classes_precision_at_1"] = precision_at_1(
            emb[unseen], test_set.y[unseen], config.loss.metric
        )
    return report


@torch.no_grad()
def _epoch_record(
    config: Config,
    net: nn.Module,
    loss_fn: nn.Module,
    val_set: ArrayDataset,
    device: torch.device,
    pos: Position,
    losses: list[float],
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": pos.epoch + 1,
        "step": pos.step,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "val_loss": float("nan"),
        "val_precision_at_1": float("nan"),
    }
    if len(val_set) >= 2:
        emb = embed(net, val_set.x, device)
        record["val_precision_at_1"] = precision_at_1(emb, val_set.y, config.loss.metric)
        # Every metric loss here also takes a labelled batch: score up to 4096 val items.
        record["val_loss"] = float(loss_fn(emb[:4096], val_set.y[:4096]))
    return record


def _warn_collapse(config: Config, stats: StepStats) -> None:
    """Warn when the embeddings have (nearly) fallen onto one point: the mean pairwise distance
    is below a tenth of the margin (1e-3 without one), so every triplet sits at the margin."""
    if stats.mean_dist < max(1e-3, 0.1 * config.loss.margin):
        warnings.warn(
            f"embeddings have collapsed: mean pairwise distance {stats.mean_dist:.2e}, loss "
            f"{stats.loss:.4f} (margin {config.loss.margin}); try loss.mining=batch_all or "
            "semi_hard, a lower train.lr or a smaller margin",
            RuntimeWarning,
            stacklevel=2,
        )


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config saved in ``run_dir``; ``epochs=N`` may be overridden to train longer."""
    path = Path(run_dir) / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} is not a run folder: {path} is missing") from None
    values["out"] = str(run_dir)
    config = config_from_dict(values)
    for text in overrides or []:
        key = text.partition("=")[0]
        if key != "epochs":
            raise ConfigError(f"only epochs=N can change on resume, got {key!r}")
        config.epochs = int(text.partition("=")[2])
    return config


def load_trained(run_dir: str | Path) -> tuple[Config, EmbeddingNet]:
    """The config and the embedding network (weights of the latest checkpoint) of a run.

    In joint mode the classifier head is dropped: only the embedding is returned.
    """
    run_dir = Path(run_dir)
    config = resume_config(run_dir)
    model_state, _ = load_checkpoint(latest_checkpoint(run_dir))
    prefix = "embedding_net."
    if config.mode == "joint":
        model_state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    sample = _sample_input(config, model_state)
    net = build_model(replace(config, mode="batch"), sample, num_classes=1)
    assert isinstance(net, EmbeddingNet)
    net.load_state_dict(model_state)
    net.eval()
    return config, net


def _sample_input(config: Config, model_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A dummy input of the shape the saved backbone expects (read from its first layer)."""
    first = next(v for k, v in model_state.items() if k.endswith("weight"))
    if config.model.backbone == "mlp":
        return torch.zeros(1, first.shape[1])
    return torch.zeros(1, first.shape[1], 28, 28)

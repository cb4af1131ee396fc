"""``fit``: the training loop over Python objects, written out top to bottom.

``fit(model, train_data, loss=..., epochs=...)`` trains any ``nn.Module`` that maps a batch to
(B, D) embeddings on any map-style ``Dataset`` of ``(input, int label)``; ``train(config)``
(:mod:`deepmetric.training.run`) builds these objects from a config and calls the same loop.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deepmetric import distributed
from deepmetric.checkpoints import CheckpointError, find_latest, holds_checkpoints
from deepmetric.components import check_components
from deepmetric.config import (
    FIT_DATA,
    Config,
    ConfigError,
    LossConfig,
    TrainConfig,
    config_to_yaml,
    tuple_kind,
)
from deepmetric.config import validate as validate_config
from deepmetric.data import augment
from deepmetric.losses import LOSSES, CrossBatchMemory, name_loss
from deepmetric.models import projections
from deepmetric.neighbors import nearest_other, retrieval_metrics
from deepmetric.runs import Run
from deepmetric.training.builders import (
    build_mode,
    build_optimizer,
    build_plan,
    embedding_part,
    resolve_device,
)
from deepmetric.training.log import RunLog, batch_stats, truncate_log, warn_collapse
from deepmetric.training.modes import (
    VAL_ITEMS,
    Mode,
    Step,
    epoch_seed,
    stratified_indices,
)
from deepmetric.training.schedule import set_lr
from deepmetric.training.source import Source, check_finite_inputs, training_source
from deepmetric.training.state import Position, RunState, StopRequested, StopSignals
from deepmetric.training.tuples import (
    VALIDATION_KEYS,
    TupleSource,
    tuple_validation,
    validation_keys,
)


def _epoch_record(
    config: Config, model: nn.Module, mode: Mode, val: Source | None, pos: Position, device
) -> dict[str, Any]:
    """Train loss (mean over the epoch's batches); on the validation data, the same loss on
    fixed batches shaped as the training ones, from a stratified sample (joint mode with
    class-disjoint validation: the metric term alone, the classifier has no output for those
    classes; see ``val_batches`` in :mod:`deepmetric.training.modes`), the leave-one-out
    precision@1 of every item, and MAP@R (the open-set protocol's selection metric) over a
    fixed stratified sample of at most ``VAL_ITEMS`` items (R = the sample's items of the
    query's class, less one). Fixed tuples (``pairs:`` / ``triplets:``) have no classes: their
    validation keys are those of :mod:`deepmetric.training.tuples` instead."""
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": pos.epoch + 1,
        "step": pos.step,
        "train_loss": float(np.mean(pos.epoch_losses)) if pos.epoch_losses else float("nan"),
        "val_loss": float("nan"),
        **validation_keys(tuple_kind(config.data)),
    }
    if val is not None and len(val) >= 2:
        loss_fn = mode.loss_fn
        model.eval()
        if isinstance(loss_fn, nn.Module):  # a cross-batch memory: neither read nor written
            loss_fn.eval()
        try:  # one forward pass over the split: the embeddings and the loss's outputs
            out = _outputs(model, val, device)
            emb = out[0] if isinstance(out, tuple) else out
            if any(getattr(m, "projection_head", False) for m in model.modules()):
                with projections(model):  # the loss is on the head's outputs
                    out = _outputs(model, val, device)
            with torch.no_grad():
                batches = [b for b in mode.val_batches(val.labels) if len(b)]
                losses = [
                    mode.loss_of(_rows(out, b, device), val.labels[b].to(device)).loss
                    for b in batches
                ]
        finally:
            model.train()
            if isinstance(loss_fn, nn.Module):
                loss_fn.train()
        if batches:
            sizes = [len(b) for b in batches]
            record["val_loss"] = sum(float(v) * n for v, n in zip(losses, sizes)) / sum(sizes)
        if isinstance(val, TupleSource):
            record |= tuple_validation(emb, val, config.loss.metric)
            return record
        _, correct = nearest_other(emb, val.labels, config.loss.metric)
        record["val_precision_at_1"] = float(correct.float().mean())
        sample = stratified_indices(val.labels, VAL_ITEMS, config.seed)
        retrieval = retrieval_metrics(emb[sample], val.labels[sample], metric=config.loss.metric)
        record["val_map_at_r"] = retrieval["map_at_r"]
    return record


Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@torch.no_grad()
def _outputs(model: nn.Module, data: Source, device: torch.device, batch: int = 1024) -> Outputs:
    """``model``'s outputs for every item of ``data``, ``batch`` items at a time, float32 on
    the CPU: (N, D) embeddings, or a tuple such as (embeddings, logits) for a joint model."""
    parts = [
        model(data.fetch(torch.arange(i, min(i + batch, len(data)))).to(device))
        for i in range(0, len(data), batch)
    ]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[j].float().cpu() for p in parts]) for j in range(len(parts[0])))
    return torch.cat([p.float().cpu() for p in parts])


def _rows(out: Outputs, idx: torch.Tensor, device: torch.device) -> Outputs:
    """The rows ``idx`` of every output, on ``device``."""
    if isinstance(out, tuple):
        return tuple(o[idx].to(device) for o in out)
    return out[idx].to(device)


def _optimizer_step(state: RunState, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward (scaled under mixed precision), optional gradient clipping, one update."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()


def _check_loss(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(
            f"loss is {value} at step {step}: try a lower train.lr or train.grad_clip; "
            "the last checkpoint is kept"
        )


def _log_step(log: RunLog, config: Config, pos: Position, lr: float, step: Step) -> str:
    """Write a step record (loss, active triplets, mean distance, lr); return its summary."""
    value = pos.epoch_losses[-1]
    c = config.loss
    stats = batch_stats(value, step.embeddings, step.labels, metric=c.metric, margin=c.margin)
    entry = LOSSES.get(c.name)
    distance_margin = entry is not None and entry.distance_margin  # others: no such margin
    warn_collapse(stats, c.margin if distance_margin else None)
    log.write({"kind": "step", "step": pos.step, "epoch": pos.epoch, "lr": lr} | vars(stats))
    return f"loss {value:.4f} active {stats.active:.2f} dist {stats.mean_dist:.3f}"


def _local_batch(
    config: Config,
    train: Source,
    idx: torch.Tensor,
    epoch: int,
    b: int,
    device: torch.device,
    n_views: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch ``idx`` (all of it in one process), augmented as
    the whole batch would be (the draws are seeded per global batch: resume stays exact)."""
    start, stop = distributed.shard_bounds(len(idx), distributed.rank(), distributed.world_size())
    part = idx[start:stop]
    x = train.fetch(part)
    if config.train.augment and x.dim() == 4:
        seed = (epoch_seed(config.seed, epoch) * 1_000_003 + b) % 2**64  # torch's seed range
        g = torch.Generator().manual_seed(seed)
        views = [augment(x, g, batch_size=len(idx), offset=start) for _ in range(n_views)]
        x = torch.cat(views)  # two views (an NT-Xent term): the second from the next draws
    return x.to(device, non_blocking=True), train.labels[part].to(device)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype of ``train.amp`` on ``device``, or None (float32): float16 on
    CUDA (with a gradient scaler), bfloat16 on a CPU that computes it in hardware. Distances
    and losses stay float32 under autocast (see :mod:`deepmetric.distances`)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and native_bfloat16():
        return torch.bfloat16
    warnings.warn(
        f"train.amp=true: no hardware bfloat16 on this {device.type} (AVX512-BF16 or AMX); "
        "training in float32",
        stacklevel=3,
    )
    return None


def _parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel inside a process group, else ``model``."""
    if not distributed.is_distributed():
        return model
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def train_loop(
    config: Config,
    model: nn.Module,
    mode: Mode,
    train: Source,
    val: Source | None,
    *,
    device: torch.device,
    run_dir: Path | None,
    resume: bool = False,
    stream: TextIO | None = sys.stderr,
) -> Position:
    """Optimise ``model`` for ``config.epochs`` epochs of ``mode``'s batches; with ``run_dir``,
    log to ``log.jsonl`` and checkpoint after every epoch and on Ctrl-C / SIGTERM.

    In a process group (:mod:`deepmetric.distributed`) every rank runs this loop on its slice of
    each global batch; rank 0 alone validates, logs and writes checkpoints, and all ranks stop
    at the same batch when any receives Ctrl-C / SIGTERM."""
    t = config.train
    # float16 (CUDA) needs a gradient scaler, bfloat16 does not; the dtype itself (with its
    # warning where a CPU has no bfloat16) is chosen once a resumed run's checkpoint loaded
    use_amp = t.amp and device.type == "cuda"
    loss_fn = mode.loss_fn
    state = RunState(
        model,
        build_optimizer(config, model, loss_fn),
        torch.amp.GradScaler("cuda", enabled=use_amp),
        loss=loss_fn if isinstance(loss_fn, nn.Module) else None,
    )
    main = distributed.is_main()
    if resume and run_dir is not None and holds_checkpoints(run_dir):
        try:  # nothing is written before the checkpoint has loaded
            state.restore(run_dir)
        except CheckpointError as error:
            raise CheckpointError(_cannot_resume(run_dir, error)) from None
        if main:
            truncate_log(run_dir, state.pos.step)
    elif resume and run_dir is not None and main:  # killed before its first save completed
        truncate_log(run_dir, 0)
        if stream is not None:
            print(
                f"note: {run_dir} has no complete checkpoint: training from the start", file=stream
            )
    if resume and run_dir is not None and main:  # the resolved config, epochs=N included
        Run.create(config, run_dir)
    amp_dtype = autocast_dtype(t.amp, device)
    net = _parallel(model, device)
    n_views = mode.n_views
    pos, plan, config_yaml = (
        state.pos,
        build_plan(config, mode.steps_per_epoch),
        config_to_yaml(config),
    )
    save_dir = run_dir if main else None
    log, stop = RunLog(save_dir, stream if main else None), StopSignals()
    try:
        while pos.epoch < config.epochs:
            model.train()
            for b, idx in enumerate(mode.batches(pos.epoch)):
                if b < pos.batch:  # resuming inside an epoch: these ran already
                    continue
                stop.check(agree=distributed.largest)
                x, y = _local_batch(config, train, idx, pos.epoch, b, device, n_views)
                lr = set_lr(state.optimizer, plan, pos.step)
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    try:
                        step = mode.loss(net, x, y, distributed.gather)
                    except FloatingPointError:
                        check_finite_inputs(x, f"the batch of step {pos.step + 1}")
                        raise
                value = distributed.mean(float(step.loss.detach()))
                if not math.isfinite(value):  # NaN inputs (a Dataset of any kind), else diverged
                    check_finite_inputs(x, f"the batch of step {pos.step + 1}")
                _check_loss(value, pos.step + 1)
                _optimizer_step(state, step.loss, t.grad_clip)
                pos.batch, pos.step = b + 1, pos.step + 1
                pos.epoch_losses.append(value)
                if main and (pos.step % t.log_every == 0 or b + 1 == mode.steps_per_epoch):
                    text = _log_step(log, config, pos, lr, step)
                    where = (
                        f"epoch {pos.epoch + 1}/{config.epochs} [{b + 1}/{mode.steps_per_epoch}]"
                    )
                    log.progress(f"{where} {text}")
            record = _epoch_record(config, model, mode, val, pos, device) if main else None
            record = distributed.broadcast(record)
            pos.history.append(record)
            log.write(record)
            log.progress(
                f"epoch {pos.epoch + 1}/{config.epochs} loss {record['train_loss']:.4f} val loss "
                f"{record['val_loss']:.4f} {_shown(record, tuple_kind(config.data))}",
                final=True,
            )
            pos.epoch, pos.batch, pos.epoch_losses = pos.epoch + 1, 0, []
            state.save(save_dir, config_yaml)
            stop.check(agree=distributed.largest)
    except StopRequested:
        if not mode.resumable_mid_epoch:  # batches depend on the weights: redo the epoch
            pos.batch, pos.epoch_losses = 0, []
        state.save(save_dir, config_yaml)
        where = f"continue with --resume {run_dir}" if run_dir else "no run folder (out=None)"
        log.progress(f"interrupted: checkpoint saved; {where}", final=True)
        raise
    except BaseException:
        log.progress("stopped; the last checkpoint is kept", final=True)
        raise
    finally:
        stop.restore()
        log.close()
    return pos


def _shown(record: dict[str, Any], kind: str | None) -> str:
    """The validation keys of an epoch record as the progress line shows them."""
    return " ".join(f"{label} {record[key]:.3f}" for key, label in VALIDATION_KEYS[kind])


def _loss_config(loss: Any, *, recorded: bool) -> LossConfig:
    """What a loss object says of itself (its name and options, read through
    :data:`deepmetric.losses.LOSSES`), for the run's config.yaml; a ``CrossBatchMemory`` is
    its loss plus ``loss.memory`` / ``loss.memory_start``.

    ``recorded`` (``fit(out=...)``): a loss no entry can name is a ``ConfigError``. Without a
    run folder nothing is recorded: such a loss leaves the defaults, but for the ``metric``
    and ``margin`` it has (validation measures with that metric, the step log uses the
    margin)."""
    if isinstance(loss, CrossBatchMemory):
        c = _loss_config(loss.loss, recorded=recorded)
        c.memory, c.memory_start = loss.size, loss.start
        return c
    named = name_loss(loss)
    if named is not None:
        name, options = named
        return dataclasses.replace(LossConfig(name=name), **options)
    if recorded:
        what = type(loss).__name__
        raise ConfigError(
            f"fit(out=...) records the loss in config.yaml, and no loss.name is registered for "
            f"a {what}: register it (deepmetric.losses.register_loss('my_loss', {what}, "
            "options={...})), or pass out=None"
        )
    c = LossConfig()
    for key in ("metric", "margin"):
        if hasattr(loss, key):
            setattr(c, key, getattr(loss, key))
    return c


def fit(
    model: nn.Module,
    train_data: Dataset,
    *,
    loss: Any,
    epochs: int,
    mode: str = "batch",
    p: int = TrainConfig.p,
    k: int = TrainConfig.k,
    val_data: Dataset | None = None,
    labels: Any = None,
    val_labels: Any = None,
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    builder: str | None = None,
    builder_args: dict[str, Any] | None = None,
    softmax_weight: float = 1.0,
    augment: bool = False,
    stream: TextIO | None = sys.stderr,
    **options: Any,
) -> nn.Module:
    """Train ``model`` on ``train_data`` and return it (trained in place, and left on the
    training device: ``device=``, by default ``auto``, CUDA when available;
    :func:`deepmetric.models.embed` then runs it there).

    Args:
        model: any ``nn.Module`` mapping a batch (B, ...) to (B, D) embeddings; in
            ``mode="joint"`` it returns ``(embeddings, logits)`` (e.g. a
            :class:`~deepmetric.models.JointNet`).
        train_data: a map-style ``Dataset`` of ``(input, int label)``; labels are read once
            (pass ``labels=`` (N,) to skip that).
        loss: ``mode="batch"`` / ``"joint"``: a loss over ``(embeddings (B, D), labels (B,))``
            such as ``TripletLoss``; ``"siamese"``: a pair loss ``loss(e1, e2, same)`` such as
            ``ContrastiveLoss``; ``"triplet"`` / ``"offline"``: ``loss(ea, ep, en)`` such as
            ``functools.partial(triplet_margin_loss, margin=0.2)``.
        epochs, p, k, seed: as in the config (``train.p``, ...); P adapts to the classes present.
        val_data: a validation ``Dataset``: per-epoch validation loss and precision@1.
        augment: random horizontal flips and 2-pixel shifts of (B, C, H, W) inputs. Off by
            default here (unlike the config's default, made for Fashion-MNIST): a mirror image
            is not the same thing for every kind of data (digits, text, signatures).
        out: a run folder like the CLI's (``config.yaml``, ``log.jsonl``, checkpoints, exact
            ``resume=True``). ``deepmetric evaluate`` can rebuild the model when ``builder``
            names a function registered with :func:`deepmetric.models.register_model`
            (called as ``builder(**builder_args)``; pass ``--import MODULE`` to the CLI).
        **options: any ``train.*`` option of the config: ``lr``, ``optimizer``,
            ``weight_decay``, ``schedule``, ``warmup_epochs``, ``device``,
            ``amp``, ``grad_clip``, ``batch_size``, ``log_every``, ...

    Example::

        net = fit(MyNet(), my_dataset, loss=TripletLoss(margin=0.2), epochs=5, p=8, k=4)
    """
    valid = {f.name for f in dataclasses.fields(TrainConfig)} - {"p", "k", "classes", "augment"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    config = Config(name=Path(out).name if out else "fit", data=FIT_DATA, seed=seed)
    config.mode, config.epochs = mode, epochs  # type: ignore[assignment]
    config.out = str(out) if out is not None else None
    config.train = dataclasses.replace(TrainConfig(), p=p, k=k, augment=augment, **options)
    config.loss = _loss_config(loss, recorded=out is not None)
    config.loss.softmax_weight = softmax_weight
    config.model.builder, config.model.builder_args = builder, dict(builder_args or {})
    validate_config(config)
    check_components(config)
    val = Source(val_data, val_labels, name="val_data") if val_data is not None else None
    train = Source(train_data, labels, name="train_data")
    train = training_source(train, config.train.dihedral_classes)
    run_config(config, model, train, val, loss, resume=resume, stream=stream)
    return model


def run_config(
    config: Config,
    model: nn.Module,
    train: Source,
    val: Source | None,
    loss: Any,
    *,
    resume: bool,
    stream: TextIO | None,
) -> dict[str, Any]:
    """Train ``model`` as ``config`` says (into ``config.out`` when set); return the summary:
    epochs, steps, seconds, last train loss and the last validation keys (precision@1 and
    MAP@R; for fixed tuples, those of :data:`~deepmetric.training.tuples.VALIDATION_KEYS`)."""
    run_dir = config.run_dir if config.out is not None else None
    if run_dir is not None:
        start_run_folder(config, run_dir, resume, write=distributed.is_main())
        distributed.barrier()
    if not distributed.is_main():
        stream = None
    torch.manual_seed(config.seed)
    device = distributed.process_device(config.train.device) or resolve_device(config.train.device)
    model.to(device)
    if isinstance(loss, nn.Module):  # proxies, a cross-batch memory
        loss.to(device)
    mode = build_mode(
        config,
        train.labels,
        loss,
        fetch=train.fetch,
        embed_net=embedding_part(model),
        device=device,
        stream=stream,
    )
    started = time.perf_counter()
    pos = train_loop(
        config,
        model,
        mode,
        train,
        val,
        device=device,
        run_dir=run_dir,
        resume=resume,
        stream=stream,
    )
    last = pos.history[-1] if pos.history else {}
    shown = validation_keys(tuple_kind(config.data))
    return {
        "epochs": config.epochs,
        "steps": pos.step,
        "seconds": round(time.perf_counter() - started, 1),
        "train_loss": last.get("train_loss", float("nan")),
        **{key: last.get(key, nan) for key, nan in shown.items()},
    }


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete checkpoint (a run killed during its first save has
    a ``checkpoints/`` folder and none: it starts again from the beginning)."""
    try:
        find_latest(run_dir)
    except CheckpointError:
        return False
    return True


def _cannot_resume(run_dir: Path, error: CheckpointError) -> str:
    return (
        f"cannot resume {run_dir}: {error}; nothing in {run_dir} was changed: put the "
        "checkpoints back from a copy, or train anew with out=ANOTHER_DIR"
    )


def check_resumable(run_dir: Path) -> None:
    """Before anything is written: ``CheckpointError`` (one line naming each damaged
    checkpoint) when ``run_dir`` holds checkpoints and none of them is complete. A folder
    with none (a run killed during its first save) passes: it trains from the start."""
    if not holds_checkpoints(run_dir):
        return
    try:
        find_latest(run_dir)
    except CheckpointError as error:
        raise CheckpointError(_cannot_resume(run_dir, error)) from None


def start_run_folder(config: Config, run_dir: Path, resume: bool, *, write: bool = True) -> None:
    """Refuse to overwrite a run (one whose checkpoints are all damaged included); write the
    resolved config (unless ``write`` is false: the ranks of a distributed run other than 0
    only check). On resume, check only: :func:`train_loop` writes the config once the
    checkpoint has loaded, so that a refused resume changes nothing."""
    if resume:
        check_resumable(run_dir)
        return
    if holds_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run: resume it (--resume {run_dir}) or set out=ANOTHER_DIR"
        )
    if not write:
        return
    Run.create(config, run_dir)


__all__ = ["Source", "fit", "run_config", "train_loop"]

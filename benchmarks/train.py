"""Training throughput (samples/s) and the share of step time spent in mining + loss.

Times full optimisation steps of the default network of the default config (``deepmetric
train`` with no options: joint mode, its backbone, 128-d, Adam) on P x K batches of 1x28x28
images, built and stepped with the project's own training pieces (``build_model``,
``build_loss``, ``build_mode``, ``build_optimizer``, the loop's autocast and its optimiser step
with the gradient scaler), and separately the mining + loss part alone (distance matrix, mining,
loss, and their backward to the embeddings), for each loss named.

    python benchmarks/train.py                                  # B = P x K of the config (160)
    python benchmarks/train.py --batch 160 640 --amp off fp16 --device cuda
    python benchmarks/train.py --batch 64 --k 4 --steps 3 --losses batch_all \\
        --set model.backbone=small_cnn                          # a quick CPU run

Random images stand in for data (the cost of a step does not depend on pixel values); they
are made on the device, so the data loading, augmentation and host-to-device copy of the real
trainer are not measured. On CUDA every timed region starts and ends with a synchronisation.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepmetric.config import Config, load_config
from deepmetric.training.builders import (
    build_loss,
    build_mode,
    build_model,
    build_optimizer,
    embedding_part,
    resolve_device,
)
from deepmetric.training.fit import _optimizer_step as optimizer_step  # the loop's own step
from deepmetric.training.fit import autocast_dtype
from deepmetric.training.state import RunState

#: loss name -> config overrides (contrastive and lifted with margin 1.0, as in losses.py)
LOSSES: dict[str, list[str]] = {
    "batch_all": ["loss.name=triplet", "loss.mining=batch_all"],
    "batch_hard": ["loss.name=triplet", "loss.mining=batch_hard"],
    "semi_hard": ["loss.name=triplet", "loss.mining=semi_hard"],
    "contrastive": ["loss.name=contrastive", "loss.margin=1.0"],
    "lifted": ["loss.name=lifted", "loss.margin=1.0"],
    "multi_similarity": ["loss.name=multi_similarity"],
}
AMP: dict[str, torch.dtype | None] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE = (1, 28, 28)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``steps`` calls after ``warmup`` calls, each timed call
    between two synchronisations on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def make_config(args: argparse.Namespace, loss: str, batch: int, amp: str) -> Config:
    """The config (``--config`` and ``--set``) with this loss, P = batch / K, K and amp."""
    overrides = [*args.set, *LOSSES[loss], f"train.k={args.k}", f"train.p={batch // args.k}"]
    overrides.append(f"train.amp={'false' if amp == 'off' else 'true'}")
    return load_config(args.config, overrides)


def measure(
    args: argparse.Namespace, device: torch.device, loss: str, batch: int, amp: str
) -> dict[str, Any]:
    """One (loss, B, amp) row: median step time, samples/s, mining + loss time, peak memory."""
    torch.manual_seed(0)
    config = make_config(args, loss, batch, amp)
    k = args.k
    p = batch // k
    b = p * k
    labels = torch.arange(p).repeat_interleave(k)
    labels = labels[torch.randperm(b)]
    x = torch.rand(b, *IMAGE, device=device)
    y = labels.to(device)
    model = build_model(config, x[:1], num_classes=p).to(device)
    loss_fn = build_loss(config, classes=list(range(p)))
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    mode = build_mode(
        config,
        labels,
        loss_fn,
        fetch=lambda idx: x[idx.to(device)],
        embed_net=embedding_part(model),
        device=device,
        stream=None,
    )
    dtype = AMP[amp]
    state = RunState(
        model,
        build_optimizer(config, model, loss_fn),
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        loss=loss_fn if isinstance(loss_fn, nn.Module) else None,
    )
    model.train()

    def step() -> None:  # as train_loop: autocast forward + loss, the loss value, the update
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = mode.loss(model, x, y)
        value = float(out.loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}")
        optimizer_step(state, out.loss, config.train.grad_clip)

    with torch.no_grad():
        emb = embedding_part(model)(x).float()

    def loss_only() -> None:
        e = emb.clone().requires_grad_(True)
        mode.loss_fn(e, y).backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = median_ms(step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    loss_ms = median_ms(loss_only, args.steps * 5, args.warmup, device)
    return {
        "loss": loss,
        "batch": b,
        "p": p,
        "k": k,
        "amp": amp,
        "step_ms": step_ms,
        "samples_per_s": 1000 * b / step_ms,
        "loss_ms": loss_ms,
        "loss_share": loss_ms / step_ms,
        "peak_gib": peak,
    }


def driver_version() -> str:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else "unknown"


def describe_device(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)}, driver {driver_version()}; torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}"
        )
    return f"CPU ({cpu_model()}), {threads} threads; torch {torch.__version__}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def amp_note(device: torch.device) -> str:
    """What ``train.amp=true`` computes in on this device, from the loop's own rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = autocast_dtype(True, device)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "float32")
    return f"train.amp=true trains in {name} on {device.type}"


def row_text(row: dict[str, Any], cuda: bool) -> str:
    cells = [
        row["loss"],
        str(row["batch"]),
        row["amp"],
        f"{row['step_ms']:.1f}",
        f"{row['samples_per_s']:.0f}",
        f"{row['loss_ms']:.2f}",
        f"{100 * row['loss_share']:.1f}%",
    ]
    if cuda:
        cells.append(f"{row['peak_gib']:.2f}" if row.get("peak_gib") is not None else "—")
    return "| " + " | ".join(cells) + " |"


def failed_row(loss: str, batch: int, amp: str, status: str, cuda: bool) -> str:
    cells = [loss, str(batch), amp, status, "—", "—", "—"] + (["—"] if cuda else [])
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--amp",
        nargs="+",
        choices=tuple(AMP),
        default=["off"],
        help="autocast dtypes to run (fp16 with the loop's gradient scaler)",
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes (default: P x K)"
    )
    parser.add_argument("--k", type=int, default=None, help="samples per class (default: K)")
    parser.add_argument(
        "--losses", nargs="+", choices=tuple(LOSSES), default=None, help="default: all"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--config", default=None, help="a config file (default: the defaults)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds: no new row starts after this"
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = load_config(args.config, args.set)
    args.k = args.k or base.train.k
    batches = args.batch or [base.train.p * base.train.k]
    losses = args.losses or list(LOSSES)
    cuda = device.type == "cuda"
    m = base.model
    print(f"Device: {describe_device(device, args.threads)}\n")
    print(
        f"- net: mode {base.mode}, {m.builder or m.backbone} -> {m.dim}-d"
        f"{', L2-normalised' if m.normalize else ''}, optimizer {base.train.optimizer}; "
        f"{IMAGE[0]}x{IMAGE[1]}x{IMAGE[2]} images, K = {args.k}"
    )
    print(f"- {amp_note(device)}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"- command: {' '.join([sys.executable, *sys.argv])}\n")
    head = ["loss", "B", "amp", "step ms", "samples/s", "mining + loss ms", "share of step"]
    head += ["peak GiB"] if cuda else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)
    rows = []
    for loss in losses:  # the first loss at every B and amp first: what a budget keeps
        for batch in batches:
            for amp in args.amp:
                if args.budget is not None and time.monotonic() - start > args.budget:
                    print(failed_row(loss, batch, amp, "skip (budget)", cuda), flush=True)
                    continue
                try:
                    row = measure(args, device, loss, batch, amp)
                except Exception as error:  # a failed row is reported, the others still run
                    text = str(error).strip().splitlines()
                    status = f"{type(error).__name__}: {text[0] if text else ''}"[:120]
                    print(f"{loss} B={batch} {amp}: {status}", file=sys.stderr, flush=True)
                    print(failed_row(loss, batch, amp, status.replace("|", "/"), cuda), flush=True)
                    rows.append({"loss": loss, "batch": batch, "amp": amp, "error": status})
                else:
                    print(row_text(row, cuda), flush=True)
                    rows.append(row)
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
    if args.json:
        payload = {"device": describe_device(device, args.threads), "argv": sys.argv, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()

"""Distributed training on this machine: samples/s of 1 vs N processes for the default model,
the time of the gather, and the cost of mining over the global batch vs one rank's slice.

    python benchmarks/distributed.py [--steps 30] [--nproc 2] [--p 10] [--k 16]

Every process runs the training step of the default config (SmallCNN with padding, 128-d, joint:
batch-all triplet loss over the gathered global batch + cross-entropy on its slice, Adam) on
random 28 x 28 images; the global batch is P x K whatever the number of processes, so samples/s
compare directly. Processes use gloo on loopback and share the machine's cores (torch threads per
process = cores / N). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deepmetric import distributed
from deepmetric.config import load_config
from deepmetric.losses import TripletLoss
from deepmetric.training.builders import build_model
from deepmetric.training.modes import JointMode


def _step_times(rank: int, world: int, init: str, out: str, steps: int, p: int, k: int) -> None:
    """Run ``steps`` training steps (after 3 warm-up ones) in a group of ``world``; rank 0 writes
    the per-step seconds and the gather's forward + backward seconds."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        config = load_config(None, [f"train.p={p}", f"train.k={k}"])
        torch.manual_seed(0)
        b = p * k
        x = torch.rand(b, 1, 28, 28)
        y = torch.arange(b) // k
        model = build_model(config, x[:1], p)
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        mode = JointMode(y, TripletLoss(margin=0.2), p=p, k=k, seed=0, classes=torch.arange(p))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        start, stop = distributed.shard_bounds(b, rank, world)
        gather = distributed.gather if world > 1 else distributed.local
        times, gathers = [], []
        for i in range(steps + 3):
            dist.barrier()
            t0 = time.perf_counter()
            step = mode.loss(net, x[start:stop], y[start:stop], gather)
            optimizer.zero_grad()
            step.loss.backward()
            optimizer.step()
            dist.barrier()
            if i >= 3:
                times.append(time.perf_counter() - t0)
            emb = torch.randn(stop - start, 128, requires_grad=True)
            t0 = time.perf_counter()
            full, _ = gather(emb, y[start:stop])
            full.sum().backward()
            if i >= 3:
                gathers.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(f"{statistics.median(times)} {statistics.median(gathers)}")
    finally:
        dist.destroy_process_group()
    distributed.exit_process(0)  # gloo can abort in the interpreter teardown after DDP


def measure(world: int, steps: int, p: int, k: int) -> tuple[float, float]:
    """(median seconds per step, median seconds of the gather) with ``world`` processes."""
    with tempfile.TemporaryDirectory() as folder:
        init, out = f"file://{folder}/rendezvous", f"{folder}/result"
        mp.start_processes(
            _step_times, args=(world, init, out, steps, p, k), nprocs=world, start_method="spawn"
        )
        step, gather = (float(v) for v in Path(out).read_text().split())
    return step, gather


def mining_cost(b: int, world: int, repeats: int = 20) -> tuple[float, float]:
    """Median seconds of batch-all forward + backward over B (global) and B / N (one slice)."""
    loss = TripletLoss(margin=0.2)
    out = []
    for n in (b, distributed.shard_bounds(b, 0, world)[1]):
        emb = torch.nn.functional.normalize(torch.randn(n, 128), dim=1).requires_grad_()
        labels = torch.arange(n) % 10
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss(emb, labels).backward()
            runs.append(time.perf_counter() - t0)
        out.append(statistics.median(runs))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--p", type=int, default=10)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    b = args.p * args.k
    print(f"global batch {args.p} x {args.k} = {b}, {os.cpu_count()} cores, {args.steps} steps")
    print("\n| processes | s / step | samples / s | gather fwd+bwd (ms) |\n|---|---|---|---|")
    base = None
    for world in sorted({1, args.nproc}):
        step, gather = measure(world, args.steps, args.p, args.k)
        base = base or step
        speed = f"{b / step:,.0f} ({base / step:.2f}x)"
        print(f"| {world} | {step:.4f} | {speed} | {1000 * gather:.2f} |")
    full, part = mining_cost(b, args.nproc)
    print(
        f"\nbatch-all loss forward + backward, 128-d: global batch of {b}: {1000 * full:.2f} ms; "
        f"one rank's slice of {distributed.shard_bounds(b, 0, args.nproc)[1]}: "
        f"{1000 * part:.2f} ms"
    )


if __name__ == "__main__":
    main()

"""Benchmark deepmetric's losses against the distance-matrix floor, dense B^3 forms and
pytorch-metric-learning (PML).

Every (implementation, loss, B) configuration runs in a fresh subprocess with a wall-clock
timeout and an address-space cap, so a blow-up shows as "OOM" or "timeout" in the table instead
of taking the machine down. Each child prints one JSON line; the parent prints a Markdown table.

    python benchmarks/losses.py                               # B = 256 1024 4096 8192
    python benchmarks/losses.py --batch-sizes 256 --repeats 2 # smoke test
    python benchmarks/losses.py --only batch_all pml ours --json results.json

``--only`` takes loss names (batch_all batch_hard semi_hard contrastive lifted) and/or
implementation names (floor ours dense pml); each group it names is restricted to those.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DIM = 128
PER_CLASS = 4
DEFAULT_THREADS = 2
TRIPLET_MARGIN = 0.2
PAIR_MARGIN = 1.0
TIME_BUDGET_S = 20.0
DEFAULT_BATCH_SIZES = (256, 1024, 4096, 8192)
LOSSES = ("batch_all", "batch_hard", "semi_hard", "contrastive", "lifted")
IMPLEMENTATIONS = ("floor", "ours", "dense", "pml")
CUBIC_DENSE = ("batch_all", "semi_hard")  # dense forms that build (B, B, B) tensors
FLOOR_LOSS = "distance"
GIB = 1024**3
MIB = 1024**2


@dataclass
class Result:
    """One (implementation, loss, B) measurement, as the child prints it."""

    impl: str
    loss: str
    batch_size: int
    status: str  # "ok", "OOM", "timeout", "skip", "n/a" or "error"
    median_ms: float | None = None
    peak_mib: float | None = None
    times_ms: list[float] = field(default_factory=list)
    value: float | None = None
    detail: str = ""


# ----------------------------------------------------------------------------- inputs


def make_inputs(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised random (B, DIM) embeddings and shuffled labels with PER_CLASS per class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size // PER_CLASS).repeat_interleave(PER_CLASS)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    x = F.normalize(torch.randn(len(labels), DIM, generator=gen), dim=1)
    return x.requires_grad_(), labels


# ----------------------------------------------------------------------------- dense forms
# Written independently of deepmetric: the obvious dense PyTorch formulations.


def dense_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean (B, B) distances; the clamp gives a zero gradient on the diagonal."""
    sq = (x * x).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(1e-12).sqrt()


def dense_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean (B, B) masks; the diagonal is not a positive."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    return same & ~eye, ~same


def dense_batch_all(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of relu(d_ap - d_an + m) over the valid triplets where it is > 0; (B, B, B).

    Masking before the relu and counting with count_nonzero (a bool .sum() makes an int64 copy)
    keep the peak at about two float32 B^3 tensors plus a bool one."""
    d = dense_distances(x)
    pos, neg = dense_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]
    losses = F.relu(torch.where(valid, d[:, :, None] - d[:, None, :] + TRIPLET_MARGIN, -math.inf))
    return losses.sum() / torch.count_nonzero(losses).clamp_min(1)


def dense_batch_hard(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over anchors of relu(farthest positive - nearest negative + m)."""
    d = dense_distances(x)
    pos, neg = dense_masks(labels)
    hardest_pos = torch.where(pos, d, -math.inf).amax(dim=1)
    hardest_neg = torch.where(neg, d, math.inf).amin(dim=1)
    return F.relu(hardest_pos - hardest_neg + TRIPLET_MARGIN).mean()


def dense_semi_hard(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TensorFlow Addons' triplet_semihard_loss: a (B, B, B) mask of the negatives farther than
    the positive, the nearest of them per (a, p), else the farthest negative; mean over pairs.

    The selection (the B^3 part) runs without autograd; the loss gathers the chosen distances."""
    d = dense_distances(x)
    pos, neg = dense_masks(labels)
    with torch.no_grad():
        farther = neg[:, None, :] & (d[:, None, :] > d[:, :, None])  # [a, p, n]
        nearest_farther = torch.where(farther, d[:, None, :], math.inf).argmin(dim=2)
        farthest = torch.where(neg, d, -math.inf).argmax(dim=1, keepdim=True)
        chosen = torch.where(farther.any(dim=2), nearest_farther, farthest)
    losses = F.relu(d - d.gather(1, chosen) + TRIPLET_MARGIN)
    return torch.where(pos, losses, 0.0).sum() / pos.sum()


def dense_contrastive(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over unordered pairs of 0.5 d^2 (same label) or 0.5 relu(m - d)^2 (different)."""
    d = dense_distances(x)
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    terms = torch.where(same, 0.5 * d**2, 0.5 * F.relu(PAIR_MARGIN - d) ** 2)
    return terms[upper].mean()


def dense_lifted(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Song et al. 2016: J_ij = log(sum_k exp(m - d_ik) + sum_l exp(m - d_jl)) + d_ij over
    negatives k of i and l of j; sum of relu(J)^2 over positive pairs / (2 |P|)."""
    d = dense_distances(x)
    pos, neg = dense_masks(labels)
    log_s = torch.logsumexp(torch.where(neg, PAIR_MARGIN - d, -math.inf), dim=1)
    j = torch.logaddexp(log_s[:, None], log_s[None, :]) + d
    return (F.relu(j[pos]) ** 2).sum() / (2 * pos.sum())


DENSE: dict[str, LossFn] = {
    "batch_all": dense_batch_all,
    "batch_hard": dense_batch_hard,
    "semi_hard": dense_semi_hard,
    "contrastive": dense_contrastive,
    "lifted": dense_lifted,
}


# ----------------------------------------------------------------------------- builders


def build_floor(loss: str) -> LossFn:
    from deepmetric.distances import pairwise

    return lambda x, labels: pairwise(x).sum()


def build_ours(loss: str) -> LossFn:
    from deepmetric import losses as dm

    if loss == "contrastive":
        return dm.ContrastiveLoss(margin=PAIR_MARGIN)
    if loss == "lifted":
        return dm.LiftedStructuredLoss(margin=PAIR_MARGIN)
    return dm.TripletLoss(margin=TRIPLET_MARGIN, mining=loss)


def build_dense(loss: str) -> LossFn:
    return DENSE[loss]


def build_pml(loss: str) -> LossFn:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    if loss == "contrastive":
        return pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=PAIR_MARGIN)
    if loss == "lifted":
        return pml_losses.LiftedStructureLoss(neg_margin=PAIR_MARGIN, pos_margin=0)
    if loss == "batch_hard":
        miner: Any = pml_miners.BatchHardMiner()
    else:
        kind = "all" if loss == "batch_all" else "semihard"
        miner = pml_miners.TripletMarginMiner(margin=TRIPLET_MARGIN, type_of_triplets=kind)
    triplet = pml_losses.TripletMarginLoss(margin=TRIPLET_MARGIN)
    return lambda x, labels: triplet(x, labels, miner(x, labels))


BUILDERS: dict[str, Callable[[str], LossFn]] = {
    "floor": build_floor,
    "ours": build_ours,
    "dense": build_dense,
    "pml": build_pml,
}


# ----------------------------------------------------------------------------- child side


def current_rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_once(fn: LossFn, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Seconds for one forward + backward, and the loss value."""
    x.grad = None
    start = time.perf_counter()
    loss = fn(x, labels)
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def time_runs(
    fn: LossFn, x: torch.Tensor, labels: torch.Tensor, repeats: int
) -> tuple[list[float], float]:
    """A warm-up, then up to ``repeats`` timed runs, stopping early once the total (warm-up
    included) exceeds TIME_BUDGET_S; at least one timed run. Returns (seconds, loss value)."""
    total, value = time_once(fn, x, labels)
    times: list[float] = []
    while len(times) < max(1, repeats):
        seconds, value = time_once(fn, x, labels)
        times.append(seconds)
        total += seconds
        if total > TIME_BUDGET_S:
            break
    return times, value


def is_memory_error(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, MemoryError) or "memory" in message or "alloc" in message


def measure(impl: str, loss: str, batch_size: int, repeats: int) -> Result:
    """Build the loss, make the inputs, time it and measure the peak extra RSS."""
    result = Result(impl=impl, loss=loss, batch_size=batch_size, status="ok")
    try:
        fn = BUILDERS[impl](loss)
    except ImportError as error:
        result.status, result.detail = "n/a", str(error)
        return result
    x, labels = make_inputs(batch_size)
    gc.collect()
    baseline = current_rss_bytes()
    try:
        times, value = time_runs(fn, x, labels, repeats)
    except (MemoryError, RuntimeError) as error:
        if not is_memory_error(error):
            raise
        result.status, result.detail = "OOM", str(error).splitlines()[0][:200]
        return result
    result.times_ms = [1000.0 * t for t in times]
    result.median_ms = statistics.median(result.times_ms)
    result.peak_mib = (peak_rss_bytes() - baseline) / MIB
    result.value = value
    return result


def worker_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = measure(args.impl, args.loss, args.batch_size, args.repeats)
    print(json.dumps(asdict(result)), flush=True)


# ----------------------------------------------------------------------------- parent side


def cubic_gib(batch_size: int) -> float:
    """Size of one float32 (B, B, B) tensor in GiB."""
    return 4 * batch_size**3 / GIB


def cap_memory(cap_bytes: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    return preexec


def parse_child(
    impl: str, loss: str, batch_size: int, proc: subprocess.CompletedProcess[str]
) -> Result:
    """The child's JSON line, or OOM (killed by a signal) / error from its exit."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return Result(**json.loads(line))
    stderr = proc.stderr.strip().splitlines()
    last = stderr[-1][:200] if stderr else ""
    if proc.returncode < 0:
        return Result(impl, loss, batch_size, "OOM", detail=f"killed by signal {-proc.returncode}")
    if any(is_memory_error(RuntimeError(line)) for line in stderr[-5:]):
        return Result(impl, loss, batch_size, "OOM", detail=last)
    return Result(impl, loss, batch_size, "error", detail=last)


def run_child(impl: str, loss: str, batch_size: int, args: argparse.Namespace) -> Result:
    """Run one configuration in a fresh subprocess under the timeout and the memory cap."""
    if impl == "dense" and loss in CUBIC_DENSE and cubic_gib(batch_size) > args.mem_cap_gb:
        return Result(impl, loss, batch_size, "skip", detail=f"B^3 = {cubic_gib(batch_size):g} GiB")
    if impl == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        return Result(impl, loss, batch_size, "n/a", detail="pytorch_metric_learning missing")
    command = [sys.executable, os.path.abspath(__file__), "--worker", impl, loss]
    command += [str(batch_size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            preexec_fn=cap_memory(int(args.mem_cap_gb * GIB)),
        )
    except subprocess.TimeoutExpired:
        return Result(impl, loss, batch_size, "timeout", detail=f"> {args.timeout:g} s")
    return parse_child(impl, loss, batch_size, proc)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(impl, loss, B) configurations to run, the floor first for each B."""
    only = set(args.only or ())
    losses = [name for name in LOSSES if name in only] or list(LOSSES)
    impls = [name for name in IMPLEMENTATIONS if name in only] or list(IMPLEMENTATIONS)
    configs: list[tuple[str, str, int]] = []
    for batch_size in args.batch_sizes:
        if "floor" in impls:
            configs.append(("floor", FLOOR_LOSS, batch_size))
        for loss in losses:
            configs += [(impl, loss, batch_size) for impl in impls if impl != "floor"]
    return configs


def describe(result: Result) -> str:
    if result.status == "ok":
        return f"{result.median_ms:.1f} ms, {result.peak_mib:.0f} MiB"
    return f"{result.status} {result.detail}".strip()


def run_all(args: argparse.Namespace) -> list[Result]:
    configs = plan(args)
    results = []
    for i, (impl, loss, batch_size) in enumerate(configs, 1):
        result = run_child(impl, loss, batch_size, args)
        print(
            f"[{i}/{len(configs)}] {impl} {loss} B={batch_size}: {describe(result)}",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    return results


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_facts(threads: int) -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "threads": str(threads),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "python": platform.python_version(),
        "deepmetric": package_version("deepmetric"),
        "pytorch-metric-learning": package_version("pytorch-metric-learning"),
    }


def time_cell(result: Result | None) -> str:
    if result is None:
        return "—"
    if result.status == "ok":
        return f"{result.median_ms:.1f}"
    if result.status == "skip":
        return f"skip ({result.detail})"
    return result.status


def mem_cell(result: Result | None) -> str:
    return f"{result.peak_mib:.0f}" if result and result.status == "ok" else "—"


def ratio_cell(top: Result | None, bottom: Result | None, suffix: str = "") -> str:
    if not (top and bottom and top.status == bottom.status == "ok"):
        return "n/a"
    assert top.median_ms is not None and bottom.median_ms is not None
    return f"{top.median_ms / max(bottom.median_ms, 1e-9):.2f}{suffix}"


HEADER = (
    "loss",
    "B",
    "ours ms",
    "ours MiB",
    "floor ms",
    "ours/floor",
    "dense ms",
    "dense MiB",
    "pml ms",
    "pml MiB",
    "pml/ours",
)


def table(results: Sequence[Result]) -> str:
    found = {(r.impl, r.loss, r.batch_size): r for r in results}
    keys = {(r.loss, r.batch_size) for r in results if r.impl != "floor"}
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for loss in LOSSES:
        for batch_size in sorted(b for name, b in keys if name == loss):
            ours, dense, pml = (found.get((impl, loss, batch_size)) for impl in IMPLEMENTATIONS[1:])
            floor = found.get(("floor", FLOOR_LOSS, batch_size))
            row = (
                loss,
                str(batch_size),
                time_cell(ours),
                mem_cell(ours),
                time_cell(floor),
                ratio_cell(ours, floor),
                time_cell(dense),
                mem_cell(dense),
                time_cell(pml),
                mem_cell(pml),
                ratio_cell(pml, ours, "×"),
            )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def footnotes(threads: int) -> str:
    return f"""\
Notes
- Inputs: D = {DIM}, {PER_CLASS} samples per class (labels shuffled), L2-normalised float32
  embeddings, CPU, torch.set_num_threads({threads}). Time: median forward + backward after a
  warm-up (fewer repeats once a configuration's total passes {TIME_BUDGET_S:g} s). MiB: peak RSS
  (ru_maxrss) after the runs minus the RSS just before the first forward (inputs already built).
  Each configuration runs in its own process under RLIMIT_AS (virtual memory: ~1 GiB of it is
  libraries) and a wall-clock timeout; OOM = an allocation failed or the process was killed.
- floor: deepmetric.distances.pairwise(x).sum().backward(), the (B, B) distance matrix alone.
  ours/floor: how far each loss is from that floor. pml/ours > 1: ours is faster.
- dense: brute-force PyTorch written independently of deepmetric; batch_all and semi_hard build
  (B, B, B) tensors (skipped when one float32 B^3 tensor exceeds the memory cap), the others are
  (B, B). semi_hard follows TF-Addons' triplet_semihard_loss (its B^3 selection without
  autograd, then a gather of the chosen distances).
- pml (pytorch-metric-learning): the same margins; values differ from ours where noted:
  * every call re-normalises the embeddings (LpDistance(normalize_embeddings=True)) and computes
    the distance matrix with torch.cdist, once in the miner and again in the loss;
  * batch_all: TripletMarginMiner("all") + TripletMarginLoss, mean over triplets with a loss
    > 0 (AvgNonZeroReducer), the same value as ours; but it lists every valid triplet as int64
    indices: a (B, B, B) uint8 mask while B^3 < 2^31, else a Python loop over anchors;
    B (K-1) (B-K) triplets (50 M at B = 4096), several index and distance copies of each;
  * semi_hard: PML's "semihard" keeps every triplet with 0 < d_an - d_ap <= margin and
    averages the non-zero losses; ours / TF-Addons pick per positive pair the nearest negative
    farther than the positive (else the farthest negative) and average over all positive pairs;
  * batch_hard: BatchHardMiner (farthest positive, nearest negative per anchor) then the mean
    over anchors with a loss > 0; ours averages over all anchors;
  * contrastive: PML hinges d itself (relu(d - pos_margin), relu(neg_margin - d), not squared,
    no 0.5) over ordered pairs and adds the mean of the non-zero positive-pair losses to the mean
    of the non-zero negative-pair losses; ours averages 0.5 d^2 / 0.5 relu(m - d)^2 over all
    unordered pairs;
  * lifted: the same formula as ours (Song et al. 2016), but built as a dense
    (#positive pairs) x (#negative pairs) = B (K-1) x B (B-K) matrix: O(B^3) memory, one float32
    copy is ~12 GiB at B = 1024."""


def print_header(args: argparse.Namespace) -> None:
    print("# Loss benchmark\n")
    for name, value in machine_facts(args.threads).items():
        print(f"- {name}: {value}")
    print(f"- command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"- memory cap: {args.mem_cap_gb:g} GiB (RLIMIT_AS), timeout: {args.timeout:g} s\n")
    sys.stdout.flush()


def write_json(path: str, args: argparse.Namespace, results: Sequence[Result]) -> None:
    payload = {
        "machine": machine_facts(args.threads),
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the losses of deepmetric.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per config")
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="RLIMIT_AS per config")
    parser.add_argument(
        "--only", nargs="+", choices=LOSSES + IMPLEMENTATIONS, help="losses and/or impls"
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--worker",
        nargs=3,
        metavar=("IMPL", "LOSS", "B"),
        help="internal: run one configuration and print one JSON line",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        impl, loss, batch_size = args.worker
        args.impl, args.loss, args.batch_size = impl, loss, int(batch_size)
        worker_main(args)
        return
    print_header(args)
    results = run_all(args)
    print(table(results))
    print()
    print(footnotes(args.threads))
    if args.json:
        write_json(args.json, args, results)


if __name__ == "__main__":
    main()

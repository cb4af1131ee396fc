"""Benchmark deepmetric's losses against the distance-matrix floor, dense B^3 forms and
pytorch-metric-learning (PML), on the CPU or on a CUDA device.

Configurations run in child processes with a wall-clock timeout per configuration, so a blow-up
shows as "OOM", "error" or "timeout" in the table instead of taking the machine down. On the
CPU every (implementation, loss, B) configuration has its own process under an address-space
cap (RLIMIT_AS), and the memory is the peak RSS; on CUDA one process runs the configurations of
one B (PML in a process of its own), catching out-of-memory errors, with no address-space cap
(the CUDA context reserves far more virtual memory than any cap would allow), and the memory is
the caching allocator's peak. A child prints one JSON line per configuration; the parent prints
a Markdown table.

    python benchmarks/losses.py                               # CPU, B = 256 1024 4096 8192
    python benchmarks/losses.py --batch-sizes 256 --repeats 2 # smoke test
    python benchmarks/losses.py --only batch_all pml ours --json results.json
    python benchmarks/losses.py --device cuda --batch-sizes 4096 16384 65536 \\
        --only floor ours pml --pml-max-batch 16384 --budget 150

``--only`` takes loss names (batch_all batch_hard semi_hard contrastive lifted
multi_similarity) and/or implementation names (floor ours dense pml); each group it names is
restricted to those.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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
STARTUP_S = 60.0  # a child's first configuration of several: imports, the CUDA context
DEFAULT_BATCH_SIZES = (256, 1024, 4096, 8192)
LOSSES = ("batch_all", "batch_hard", "semi_hard", "contrastive", "lifted", "multi_similarity")
IMPLEMENTATIONS = ("floor", "ours", "dense", "pml")
DEVICES = ("cpu", "cuda")
CUBIC_DENSE = ("batch_all", "semi_hard")  # dense forms that build (B, B, B) tensors
FLOOR_LOSS = "distance"
CHECK_BATCH = 64  # the small batch on which ours and PML's multi-similarity must agree
VALUE_RTOL = 1e-4
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
    peak_mib: float | None = None  # peak extra memory: RSS on the CPU, the allocator on CUDA
    times_ms: list[float] = field(default_factory=list)
    value: float | None = None
    detail: str = ""
    device: str = "cpu"


# ----------------------------------------------------------------------------- inputs


def make_inputs(
    batch_size: int, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised random (B, DIM) embeddings and shuffled labels with PER_CLASS per class,
    drawn on the CPU (the same values on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size // PER_CLASS).repeat_interleave(PER_CLASS)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    x = F.normalize(torch.randn(len(labels), DIM, generator=gen), dim=1)
    return x.to(device).requires_grad_(), labels.to(device)


# ----------------------------------------------------------------------------- dense forms
# Written independently of deepmetric: the obvious dense PyTorch formulations.


def dense_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean (B, B) distances; the clamp gives a zero gradient on the diagonal."""
    sq = (x * x).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(1e-12).sqrt()


def dense_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean (B, B) masks; the diagonal is not a positive."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
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


def dense_multi_similarity(
    x: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> torch.Tensor:
    """Wang et al. 2019 on cosine similarities S with the paper's pair mining (a negative is
    kept if S_an + eps > min positive S, a positive if S_ap - eps < max negative S); mean over
    all anchors of log(1 + sum_P exp(-alpha (S - base))) / alpha + log(1 + sum_N exp(beta (S -
    base))) / beta, each sum a logsumexp with a zero term for the 1."""
    e = F.normalize(x, dim=1)
    s = e @ e.T
    pos, neg = dense_masks(labels)
    with torch.no_grad():
        hardest_pos = torch.where(pos, s, math.inf).amin(dim=1, keepdim=True)
        hardest_neg = torch.where(neg, s, -math.inf).amax(dim=1, keepdim=True)
        keep_pos = pos & (s - epsilon < hardest_neg)
        keep_neg = neg & (s + epsilon > hardest_pos)

    def log1p_sum_exp(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        z = torch.where(keep, z, -math.inf)
        return torch.logsumexp(torch.cat([z, z.new_zeros(len(z), 1)], dim=1), dim=1)

    pos_term = log1p_sum_exp(-alpha * (s - base), keep_pos) / alpha
    neg_term = log1p_sum_exp(beta * (s - base), keep_neg) / beta
    return (pos_term + neg_term).mean()


DENSE: dict[str, LossFn] = {
    "batch_all": dense_batch_all,
    "batch_hard": dense_batch_hard,
    "semi_hard": dense_semi_hard,
    "contrastive": dense_contrastive,
    "lifted": dense_lifted,
    "multi_similarity": dense_multi_similarity,
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
    if loss == "multi_similarity":
        return dm.MultiSimilarityLoss()  # its defaults: alpha 2, beta 50, base 0.5, epsilon 0.1
    return dm.TripletLoss(margin=TRIPLET_MARGIN, mining=loss)


def multi_similarity_params() -> dict[str, float]:
    """alpha, beta, base and epsilon of ``deepmetric.losses.MultiSimilarityLoss()``."""
    ours = build_ours("multi_similarity")
    return {name: float(getattr(ours, name, 0.0)) for name in ("alpha", "beta", "base", "epsilon")}


def build_dense(loss: str) -> LossFn:
    if loss == "multi_similarity":
        params = multi_similarity_params()
        return lambda x, labels: dense_multi_similarity(x, labels, **params)
    return DENSE[loss]


def build_pml(loss: str) -> LossFn:
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners

    if loss == "contrastive":
        return pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=PAIR_MARGIN)
    if loss == "lifted":
        return pml_losses.LiftedStructureLoss(neg_margin=PAIR_MARGIN, pos_margin=0)
    if loss == "multi_similarity":
        p = multi_similarity_params()
        ms = pml_losses.MultiSimilarityLoss(alpha=p["alpha"], beta=p["beta"], base=p["base"])
        if p["epsilon"] <= 0:  # ours mines only with a positive epsilon
            return lambda x, labels: ms(x, labels)
        ms_miner = pml_miners.MultiSimilarityMiner(epsilon=p["epsilon"])
        return lambda x, labels: ms(x, labels, ms_miner(x, labels))
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


def time_once(
    fn: LossFn, x: torch.Tensor, labels: torch.Tensor, cuda: bool = False
) -> tuple[float, float]:
    """Seconds for one forward + backward, and the loss value. On CUDA the time is between two
    events recorded around the call, read after a synchronisation."""
    x.grad = None
    if cuda:
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start_event.record()
        loss = fn(x, labels)
        loss.backward()
        end_event.record()
        torch.cuda.synchronize()
        return start_event.elapsed_time(end_event) / 1000.0, float(loss.detach())
    start = time.perf_counter()
    loss = fn(x, labels)
    loss.backward()
    return time.perf_counter() - start, float(loss.detach())


def time_runs(
    fn: LossFn,
    x: torch.Tensor,
    labels: torch.Tensor,
    repeats: int,
    budget_s: float = TIME_BUDGET_S,
    after_warmup: Callable[[], None] | None = None,
) -> tuple[list[float], float]:
    """A warm-up, then up to ``repeats`` timed runs, stopping early once the total (warm-up
    included) exceeds ``budget_s``; at least one timed run. ``after_warmup`` (given on CUDA
    only: CUDA event timing) runs between the warm-up and the timed runs (resetting the
    allocator's peak). Returns (seconds, value)."""
    cuda = after_warmup is not None
    total, value = time_once(fn, x, labels, cuda)
    if after_warmup is not None:
        after_warmup()
    times: list[float] = []
    while len(times) < max(1, repeats):
        seconds, value = time_once(fn, x, labels, cuda)
        times.append(seconds)
        total += seconds
        if total > budget_s:
            break
    return times, value


def is_memory_error(error: BaseException) -> bool:
    """An allocation that failed (not a CUDA error such as an illegal memory access)."""
    message = str(error).lower()
    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    if "cuda error" in message:
        return False
    return "memory" in message or "alloc" in message


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def free_cuda_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(
    impl: str,
    loss: str,
    batch_size: int,
    repeats: int,
    device: str = "cpu",
    budget_s: float = TIME_BUDGET_S,
) -> Result:
    """Build the loss, make the inputs, time it and measure the peak extra memory: RSS above
    the RSS with the inputs built (CPU), or the allocator's peak above the memory allocated
    before the timed runs, inputs included (CUDA)."""
    result = Result(impl=impl, loss=loss, batch_size=batch_size, status="ok", device=device)
    try:
        fn = BUILDERS[impl](loss)
    except ImportError as error:
        result.status, result.detail = "n/a", str(error)
        return result
    cuda = device == "cuda"
    held = [0]  # bytes allocated before the timed runs (CUDA)

    def reset_peak() -> None:
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held[0] = torch.cuda.memory_allocated()

    try:
        x, labels = make_inputs(batch_size, device=device)
        gc.collect()
        baseline = 0 if cuda else current_rss_bytes()
        times, value = time_runs(fn, x, labels, repeats, budget_s, reset_peak if cuda else None)
        if cuda:
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - held[0]
        else:
            extra = peak_rss_bytes() - baseline
    except Exception as error:  # each failure becomes a row of the table
        result.status = "OOM" if is_memory_error(error) else "error"
        result.detail = first_line(error)
        if result.status == "error":
            traceback.print_exc(file=sys.stderr)
        return result
    finally:
        if cuda:
            fn = x = labels = None  # type: ignore[assignment]
            free_cuda_memory()
    result.times_ms = [1000.0 * t for t in times]
    result.median_ms = statistics.median(result.times_ms)
    result.peak_mib = extra / MIB
    result.value = value
    return result


def sticky_cuda_error(result: Result) -> bool:
    """A CUDA error after which this process's context is unusable: start a new child."""
    text = result.detail.lower()
    return result.status == "error" and ("cuda error" in text or "device-side assert" in text)


def worker_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for impl, loss, batch_size in args.worker:
        result = measure(impl, loss, int(batch_size), args.repeats, args.device, args.time_budget)
        print(json.dumps(asdict(result)), flush=True)
        if sticky_cuda_error(result):
            sys.exit(3)


# ----------------------------------------------------------------------------- parent side

Config = tuple[str, str, int]  # (impl, loss, B)


def cubic_gib(batch_size: int) -> float:
    """Size of one float32 (B, B, B) tensor in GiB."""
    return 4 * batch_size**3 / GIB


def cap_memory(cap_bytes: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    return preexec


def exit_result(config: Config, returncode: int, stderr: str, device: str) -> Result:
    """What a child that died during ``config`` without printing its line says: OOM (killed
    by SIGKILL, or a memory error in its last lines) or error."""
    impl, loss, batch_size = config
    lines = stderr.strip().splitlines()
    last = lines[-1][:200] if lines else ""
    if returncode == -9:
        return Result(impl, loss, batch_size, "OOM", detail="killed by signal 9", device=device)
    if returncode < 0:
        status = "OOM" if device == "cpu" else "error"  # RLIMIT_AS makes some allocators crash
        detail = f"killed by signal {-returncode}"
        return Result(impl, loss, batch_size, status, detail=detail, device=device)
    if any(is_memory_error(RuntimeError(line)) for line in lines[-5:]):
        return Result(impl, loss, batch_size, "OOM", detail=last, device=device)
    return Result(
        impl, loss, batch_size, "error", detail=f"exit {returncode}: {last}", device=device
    )


def precheck(config: Config, args: argparse.Namespace) -> Result | None:
    """A result for a configuration that is not run: a dense B^3 form over the memory cap, PML
    missing or above ``--pml-max-batch``."""
    impl, loss, batch_size = config
    if impl == "dense" and loss in CUBIC_DENSE and cubic_gib(batch_size) > args.mem_cap_gb:
        detail = f"B^3 = {cubic_gib(batch_size):g} GiB"
        return Result(impl, loss, batch_size, "skip", detail=detail, device=args.device)
    if impl == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        detail = "pytorch_metric_learning missing"
        return Result(impl, loss, batch_size, "n/a", detail=detail, device=args.device)
    if impl == "pml" and args.pml_max_batch is not None and batch_size > args.pml_max_batch:
        detail = f"B > {args.pml_max_batch}"
        return Result(impl, loss, batch_size, "skip", detail=detail, device=args.device)
    return None


def child_command(configs: Sequence[Config], args: argparse.Namespace) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--time-budget", str(args.time_budget)]
    for impl, loss, batch_size in configs:
        command += ["--worker", impl, loss, str(batch_size)]
    return command


def read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


class Runner:
    """Runs configurations in child processes (one per configuration on the CPU, one per group
    on CUDA), each under ``--timeout`` seconds, all of them within ``--budget`` seconds."""

    def __init__(self, args: argparse.Namespace, report: Callable[[Result], None]) -> None:
        self.args = args
        self.report = report
        self.deadline = time.monotonic() + (args.budget if args.budget else math.inf)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, groups: Sequence[Sequence[Config]]) -> list[Result]:
        results: list[Result] = []
        for group in groups:
            pending: list[Config] = []
            for config in group:
                skipped = precheck(config, self.args)
                if skipped is not None:
                    self.report(skipped)
                    results.append(skipped)
                else:
                    pending.append(config)
            while pending:
                if self.remaining() <= 0:
                    for impl, loss, batch_size in pending:
                        skipped = Result(
                            impl, loss, batch_size, "skip", detail="budget", device=self.args.device
                        )
                        self.report(skipped)
                        results.append(skipped)
                    break
                done = self.run_child(pending)
                results += done
                pending = pending[len(done) :]
        return results

    def run_child(self, pending: Sequence[Config]) -> list[Result]:
        """Start one child for ``pending``; return the results it gave (at least one: a
        timeout or a crash ends the child and counts for the configuration it was on)."""
        args = self.args
        cpu = args.device == "cpu"
        done: list[Result] = []
        with tempfile.TemporaryFile("w+") as stderr:
            proc = subprocess.Popen(
                child_command(pending, args),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                preexec_fn=cap_memory(int(args.mem_cap_gb * GIB)) if cpu else None,
            )
            lines: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
            reader.start()
            try:
                for i, config in enumerate(pending):
                    result = self.next_result(config, lines, first=i == 0)
                    if result is None:  # the child exited without this configuration's line
                        proc.wait()
                        stderr.seek(0)
                        result = exit_result(config, proc.returncode, stderr.read(), args.device)
                    self.report(result)
                    done.append(result)
                    if result.status == "timeout" or sticky_cuda_error(result):
                        break  # the child is stuck or exits: the rest go to a new one
            finally:
                if len(done) == len(pending) and done[-1].status != "timeout":
                    # every line came: let it exit (and free its memory) on its own
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=30)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                reader.join(timeout=5)
        return done

    def next_result(
        self, config: Config, lines: queue.Queue[str | None], first: bool
    ) -> Result | None:
        """The child's JSON line for ``config``; a timeout result when none comes in time;
        None when the child's output ends."""
        impl, loss, batch_size = config
        startup = STARTUP_S if first and process_per(self.args) == "batch" else 0.0
        limit = self.args.timeout + startup
        budget_cut = self.remaining() < limit
        end = time.monotonic() + max(1.0, min(limit, self.remaining()))
        while True:
            try:
                line = lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                detail = "budget" if budget_cut else f"> {self.args.timeout:g} s"
                return Result(
                    impl, loss, batch_size, "timeout", detail=detail, device=self.args.device
                )
            if line is None:
                return None
            if line.startswith("{"):
                return Result(**json.loads(line))


def plan(args: argparse.Namespace) -> list[list[Config]]:
    """Groups of (impl, loss, B) configurations: the floor, ours and dense for every B first
    (the floor first at each B), then PML for every B. On the CPU each configuration is a group
    of its own (its own process: its own RSS peak and RLIMIT_AS); on CUDA a group is the
    configurations of one B, PML apart (``--process-per`` chooses otherwise)."""
    only = set(args.only or ())
    losses = [name for name in LOSSES if name in only] or list(LOSSES)
    impls = [name for name in IMPLEMENTATIONS if name in only] or list(IMPLEMENTATIONS)
    groups: list[list[Config]] = []
    for batch_size in args.batch_sizes:
        group: list[Config] = [("floor", FLOOR_LOSS, batch_size)] if "floor" in impls else []
        for loss in losses:
            group += [(impl, loss, batch_size) for impl in impls if impl in ("ours", "dense")]
        groups.append(group)
    if "pml" in impls:
        groups += [[("pml", loss, b) for loss in losses] for b in args.batch_sizes]
    groups = [group for group in groups if group]
    if process_per(args) == "config":
        groups = [[config] for group in groups for config in group]
    return groups


def process_per(args: argparse.Namespace) -> str:
    """ "config" (one process per configuration) or "batch" (one per B, PML apart)."""
    return args.process_per or ("config" if args.device == "cpu" else "batch")


def describe(result: Result) -> str:
    if result.status == "ok":
        return f"{result.median_ms:.1f} ms, {result.peak_mib:.0f} MiB, value {result.value:.6g}"
    return f"{result.status} {result.detail}".strip()


def run_all(args: argparse.Namespace) -> list[Result]:
    groups = plan(args)
    total = sum(len(group) for group in groups)
    count = [0]

    def report(result: Result) -> None:
        count[0] += 1
        print(
            f"[{count[0]}/{total}] {result.impl} {result.loss} B={result.batch_size}: "
            f"{describe(result)}",
            file=sys.stderr,
            flush=True,
        )

    return Runner(args, report).run(groups)


# ----------------------------------------------------------------------------- checks


def values_agree(a: float, b: float, rtol: float = VALUE_RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-6)


def check_multi_similarity_small() -> str | None:
    """Ours and PML's multi-similarity (same alpha, beta, base; PML's miner with our epsilon)
    on a small CPU batch: a line saying whether they agree, or None without PML."""
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        return None
    try:
        x, labels = make_inputs(CHECK_BATCH)
        with torch.no_grad():
            ours = float(build_ours("multi_similarity")(x, labels))
            pml = float(build_pml("multi_similarity")(x, labels))
    except Exception as error:  # reported, not fatal
        return f"WARNING: multi_similarity check at B = {CHECK_BATCH} failed: {first_line(error)}"
    if values_agree(ours, pml):
        return f"multi_similarity: ours = PML = {ours:.6f} at B = {CHECK_BATCH} (CPU)"
    return (
        f"WARNING: multi_similarity differs from PML at B = {CHECK_BATCH} (CPU): ours "
        f"{ours:.6f}, PML {pml:.6f}"
    )


def value_warnings(results: Sequence[Result]) -> list[str]:
    """Multi-similarity values of ours and PML that differ at the same B (same inputs)."""
    found = {(r.impl, r.loss, r.batch_size): r for r in results}
    lines = []
    for (impl, loss, batch_size), ours in sorted(found.items()):
        pml = found.get(("pml", loss, batch_size))
        if impl != "ours" or loss != "multi_similarity" or pml is None:
            continue
        if ours.value is None or pml.value is None:
            continue
        if not values_agree(ours.value, pml.value, 1e-3):
            lines.append(
                f"WARNING: multi_similarity at B = {batch_size} on {ours.device}: ours "
                f"{ours.value:.6f}, PML {pml.value:.6f}"
            )
    return lines


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
        pass
    if name == "deepmetric":  # run from a source tree (PYTHONPATH=src), not installed
        try:
            import deepmetric

            return f"{deepmetric.__version__} (source, {os.path.dirname(deepmetric.__file__)})"
        except ImportError:
            pass
    return "not installed"


def nvidia_driver() -> str:
    """The driver version from nvidia-smi, or "unknown"."""
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


def device_facts(device: str) -> dict[str, str]:
    """The accelerator's name, CUDA and driver versions (CUDA), for the table's header."""
    if device != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "gpu": torch.cuda.get_device_name(0),
        "cuda": str(torch.version.cuda),
        "driver": nvidia_driver(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
    }


def machine_facts(args: argparse.Namespace) -> dict[str, str]:
    return {
        "device": args.device,
        **device_facts(args.device),
        "torch": torch.__version__,
        "threads": str(args.threads),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "python": platform.python_version(),
        "deepmetric": package_version("deepmetric"),
        "pytorch-metric-learning": package_version("pytorch-metric-learning"),
    }


def caption(args: argparse.Namespace) -> str:
    """One line naming where the table was measured."""
    facts = machine_facts(args)
    if args.device == "cuda":
        return (
            f"Device: {facts.get('gpu', 'CUDA (unavailable)')}, driver "
            f"{facts.get('driver', 'unknown')}; torch {facts['torch']}, CUDA "
            f"{facts.get('cuda', 'unknown')}"
        )
    return f"Device: CPU, {facts['cpu']}, {args.threads} torch threads; torch {facts['torch']}"


def time_cell(result: Result | None) -> str:
    if result is None:
        return "—"
    if result.status == "ok":
        return f"{result.median_ms:.1f}" if result.median_ms >= 1 else f"{result.median_ms:.2f}"
    if result.status in ("skip", "timeout") and result.detail:
        return f"{result.status} ({result.detail})"
    return result.status


def mem_cell(result: Result | None, gib: bool) -> str:
    if not (result and result.status == "ok" and result.peak_mib is not None):
        return "—"
    return f"{result.peak_mib / 1024:.2f}" if gib else f"{result.peak_mib:.0f}"


def ratio_cell(top: Result | None, bottom: Result | None, suffix: str = "") -> str:
    if not (top and bottom and top.status == bottom.status == "ok"):
        return "n/a"
    assert top.median_ms is not None and bottom.median_ms is not None
    return f"{top.median_ms / max(bottom.median_ms, 1e-9):.2f}{suffix}"


def header(unit: str) -> tuple[str, ...]:
    return (
        "loss",
        "B",
        "ours ms",
        f"ours {unit}",
        "floor ms",
        "ours/floor",
        "dense ms",
        f"dense {unit}",
        "pml ms",
        f"pml {unit}",
        "pml/floor",
        "pml/ours",
    )


def table(results: Sequence[Result], device: str = "cpu") -> str:
    """One row per (loss, B) and a floor row per B; memory in GiB on CUDA, MiB on the CPU."""
    gib = device == "cuda"
    head = header("GiB" if gib else "MiB")
    found = {(r.impl, r.loss, r.batch_size): r for r in results}
    keys = {(r.loss, r.batch_size) for r in results}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss in (FLOOR_LOSS, *LOSSES):
        for batch_size in sorted(b for name, b in keys if name == loss):
            floor = found.get(("floor", FLOOR_LOSS, batch_size))
            if loss == FLOOR_LOSS:
                cells = ["—"] * (len(head) - 6)
                row = (f"floor ({FLOOR_LOSS})", str(batch_size), "—", mem_cell(floor, gib))
                row += (time_cell(floor), "1.00" if floor and floor.status == "ok" else "n/a")
                lines.append("| " + " | ".join(row + tuple(cells)) + " |")
                continue
            ours, dense, pml = (found.get((impl, loss, batch_size)) for impl in IMPLEMENTATIONS[1:])
            row = (
                loss,
                str(batch_size),
                time_cell(ours),
                mem_cell(ours, gib),
                time_cell(floor),
                ratio_cell(ours, floor),
                time_cell(dense),
                mem_cell(dense, gib),
                time_cell(pml),
                mem_cell(pml, gib),
                ratio_cell(pml, floor),
                ratio_cell(pml, ours, "×"),
            )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def failures(results: Sequence[Result]) -> str:
    """The detail of every OOM, error and timeout, one line each."""
    lines = [
        f"- {r.impl} {r.loss} B={r.batch_size}: {r.status}: {r.detail}"
        for r in results
        if r.status in ("OOM", "error", "timeout") and r.detail
    ]
    return "Failures\n" + "\n".join(lines) if lines else ""


def footnotes(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        where = (
            "float32 embeddings made on the CPU and moved to the CUDA device. Time: median "
            "forward + backward between two CUDA events (synchronised) after a warm-up"
        )
        memory = (
            "GiB: torch.cuda.max_memory_allocated() over the timed runs (peak stats reset after "
            "the warm-up) minus the memory allocated just before them (the inputs), i.e. the "
            "extra memory the caching allocator handed out. The configurations of one B run in "
            "one process (PML in another), with a wall-clock timeout each and no RLIMIT_AS; a "
            "CUDA out-of-memory error shows as OOM"
        )
    else:
        where = (
            f"L2-normalised float32 embeddings, CPU, torch.set_num_threads({args.threads}). "
            "Time: median forward + backward after a warm-up"
        )
        memory = (
            "MiB: peak RSS (ru_maxrss) after the runs minus the RSS just before the first "
            "forward (inputs already built). Each configuration runs in its own process under "
            "RLIMIT_AS (virtual memory: ~1 GiB of it is libraries) and a wall-clock timeout; "
            "OOM = an allocation failed or the process was killed"
        )
    return f"""\
Notes
- Inputs: D = {DIM}, {PER_CLASS} samples per class (labels shuffled), {where} (fewer repeats
  once a configuration's total passes {args.time_budget:g} s).
- {memory}.
- floor: deepmetric.distances.pairwise(x).sum().backward(), the (B, B) distance matrix alone.
  ours/floor, pml/floor: how far each loss is from that floor at the same B. pml/ours > 1:
  ours is faster.
- dense: brute-force PyTorch written independently of deepmetric; batch_all and semi_hard build
  (B, B, B) tensors (skipped when one float32 B^3 tensor exceeds --mem-cap-gb), the others are
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
    copy is ~12 GiB at B = 1024;
  * multi_similarity: MultiSimilarityMiner(epsilon) + MultiSimilarityLoss(alpha, beta, base)
    with ours' defaults; mean over all anchors (MeanReducer), the same value as ours (checked
    on a small batch before the runs, and at every B where both ran)."""


def print_header(args: argparse.Namespace) -> None:
    print("# Loss benchmark\n")
    for name, value in machine_facts(args).items():
        print(f"- {name}: {value}")
    print(f"- command: {shlex.join([sys.executable, *sys.argv])}")
    budget = f", budget: {args.budget:g} s" if args.budget else ""
    if args.device == "cpu":
        limits = f"memory cap: {args.mem_cap_gb:g} GiB (RLIMIT_AS), timeout: {args.timeout:g} s"
    else:
        limits = f"timeout: {args.timeout:g} s per configuration (no RLIMIT_AS on CUDA)"
    print(f"- {limits}{budget}\n")
    sys.stdout.flush()


def write_json(path: str, args: argparse.Namespace, results: Sequence[Result]) -> None:
    payload = {
        "machine": machine_facts(args),
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "memory": "cuda allocator peak" if args.device == "cuda" else "peak RSS",
        "results": [asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the losses of deepmetric.")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=TIME_BUDGET_S,
        help="seconds per configuration after which no further repeat starts",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per config")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (then: skip)"
    )
    parser.add_argument(
        "--mem-cap-gb",
        type=float,
        default=12.0,
        help="RLIMIT_AS per config (CPU); dense B^3 forms larger than this are not started",
    )
    parser.add_argument(
        "--process-per",
        choices=("config", "batch"),
        help="a child process per configuration (default on the CPU: its own RSS peak) or "
        "per B (default on CUDA: one CUDA context for all the losses at that B; on the CPU "
        "the RSS peak then holds only for each process's first configuration)",
    )
    parser.add_argument("--pml-max-batch", type=int, default=None, help="skip PML above this B")
    parser.add_argument(
        "--only", nargs="+", choices=LOSSES + IMPLEMENTATIONS, help="losses and/or impls"
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--worker",
        nargs=3,
        action="append",
        metavar=("IMPL", "LOSS", "B"),
        help="internal: run these configurations and print one JSON line each",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here")
    print_header(args)
    only = set(args.only or ())
    if (not only & set(LOSSES) or "multi_similarity" in only) and (
        not only & set(IMPLEMENTATIONS) or "pml" in only
    ):
        check = check_multi_similarity_small()
        if check:
            print(f"{check}\n", flush=True)
            print(check, file=sys.stderr, flush=True)
    results = run_all(args)
    print(caption(args) + "\n")
    print(table(results, args.device))
    print()
    for line in value_warnings(results):
        print(line)
        print(line, file=sys.stderr)
    notes = failures(results)
    if notes:
        print(notes + "\n")
    print(footnotes(args))
    if args.json:
        write_json(args.json, args, results)


if __name__ == "__main__":
    main()

"""Training on several processes with PyTorch's own engine, ``torch.distributed``.

One global P x K batch per step, whatever the number of processes: every rank draws the same
global batch (same seed), takes its contiguous slice (:func:`shard`), embeds it, and
:func:`gather` puts the slices back together in rank order, so the loss and the mining see the
whole global batch, exactly as one process would. The gradient flows back through the gather:
its backward sums the gradient of the concatenated batch over all ranks and keeps this rank's
slice. Every rank computes the same global loss, so that sum is ``world_size`` times the
single-process gradient of the slice, and after DistributedDataParallel averages the parameter
gradients over ranks they equal those of one process on the global batch.

Launch N local processes with ``deepmetric train CONFIG --nproc N`` (through
``torch.distributed.run``, the engine of ``torchrun``), or on several machines with
``torchrun --nnodes ... -m deepmetric train CONFIG``; :func:`init_from_env` joins the group that
``torchrun`` describes in the environment (gloo on CPUs, nccl on GPUs). Without a process group
(or with one process) every function here is the identity / a no-op.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, logs, the summary, and evaluates."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` / ``torch.distributed.run`` started as one of
    several (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_processes() -> int:
    """The processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``, else
    ``WORLD_SIZE``; 1 outside ``torchrun``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def on_cuda(device: str, processes: int) -> bool:
    """Whether ``processes`` processes on this machine training on ``device`` (``train.device``)
    take one GPU each (nccl) rather than the CPU (gloo).

    ``auto``: the GPUs when there are at least as many as processes, else the CPU. ``cuda``:
    the GPUs, and a ``ValueError`` (one line, before any process starts) when there are fewer
    than processes. ``cuda:N`` names one GPU: fine for one process, an error for several (they
    would share it; use ``cuda`` or ``auto``). Anything else: the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return 0 < processes <= gpus
    if not device.startswith("cuda"):
        return False
    if gpus == 0:
        raise ValueError(f"train.device={device}: CUDA is not available here")
    if ":" in device and processes > 1:
        raise ValueError(
            f"train.device={device} names one GPU for {processes} processes: use "
            "train.device=cuda (one GPU per process) or auto"
        )
    if processes > gpus:
        raise ValueError(
            f"train.device={device}: {processes} processes need one GPU each and this machine "
            f"has {gpus}: use --nproc {gpus}, or train.device=cpu (gloo)"
        )
    return True


def init_from_env(device: str = "auto") -> None:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``).

    On CUDA (:func:`on_cuda`: ``cuda``, or ``auto`` with a GPU for every local process) each
    process takes GPU ``LOCAL_RANK`` (``cuda:N`` with one process per machine: GPU N) and the
    group runs nccl for CUDA tensors and gloo for the few CPU ones (:func:`mean`,
    :func:`largest`, :func:`broadcast`); otherwise gloo. ``auto`` with fewer GPUs than processes
    says once (rank 0, on stderr) that it trains on the CPU. Does nothing if already joined."""
    if dist.is_initialized():
        return
    processes = local_processes()
    if not on_cuda(device, processes):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device == "auto" and gpus and int(os.environ.get("RANK", "0")) == 0:
            print(
                f"note: train.device=auto: {processes} processes and {gpus} "
                f"GPU{'s' * (gpus != 1)} on this machine, so training on the CPU (gloo); "
                f"--nproc {gpus} or fewer trains on the GPUs",
                file=sys.stderr,
                flush=True,
            )
        dist.init_process_group("gloo")
        return
    named = torch.device(device) if device.startswith("cuda:") else None
    index = named.index if named is not None else int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.device("cuda", index)
    torch.cuda.set_device(gpu)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=gpu)


def process_device(device: str) -> torch.device | None:
    """Where this process of a group trains for ``train.device`` = ``device``: in a group with
    nccl, ``auto`` and ``cuda`` mean this process's own GPU (the current one); in a gloo group,
    ``auto`` means the CPU. ``None`` outside a group, or when ``device`` names one (then it is
    used as named)."""
    if not is_distributed() or device not in ("auto", "cuda"):
        return None
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device == "auto" else None


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End this process now with ``code``, stdout and stderr flushed, skipping the interpreter's
    teardown. For the worker processes of a distributed run: with torch 2.13 on CPU, a process
    that used DistributedDataParallel over gloo aborts in about one exit in seven ("terminate
    called without an active exception", SIGABRT) while the interpreter tears down, even after
    ``destroy_process_group``, which turns a finished run into a failed one (measured here: 2
    aborts in 12 two-process runs, 0 in 24 with this exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of ``rank``'s contiguous slice of ``n`` items: sizes differ by at most
    one, the first ``n % world_size`` ranks take one more (``numpy.array_split``'s rule)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(batch: torch.Tensor, which: int | None = None, world: int | None = None) -> torch.Tensor:
    """Rank ``which``'s (default: this rank's) contiguous slice of a global ``batch`` of
    indices or items, out of ``world`` ranks (default: the process group's size)."""
    which = rank() if which is None else which
    start, stop = shard_bounds(len(batch), which, world_size() if world is None else world)
    return batch[start:stop]


def _all_gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The (sum n_r, ...) concatenation over ranks in rank order and the per-rank row counts.
    Slices may differ in length: they are padded to the longest for the collective."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], dtype=torch.long, device=x.device))
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = x
    if len(x) < longest:
        padded = torch.cat([x, x.new_zeros((longest - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]), counts


class _GatherWithGradient(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the incoming gradient over ranks
    (every rank holds the gradient of its own copy of the global loss) and keep this rank's
    rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        full, counts = _all_gather_rows(x)
        start = sum(counts[: rank()])
        ctx.bounds = (start, start + len(x))
        return full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, stop = ctx.bounds
        return grad[start:stop]


def gather(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global_embeddings (sum B_r, D), global_labels (sum B_r,))``: every rank's
    ``embeddings (B_r, D)`` and ``labels (B_r,)`` concatenated in rank order.

    Differentiable in ``embeddings``: on every rank ``embeddings.grad == world_size x`` the
    gradient that one process computing the same loss on the concatenated batch would give
    that rank's rows (DDP's averaging then makes the parameter gradients those of one process).
    Every rank must call it with the same trailing shape and dtype. Without a process group of
    more than one process it returns its arguments unchanged.
    """
    if not is_distributed():
        return embeddings, labels
    full_labels, _ = _all_gather_rows(labels)
    return _GatherWithGradient.apply(embeddings), full_labels


def local(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-process "gather": its arguments, unchanged (what the training modes use for
    validation, which rank 0 runs alone)."""
    return embeddings, labels


def mean(value: float) -> float:
    """The mean of ``value`` over ranks (the value itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world_size()


def largest(value: int) -> int:
    """The largest ``value`` over ranks: how ranks agree to stop when any one received a
    signal, so that all stop at the same batch."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value made by this program, such as an epoch
    record: never data read from a file a user handed in)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)  # pickled by rank 0 of this very run
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


__all__ = [
    "barrier",
    "broadcast",
    "exit_process",
    "gather",
    "init_from_env",
    "is_distributed",
    "is_main",
    "largest",
    "launched_by_torchrun",
    "local",
    "local_processes",
    "mean",
    "on_cuda",
    "process_device",
    "rank",
    "shard",
    "shard_bounds",
    "shutdown",
    "world_size",
]

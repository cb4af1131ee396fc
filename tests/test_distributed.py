"""Distributed training with real processes: torch.distributed over gloo on loopback.

The claims of :mod:`deepmetric.distributed`: the gather's gradient is ``world_size`` times the
one-process gradient of the rank's slice for every loss of the core; after DDP the parameter
gradients equal one process's on the global batch; ``deepmetric train --nproc 2`` ends with the
weights of a one-process run on the same global batches; only rank 0 writes; a 2-process run
resumes in one process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from synthetic import write_learnable_idx
from torch import nn

from deepmetric import distributed
from deepmetric.checkpoints import latest_checkpoint, load_checkpoint
from deepmetric.data import ArrayDataset, PKSampler, augment
from deepmetric.losses import ContrastiveLoss, LiftedStructuredLoss, TripletLoss

WORLD = 2
B, D = 23, 6  # an odd batch: the slices are 12 and 11 rows


def _losses() -> dict[str, nn.Module]:
    return {
        "batch_all": TripletLoss(margin=0.5, mining="batch_all"),
        "batch_hard": TripletLoss(margin=0.5, mining="batch_hard"),
        "semi_hard": TripletLoss(margin=0.5, mining="semi_hard"),
        "soft_batch_all": TripletLoss(soft=True, mining="batch_all"),
        "contrastive": ContrastiveLoss(margin=1.0),
        "lifted": LiftedStructuredLoss(margin=1.0),
    }


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (B,), generator=g)
    x = torch.randn(B, 10, generator=g, dtype=torch.float64)
    return emb, labels, x


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, D)).double()


@contextlib.contextmanager
def _ending_the_process() -> Iterator[None]:
    """Run the body, leave the process group, and end the worker process through
    ``distributed.exit_process`` (exit 1 with the traceback printed if the body failed):
    torch's gloo can abort in the interpreter teardown after DDP (see ``exit_process``)."""
    code = 0
    try:
        yield
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        dist.destroy_process_group()
        distributed.exit_process(code)


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    with _ending_the_process():
        emb, labels, x = _global_batch()
        results: dict[str, torch.Tensor] = {}
        for name, loss in _losses().items():
            mine = distributed.shard(emb).clone().requires_grad_()
            all_emb, all_labels = distributed.gather(mine, distributed.shard(labels))
            results[f"{name}.global"] = all_emb.detach()
            results[f"{name}.labels"] = all_labels
            loss(all_emb, all_labels).backward()
            results[f"{name}.grad"] = mine.grad
        net = nn.parallel.DistributedDataParallel(_net())
        all_emb, all_labels = distributed.gather(
            net(distributed.shard(x)), distributed.shard(labels)
        )
        TripletLoss(margin=0.5)(all_emb, all_labels).backward()
        for i, p in enumerate(net.module.parameters()):
            results[f"param{i}.grad"] = p.grad
        torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("gather")
    init = f"file://{folder / 'rendezvous'}"
    mp.start_processes(_worker, args=(init, str(folder)), nprocs=WORLD, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(_losses()))
def test_gather_gradient_is_world_size_times_the_single_process_gradient(gathered, name):
    emb, labels, _ = _global_batch()
    single = emb.clone().requires_grad_()
    _losses()[name](single, labels).backward()
    assert single.grad.abs().sum() > 0  # the loss has something to learn from
    for r, result in enumerate(gathered):
        assert torch.equal(result[f"{name}.global"], emb)  # rank order, padding trimmed
        assert torch.equal(result[f"{name}.labels"], labels)
        start, stop = distributed.shard_bounds(B, r, WORLD)
        torch.testing.assert_close(result[f"{name}.grad"], WORLD * single.grad[start:stop])


def test_after_ddp_the_parameter_gradients_are_those_of_one_process(gathered):
    _, labels, x = _global_batch()
    net = _net()
    TripletLoss(margin=0.5)(net(x), labels).backward()
    for result in gathered:
        for i, p in enumerate(net.parameters()):
            torch.testing.assert_close(result[f"param{i}.grad"], p.grad)


def test_without_a_process_group_gather_is_the_identity():
    emb, labels, _ = _global_batch()
    out_emb, out_labels = distributed.gather(emb, labels)
    assert out_emb is emb and out_labels is labels
    assert distributed.world_size() == 1 and distributed.is_main()


@pytest.mark.parametrize("n,world", [(23, 2), (24, 2), (7, 3), (2, 3), (0, 2)])
def test_shards_are_contiguous_disjoint_and_cover_the_batch(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_bounds(n, world, world)


def test_distributed_pk_sampler_slices_are_the_one_process_batches():
    labels = np.repeat(np.arange(6), 9)
    whole = PKSampler(labels, 4, 3, seed=5)
    parts = [PKSampler(labels, 4, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for s in [whole, *parts]:
        s.set_epoch(3)
    rows = list(zip(whole, *parts, strict=True))
    assert len(rows) == len(whole) == len(parts[0])
    for batch, first, second in rows:
        assert first + second == batch and not set(first) & set(second)
    used = [i for batch, *_ in rows for i in batch]
    assert len(used) == len(set(used))  # an epoch uses each item at most once across ranks
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, 4, 3, rank=2, world_size=2)


def test_augmenting_a_slice_with_its_offset_equals_slicing_the_augmented_batch():
    x = torch.rand(9, 1, 8, 8)
    whole = augment(x, torch.Generator().manual_seed(3))
    part = augment(x[5:], torch.Generator().manual_seed(3), batch_size=9, offset=5)
    assert torch.equal(part, whole[5:])
    with pytest.raises(ValueError, match="inside a batch"):
        augment(x[5:], torch.Generator().manual_seed(3), batch_size=6, offset=5)


def _fit_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    with _ending_the_process():
        torch.save(_fit_once().state_dict(), Path(out) / f"fit{rank}.pt")


def _fit_once() -> nn.Module:
    from deepmetric import fit

    g = torch.Generator().manual_seed(2)
    y = torch.arange(40) % 5
    x = torch.randn(40, 10, generator=g) + y[:, None].float()
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    return fit(
        net,
        ArrayDataset(x, y),
        loss=TripletLoss(margin=0.3),
        epochs=2,
        p=5,
        k=3,
        optimizer="sgd",
        lr=0.05,
        amp=False,  # bfloat16 would round each slice's products otherwise than the whole batch's
        device="cpu",  # a gloo group: the CPU (tests/test_cuda.py runs nccl on GPUs)
        stream=None,
    )


def test_fit_inside_a_process_group_equals_one_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_fit_worker, args=(init, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    one = _fit_once().state_dict()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"fit{r}.pt", weights_only=True)
        for key, value in one.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "toy", n_train=30)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "deepmetric", *args], env=env, capture_output=True, text=True
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run))[0]


def test_nproc_2_ends_with_the_weights_of_one_process_and_only_rank_0_writes(idx_dir, tmp_path):
    # 6 classes x 27 training items, P x K = 4 x 8: 6 global batches (6 steps) per epoch;
    # augmentation on, so each rank's slice must be augmented as the whole batch is. SGD: its
    # step is linear in the gradient (Adam's first steps are ~lr * sign(g), which turns float
    # rounding in a near-zero gradient into a full step).
    args = [
        "train.device=cpu",  # gloo on the CPU, whatever GPUs the machine has
        "model.backbone=small_cnn",  # no BatchNorm: it would normalise each slice on its own
        "train.amp=false",  # float32: bfloat16 rounds a slice otherwise than the whole batch
        "train.optimizer=sgd",
        "train.lr=0.05",
        # the soft margin, smooth: with the hinge, a change in float rounding (the losses'
        # tiles) moved 1 weight of 64 by 1.6e-5 between one and two processes
        "loss.soft=true",
        f"data=idx:{idx_dir}",
        "model.dim=16",
        "train.p=4",
        "train.k=8",
        "train.log_every=1",
        "train.augment=true",
        "epochs=1",
    ]
    one = _cli("train", *args, f"out={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = _cli("train", *args, f"out={tmp_path / 'two'}", "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done:") == 1  # rank 0 alone reports
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:  # float32 sums in another order: measured up to 2.8e-5 on one weight of
        # 256 (an Intel machine, the in-place euclidean backward of 2026-12-05); none above 1e-5
        # on the AMD one before
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if r["kind"] == "step"]
    assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))  # once each, by rank 0
    assert sum(r["kind"] == "summary" for r in log) == 1

    # a 2-process run resumes in one process: the global batches do not depend on N
    more = _cli("train", "--resume", str(tmp_path / "two"), "epochs=2")
    assert more.returncode == 0, more.stderr
    again = _cli("train", "--resume", str(tmp_path / "one"), "epochs=2", "--nproc", "2")
    assert again.returncode == 0, again.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)  # as above


def test_nproc_errors_are_one_line(idx_dir, tmp_path):
    bad = _cli("train", f"data=idx:{idx_dir}", f"out={tmp_path / 'x'}", "--nproc", "0")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "--nproc must be >= 1" in bad.stderr
    first = _cli("train", f"data=idx:{idx_dir}", f"out={tmp_path / 'taken'}", "model.dim=8")
    assert first.returncode == 0, first.stderr
    taken = _cli("train", f"data=idx:{idx_dir}", f"out={tmp_path / 'taken'}", "--nproc", "2")
    assert taken.returncode == 2 and taken.stderr.strip().count("\n") == 0, taken.stderr
    assert "already holds a run" in taken.stderr


def test_sigterm_stops_every_process_at_the_same_batch_and_saves(idx_dir, tmp_path):
    run = tmp_path / "run"
    args = [f"data=idx:{idx_dir}", f"out={run}", "model.dim=8", "train.p=3", "train.k=4"]
    args.append("train.device=cpu")  # gloo on the CPU, whatever GPUs the machine has
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deepmetric", "train", *args, "epochs=500", "--nproc", "2"]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and '"kind": "epoch"' in log.read_text()):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.count("interrupted: checkpoint saved") == 1  # rank 0 saved, once
    _, state = load_checkpoint(latest_checkpoint(run))
    assert state["position"]["epoch"] < 500
    more = _cli("train", "--resume", str(run), f"epochs={state['position']['epoch'] + 1}")
    assert more.returncode == 0, more.stderr


def test_a_cross_batch_memory_holds_global_batches(idx_dir, tmp_path):
    """With loss.memory the memory of every rank holds the gathered global batches: the
    2-process run ends with the one-process weights and the same memory."""
    args = [
        f"data=idx:{idx_dir}",
        "train.device=cpu",  # gloo on the CPU, whatever GPUs the machine has
        "mode=batch",
        "model.backbone=small_cnn",  # no BatchNorm: it would normalise each slice on its own
        "train.amp=false",  # float32: bfloat16 rounds a slice otherwise than the whole batch
        "model.dim=8",
        "train.p=4",
        "train.k=8",
        "train.optimizer=sgd",
        "train.lr=0.05",
        "loss.memory=48",
        "loss.memory_start=2",
        "epochs=1",
    ]
    one = _cli("train", *args, f"out={tmp_path / 'one'}")
    two = _cli("train", *args, f"out={tmp_path / 'two'}", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    (a, state_a), (b, state_b) = (
        load_checkpoint(latest_checkpoint(tmp_path / r)) for r in ("one", "two")
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    memory_a, memory_b = (s["loss"]["_extra_state"] for s in (state_a, state_b))
    assert memory_a["count"] == memory_b["count"] == 48
    assert torch.equal(memory_a["labels"], memory_b["labels"])
    torch.testing.assert_close(memory_b["embeddings"], memory_a["embeddings"], atol=1e-4, rtol=0)

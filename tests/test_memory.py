"""CrossBatchMemory: the ring buffer, the loss it adds, its state in checkpoints, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference
import torch
from synthetic import write_learnable_idx

from deepmetric.checkpoints import latest_checkpoint, load_checkpoint
from deepmetric.components import load_checked_config
from deepmetric.config import ConfigError
from deepmetric.losses import ContrastiveLoss, CrossBatchMemory, TripletLoss
from deepmetric.training import resume_config, train


def _batches(n: int, b: int = 6, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (b,), generator=g),
        )
        for _ in range(n)
    ]


def test_an_empty_memory_is_the_plain_loss_values_and_gradients():
    ((emb, labels),) = _batches(1)
    plain = TripletLoss(margin=0.5)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    value = CrossBatchMemory(plain, size=10)(a, labels)
    expected = plain(b, labels)
    value.backward()
    expected.backward()
    assert torch.equal(value, expected) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("size", [1, 5, 6, 13, 100])
def test_the_memory_holds_exactly_the_last_size_samples(size):
    memory = CrossBatchMemory(TripletLoss(), size=size)
    seen_e, seen_y = [], []
    for emb, labels in _batches(5):
        memory(emb, labels)
        seen_e += list(emb)
        seen_y += list(labels)
        held_e, held_y = memory.memory()
        assert torch.equal(held_e, torch.stack(seen_e[-size:]))
        assert torch.equal(held_y, torch.stack(seen_y[-size:]))


def _reference_triplet_sum(emb, labels, ref, ref_labels, margin):
    """Batch-all triplet loss against a reference set, from plain loops."""
    triplets = reference.valid_triplets(labels.tolist(), ref_labels.tolist())
    d = reference.matrix(emb, ref, "euclidean")
    losses = [torch.relu(d[a][p] - d[a][n] + margin) for a, p, n in triplets]
    active = [v for v in losses if v > 0]
    return sum(active) / len(active) if active else emb.sum() * 0


def test_the_added_term_compares_the_batch_with_the_earlier_samples_only():
    batches = _batches(3)
    memory = CrossBatchMemory(TripletLoss(margin=0.5), size=8, weight=0.5)
    for emb, labels in batches[:2]:
        memory(emb, labels)
    held, held_labels = memory.memory()
    emb, labels = batches[2]
    x = emb.clone().requires_grad_()
    memory(x, labels).backward()
    y = emb.clone().requires_grad_()
    expected = TripletLoss(margin=0.5)(y, labels) + 0.5 * _reference_triplet_sum(
        y, labels, held, held_labels, 0.5
    )
    expected.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert not held.requires_grad  # detached: no gradient reaches earlier batches


def test_the_memory_starts_after_start_training_calls():
    memory = CrossBatchMemory(TripletLoss(), size=50, start=2)
    batches = _batches(4)
    for emb, labels in batches[:2]:
        assert torch.equal(memory(emb, labels), TripletLoss()(emb, labels))
        assert len(memory.memory()[0]) == 0
    memory(*batches[2])
    assert torch.equal(memory.memory()[0], batches[2][0])
    restored = CrossBatchMemory(TripletLoss(), size=50, start=2)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored(*batches[3]), memory(*batches[3]))


def test_eval_mode_neither_reads_nor_writes_the_memory():
    memory = CrossBatchMemory(TripletLoss(), size=10)
    (e1, y1), (e2, y2) = _batches(2)
    memory(e1, y1)
    memory.eval()
    assert torch.equal(memory(e2, y2), TripletLoss()(e2, y2))
    assert torch.equal(memory.memory()[0], e1)


def test_the_memory_is_in_the_state_dict():
    first = CrossBatchMemory(TripletLoss(), size=9)
    batches = _batches(4)
    for emb, labels in batches[:3]:
        first(emb, labels)
    second = CrossBatchMemory(TripletLoss(), size=9)
    second.load_state_dict(first.state_dict())
    emb, labels = batches[3]
    assert torch.equal(first(emb, labels), second(emb, labels))
    assert all(torch.equal(a, b) for a, b in zip(first.memory(), second.memory(), strict=True))
    with pytest.raises(ValueError, match="slots"):
        CrossBatchMemory(TripletLoss(), size=4).load_state_dict(first.state_dict())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="ref_embeddings"):
        CrossBatchMemory(ContrastiveLoss(), size=4)
    with pytest.raises(ValueError, match="size"):
        CrossBatchMemory(TripletLoss(), size=0)
    memory = CrossBatchMemory(TripletLoss(), size=4)
    memory(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="dimension"):
        memory(torch.randn(4, 5), torch.tensor([0, 0, 1, 1]))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "toy", n_train=24)


def _config(idx_dir: Path, out: Path, *overrides: str):
    base = [f"data=idx:{idx_dir}", f"out={out}", "mode=batch", "model.dim=8", "train.p=3"]
    base.append("train.device=cpu")  # resumes bit for bit: one device's kernels
    options = ["train.k=4", "train.schedule=step", "loss.memory=40"]  # step: epoch 1 the same
    return load_checked_config(None, [*base, *options, *overrides])


def test_training_with_a_memory_resumes_exactly(idx_dir, tmp_path):
    train(_config(idx_dir, tmp_path / "full", "epochs=2"), stream=None)
    train(_config(idx_dir, tmp_path / "part", "epochs=1"), stream=None)
    _, state = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert state["loss"]["_extra_state"]["count"] == 40  # the memory was saved, full
    train(resume_config(tmp_path / "part", ["epochs=2"]), resume=True, stream=None)
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "part"))
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert torch.equal(
        a[1]["loss"]["_extra_state"]["embeddings"], b[1]["loss"]["_extra_state"]["embeddings"]
    )


def test_a_memory_needs_a_batch_triplet_loss(idx_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"loss\.memory"):
        _config(idx_dir, tmp_path / "x", "loss.name=contrastive")
    with pytest.raises(ConfigError, match=r"loss\.memory"):
        _config(idx_dir, tmp_path / "x", "loss.memory=-1")

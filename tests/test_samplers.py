"""Tests for deepmetric.data.samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from deepmetric.data import (
    ArrayDataset,
    PairSampler,
    PKSampler,
    balanced_pairs,
    random_triplets,
)


def make_labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Labels with ``counts[c]`` samples of class ``10 * c`` (non-contiguous ids), shuffled."""
    y = np.concatenate([np.full(n, 10 * c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(y)


def check_pk_batch(batch: list[int], labels: np.ndarray, p: int, k: int) -> None:
    assert len(batch) == p * k
    per_class = Counter(labels[batch].tolist())
    assert len(per_class) == p and set(per_class.values()) == {k}
    for c in range(p):  # grouped: k of one class, then k of the next
        assert len(set(labels[batch[c * k : (c + 1) * k]].tolist())) == 1


def test_pk_batches_have_p_classes_times_k() -> None:
    labels = make_labels([9, 12, 7, 2, 8, 15])
    sampler = PKSampler(labels, p=3, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        check_pk_batch(batch, labels, 3, 4)
        idx = batch[:4]  # a class with >= k samples never repeats inside its chunk
        if (labels == labels[idx[0]]).sum() >= 4:
            assert len(set(idx)) == 4


def test_pk_epoch_covers_every_sample() -> None:
    labels = make_labels([8, 8, 8, 8, 8, 8, 12, 4])  # 16 chunks of 4, P=4: none left over
    sampler = PKSampler(labels, p=4, k=4, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler for i in batch]
        assert len(sampler) == 4
        assert set(seen) == set(range(len(labels)))


def test_pk_small_classes_filled_with_replacement() -> None:
    labels = make_labels([2, 4, 3])
    sampler = PKSampler(labels, p=3, k=4, seed=0)
    batches = list(sampler)
    for batch in batches:
        check_pk_batch(batch, labels, 3, 4)
    covered = {i for batch in batches for i in batch}
    assert covered == set(range(len(labels)))


def test_pk_deterministic_and_epochs_differ() -> None:
    labels = make_labels([20] * 10)
    a, b = PKSampler(labels, 4, 5, seed=7), PKSampler(labels, 4, 5, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again replays the same epoch
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PKSampler(labels, 4, 5, seed=8)) != first


def test_pk_state_dict_round_trip() -> None:
    labels = make_labels([6, 6, 6, 6])
    a = PKSampler(labels, 2, 3, seed=5)
    a.set_epoch(4)
    state = a.state_dict()
    assert state == {"seed": 5, "epoch": 4}
    b = PKSampler(labels, 2, 3)
    b.load_state_dict(state)
    assert list(b) == list(a)


def test_pk_errors() -> None:
    labels = make_labels([3, 3])
    with pytest.raises(ValueError, match="p=3 classes per batch, but only 2 classes"):
        PKSampler(labels, 3, 2)
    with pytest.raises(ValueError, match=r"p \(classes per batch\) must be >= 1"):
        PKSampler(labels, 0, 2)
    with pytest.raises(ValueError, match=r"k \(samples per class\) must be >= 1"):
        PKSampler(labels, 2, 0)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    p=st.integers(1, 8),
    k=st.integers(1, 5),
    seed=st.integers(0, 3),
)
def test_pk_len_matches_iteration(counts: list[int], p: int, k: int, seed: int) -> None:
    p = min(p, len(counts))
    labels = make_labels(counts, seed)
    sampler = PKSampler(torch.from_numpy(labels), p, k, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        check_pk_batch(batch, labels, p, k)


def test_pk_with_dataloader() -> None:
    labels = torch.from_numpy(make_labels([5, 5, 5]))
    ds = ArrayDataset(torch.randn(15, 2), labels)
    loader = DataLoader(ds, batch_sampler=PKSampler(ds.y, 3, 2))
    xb, yb = next(iter(loader))
    assert xb.shape == (6, 2) and len(yb.unique()) == 3


def test_balanced_pairs() -> None:
    labels = make_labels([4, 1, 6, 3])
    i, j, same = balanced_pairs(labels, 101, seed=2)
    assert i.shape == j.shape == same.shape == (101,)
    assert i.dtype == torch.int64 and same.dtype == torch.bool
    y = torch.from_numpy(labels)
    assert torch.equal(same, y[i] == y[j])
    assert int(same.sum()) == 51 and not torch.any(i[same] == j[same])
    i2, j2, _ = balanced_pairs(labels, 101, seed=2)
    assert torch.equal(i, i2) and torch.equal(j, j2)
    with pytest.raises(ValueError, match="2 classes"):
        balanced_pairs([1, 1, 1], 4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        balanced_pairs([0, 1, 2], 4)


def test_pair_sampler_batches() -> None:
    labels = make_labels([5, 5, 5, 5])
    sampler = PairSampler(labels, batch_size=6, n_pairs=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    sizes = [len(b) // 2 for b in batches]
    assert sizes == [6, 6, 6, 2]
    for batch, b in zip(batches, sizes, strict=True):
        left, right = np.array(batch[:b]), np.array(batch[b:])
        same = labels[left] == labels[right]
        assert same.sum() == b // 2
        assert not np.any(left[same] == right[same])
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_random_triplets() -> None:
    labels = make_labels([3, 1, 5, 2])
    a, p, n = random_triplets(labels, 200, seed=0)
    y = torch.from_numpy(labels)
    assert a.shape == p.shape == n.shape == (200,)
    assert torch.all(y[a] == y[p]) and torch.all(a != p) and torch.all(y[n] != y[a])
    singleton = int(np.flatnonzero(labels == 10)[0])
    assert not torch.any(a == singleton)  # a class of one cannot anchor
    assert set(n.tolist()) == set(range(len(labels)))  # every sample can be a negative
    a2, p2, n2 = random_triplets(labels, 200, seed=0)
    assert torch.equal(a, a2) and torch.equal(p, p2) and torch.equal(n, n2)
    with pytest.raises(ValueError, match="2 classes"):
        random_triplets([4, 4, 4], 5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        random_triplets([0, 1, 2], 5)

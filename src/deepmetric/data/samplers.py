"""Index samplers for metric learning: P x K batches, balanced pairs, random triplets.

Labels are given as a 1-D integer sequence (tensor, array or list) of length N; every
sampler returns indices into it. All randomness comes from ``numpy`` generators seeded
with ``(seed, epoch)``, so a run is reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from deepmetric.distributed import shard

Labels = torch.Tensor | np.ndarray | Sequence[int]


def _as_labels(labels: Labels) -> np.ndarray:
    """Labels as a 1-D int64 array."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer sequence, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _num_batches(chunks: np.ndarray, p: int) -> int:
    """Most batches of ``p`` distinct classes from ``chunks[c]`` chunks per class.

    That is the largest ``t`` with ``sum(min(chunks, t)) >= p * t``; taking the ``p``
    classes with the most chunks left, batch after batch, reaches it.
    """
    lo, hi = 0, int(chunks.sum()) // p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(chunks, mid).sum() >= p * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _EpochState:
    """``seed``/``epoch`` bookkeeping shared by the samplers."""

    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields (call once per epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch"}``: enough to replay the same batches."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = _check_seed(state["seed"])
        self.epoch = int(state["epoch"])


class PKSampler(_EpochState, Sampler[list[int]]):
    """Batches of ``p`` distinct classes x ``k`` samples each; use as ``batch_sampler=``.

    Per epoch each class's indices are shuffled and cut into chunks of ``k``; a last
    partial chunk is topped up with other samples of its class (without repeats inside
    the chunk while the class has ``>= k`` samples), a class with fewer than ``k`` samples
    is topped up by sampling with replacement. Batches take one chunk from each of the
    ``p`` classes with the most chunks left (ties broken at random) until fewer than ``p``
    classes have chunks; the batch order is then shuffled. So each sample is used once
    per epoch as far as class sizes allow. The order depends only on ``(seed, epoch)``.
    Each batch is ``p * k`` indices, grouped by class: ``k`` of the first class, then ...

    Distributed: with ``world_size`` N > 1 every process builds the same global batches and
    yields only slice ``rank`` of each (contiguous, sizes differing by at most one), so the
    ranks' slices of a batch are disjoint, their union is the one-process batch, and an epoch
    covers the data once across ranks.
    """

    def __init__(
        self, labels: Labels, p: int, k: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        y = _as_labels(labels)
        self.classes, inverse = np.unique(y, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(self.classes))
        self._members = np.split(order, np.cumsum(counts)[:-1]) if len(y) else []
        if p < 1:
            raise ValueError(f"p (classes per batch) must be >= 1, got {p}")
        if k < 1:
            raise ValueError(f"k (samples per class) must be >= 1, got {k}")
        if p > len(self.classes):
            raise ValueError(
                f"p={p} classes per batch, but only {len(self.classes)} classes have samples"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size - 1, got {rank} of {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.p, self.k = int(p), int(k)
        self.seed = _check_seed(seed)
        self.epoch = 0
        self._chunks = np.maximum(1, -(-counts // self.k))  # ceil(n / k), >= 1

    def __len__(self) -> int:
        return _num_batches(self._chunks, self.p)

    def _class_chunks(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Per class a ``(n_chunks, k)`` array of shuffled indices."""
        out = []
        for members, n_chunks in zip(self._members, self._chunks, strict=True):
            perm = rng.permutation(members)
            missing = n_chunks * self.k - len(perm)
            if missing and len(perm) >= self.k:
                tail = perm[(n_chunks - 1) * self.k :]
                pool = np.setdiff1d(members, tail)
                extra = rng.choice(pool, size=missing, replace=False)
            else:
                extra = rng.choice(members, size=missing, replace=True)
            out.append(np.concatenate([perm, extra]).reshape(n_chunks, self.k))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, self.epoch)
        chunks = self._class_chunks(rng)
        left = self._chunks.astype(np.int64)
        batches = []
        for _ in range(len(self)):
            key = left + rng.random(len(left))  # most chunks left first, random ties
            chosen = np.argpartition(-key, self.p - 1)[: self.p]
            if left[chosen].min() < 1:  # cannot happen: greedy reaches _num_batches
                raise RuntimeError("PKSampler ran out of chunks")
            chosen = chosen[rng.permutation(self.p)]
            left[chosen] -= 1
            batches.append(np.concatenate([chunks[c][left[c]] for c in chosen]))
        for i in rng.permutation(len(batches)):
            yield shard(torch.from_numpy(batches[i]), self.rank, self.world_size).tolist()


def _by_class(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``order`` (indices sorted by label), and per sample its class's ``start`` and
    ``size`` in ``order`` and its ``rank`` (own position in ``order``)."""
    order = np.argsort(y, kind="stable")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y))
    return order, starts[inverse], counts[inverse], rank


def _positives(y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs ``(a, p)`` with ``y[a] == y[p]`` and ``a != p``; ``a`` uniform over the
    samples whose class has at least 2 samples."""
    order, start, size, rank = _by_class(y)
    eligible = np.flatnonzero(size >= 2)
    if n and not len(eligible):
        raise ValueError("positive pairs need a class with at least 2 samples")
    a = rng.choice(eligible, size=n) if n else np.zeros(0, dtype=np.int64)
    offset = rng.integers(0, size[a] - 1) if n else a  # another member, not a itself
    p = order[start[a] + (rank[a] - start[a] + 1 + offset) % size[a]]
    return a, p


def _negatives(y: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor, a uniformly drawn index with a different label."""
    order, start, size, _ = _by_class(y)
    if len(anchors) and np.any(size == len(y)):
        raise ValueError("negatives need at least 2 classes")
    if not len(anchors):
        return np.zeros(0, dtype=np.int64)
    r = rng.integers(0, len(y) - size[anchors])
    return order[np.where(r < start[anchors], r, r + size[anchors])]


def _pairs(
    y: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_pos`` positive then ``n_neg`` negative pairs ``(i, j)``."""
    pi, pj = _positives(y, n_pos, rng)
    ni = rng.integers(0, len(y), size=n_neg) if n_neg else np.zeros(0, dtype=np.int64)
    nj = _negatives(y, ni, rng)
    return np.concatenate([pi, ni]), np.concatenate([pj, nj])


def balanced_pairs(
    labels: Labels, n_pairs: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i, j, same)``: ``n_pairs`` shuffled pairs, ``n_pairs // 2`` of them negative.

    ``i``, ``j`` int64 ``(n_pairs,)``, ``same`` bool ``(n_pairs,)`` (``labels[i] ==
    labels[j]``). Positives never pair a sample with itself. Deterministic for ``seed``.
    """
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    y = _as_labels(labels)
    rng = np.random.default_rng(_check_seed(seed))
    n_neg = n_pairs // 2
    i, j = _pairs(y, n_pairs - n_neg, n_neg, rng)
    perm = rng.permutation(n_pairs)
    i, j = i[perm], j[perm]
    return torch.from_numpy(i), torch.from_numpy(j), torch.from_numpy(y[i] == y[j])


class PairSampler(_EpochState, Sampler[list[int]]):
    """Batches of ``batch_size`` pairs for Siamese training; use as ``batch_sampler=``.

    Each batch is ``2 * B`` indices ``[i_1..i_B, j_1..j_B]``: split the model input in
    halves, ``same = y[:B] == y[B:]``. Half of each batch's pairs are positive (the odd
    one out of an odd ``B`` alternates). ``n_pairs`` per epoch (default ``len(labels)``)
    in ``ceil(n_pairs / batch_size)`` batches; the order depends on ``(seed, epoch)``.
    """

    def __init__(
        self, labels: Labels, batch_size: int, *, n_pairs: int | None = None, seed: int = 0
    ) -> None:
        self.labels = _as_labels(labels)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n_pairs = len(self.labels) if n_pairs is None else int(n_pairs)
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        self.batch_size = int(batch_size)
        self.seed = _check_seed(seed)
        self.epoch = 0
        _pairs(self.labels, 1, 1, np.random.default_rng(0))  # fail early on bad labels

    def __len__(self) -> int:
        return -(-self.n_pairs // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, self.epoch)
        n_pos = (self.n_pairs + 1) // 2
        i, j = _pairs(self.labels, n_pos, self.n_pairs - n_pos, rng)
        # Interleave positive and negative pairs so every batch is balanced.
        slots = np.empty(self.n_pairs, dtype=np.int64)
        slots[0::2] = np.arange(n_pos)
        slots[1::2] = np.arange(n_pos, self.n_pairs)
        for b in range(len(self)):
            sel = slots[b * self.batch_size : (b + 1) * self.batch_size]
            sel = sel[rng.permutation(len(sel))]
            yield np.concatenate([i[sel], j[sel]]).tolist()


def random_triplets(
    labels: Labels, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(anchor, positive, negative)`` int64 ``(n,)`` index tensors.

    ``labels[a] == labels[p]``, ``a != p`` and ``labels[neg] != labels[a]``; anchors are
    uniform over the samples of classes with at least 2 samples. Deterministic for ``seed``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    y = _as_labels(labels)
    if len(np.unique(y)) < 2:
        raise ValueError("triplets need at least 2 classes")
    if not np.any(np.bincount(np.unique(y, return_inverse=True)[1]) >= 2):
        raise ValueError("triplets need a class with at least 2 samples")
    rng = np.random.default_rng(_check_seed(seed))
    a, p = _positives(y, n, rng)
    neg = _negatives(y, a, rng)
    return torch.from_numpy(a), torch.from_numpy(p), torch.from_numpy(neg)

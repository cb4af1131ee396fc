"""Deterministic verification pairs drawn from a labelled set, and the sampling helpers the
per-class diagnostics share (:mod:`deepmetric.evaluate.diagnostics`).

A pair ``(i, j)`` is *positive* when ``labels[i] == labels[j]``, *negative* otherwise. Every
sample here is drawn from a ``torch.Generator`` seeded by the caller, so the same labels and seed
give the same pairs on every machine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deepmetric.neighbors import check_labels

__all__ = ["verification_pairs"]


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def sample_distinct(total: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Sorted int64 sample of min(k, total) distinct integers of [0, total), uniform among
    subsets, without materialising [0, total) when total is large."""
    if k >= total:
        return torch.arange(total, dtype=torch.int64)
    if total <= max(4 * k, 1 << 20):
        return torch.randperm(total, generator=g)[:k].sort().values
    # Rejection: the set of distinct values of i.i.d. uniform draws, with a stopping rule that
    # depends on its size only, is uniform given its size; a uniform subset of it is uniform.
    chosen = torch.zeros(0, dtype=torch.int64)
    while len(chosen) < k:
        draws = torch.randint(0, total, (2 * (k - len(chosen)) + 16,), generator=g)
        chosen = torch.unique(torch.cat([chosen, draws]))
    return chosen[torch.randperm(len(chosen), generator=g)[:k]].sort().values


def triangle(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair number r -> (a, b), a < b, with r = b (b - 1) / 2 + a (column-wise lower triangle)."""
    b = torch.floor((1 + torch.sqrt(1 + 8 * r.double())) / 2).long()
    for _ in range(2):  # fix float rounding for huge r
        b = b - (b * (b - 1) // 2 > r).long()
        b = b + ((b + 1) * b // 2 <= r).long()
    return r - b * (b - 1) // 2, b


def _randbelow(high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Uniform integers in [0, high) elementwise (bias < high / 2^62)."""
    return torch.randint(0, 2**62, high.shape, generator=g) % high


class Groups(NamedTuple):
    """Items grouped by label: ``order`` (N,) indices sorted by label (ascending index within a
    class); class ``c``'s members are ``order[start[c] : start[c] + count[c]]``."""

    classes: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    order: torch.Tensor


def group_by_label(labels: torch.Tensor) -> Groups:
    order = torch.argsort(labels, stable=True)
    classes, count = torch.unique_consecutive(labels[order], return_counts=True)
    return Groups(classes, count, torch.cumsum(count, 0) - count, order)


def others(groups: Groups, c: int | torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The u-th item (0 <= u < N - n_c) not in class number c, elementwise (c may be a tensor
    of per-element class numbers too)."""
    start = groups.start[c]
    return groups.order[u + groups.count[c] * (u >= start).long()]


def verification_pairs(
    labels: torch.Tensor, *, max_positive: int = 100_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced verification pairs from a labelled set.

    Positive pairs: every (i, j), i < j, ``labels[i] == labels[j]`` when there are at most
    ``max_positive`` of them, else a uniform sample of ``max_positive`` of them without
    replacement. Negative pairs: as many as positives, each drawn uniformly (with replacement)
    from the pairs with different labels, returned as (min, max), so ``i != j``.

    Args:
        labels: (N,) integer labels.
        max_positive: the most positive pairs to return (>= 1).
        seed: the same seed gives the same pairs.

    Returns:
        ``(i, j, same)``: (2K,) int64, (2K,) int64 and (2K,) bool, positives first (ordered by
        class, then by j, then by i), then negatives, on ``labels``' device.

    Raises:
        ValueError: no positive pair (every class is a singleton) or a single class.
    """
    check_labels(labels, labels.numel() if isinstance(labels, torch.Tensor) else 0)
    lab = labels.detach().cpu()
    if max_positive < 1:
        raise ValueError(f"max_positive must be >= 1, got {max_positive}")
    groups = group_by_label(lab)
    if len(groups.classes) < 2:
        raise ValueError("verification pairs need at least two classes (no negative pair)")
    per_class = groups.count * (groups.count - 1) // 2
    total = int(per_class.sum())
    if total == 0:
        raise ValueError("no positive pair: every class has a single item")
    g = generator(seed)

    r = sample_distinct(total, max_positive, g)
    ends = torch.cumsum(per_class, 0)
    c = torch.searchsorted(ends, r, right=True)  # class number of each pair
    a, b = triangle(r - (ends - per_class)[c])
    pos_i = groups.order[groups.start[c] + a]
    pos_j = groups.order[groups.start[c] + b]  # order is ascending within a class: pos_i < pos_j

    k = len(r)
    n = len(lab)
    # Ordered negative pairs (x, y) with x in class c: n_c (N - n_c) of them, so drawing c with
    # that weight, then x in c and y outside c uniformly, is uniform over negative pairs.
    weight = (groups.count * (n - groups.count)).double()
    c = torch.multinomial(weight, k, replacement=True, generator=g)
    x = groups.order[groups.start[c] + _randbelow(groups.count[c], g)]
    y = others(groups, c, _randbelow(n - groups.count[c], g))
    neg_i, neg_j = torch.minimum(x, y), torch.maximum(x, y)

    i = torch.cat([pos_i, neg_i])
    j = torch.cat([pos_j, neg_j])
    same = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
    return i.to(labels.device), j.to(labels.device), same.to(labels.device)

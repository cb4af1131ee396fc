"""Retrieval and clustering metrics: pure functions over embeddings and labels.

Shapes: ``embeddings`` is an (N, D) floating-point tensor, ``labels`` an (N,) integer tensor
(:func:`retrieval_metrics` also takes multi-hot (N, L) labels or a boolean (N, N) relevance
mask: relevant = shares a label).
In the retrieval metrics every item is a query against all the *other* items (leave-one-out:
a query is never its own neighbour). Neighbours come from :mod:`deepmetric.neighbors` (exact,
chunked, faiss when installed), ordered by distance, ties broken by the lower index.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.checks import integer_at_least
from deepmetric.neighbors import (
    check_items,
    check_labels,
    nearest_neighbors,
    nearest_other,
    retrieval_metrics,  # defined beside the neighbour search (training reads it too)
)

__all__ = [
    "clustering_nmi",
    "kmeans",
    "nearest_neighbors",
    "nearest_other",
    "nmi",
    "retrieval_metrics",
]


# --------------------------------------------------------------------------- clustering


def _assign(
    x: torch.Tensor, x2: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center (lowest index on ties) and its squared distance ``||x - c||^2``.

    ``||x||^2`` (``x2``, (N,)) is the same for every center of a row, so the argmin runs over
    ``||c||^2 - 2 x.c`` (one matrix product) and ``x2`` is added to the minimum only. Blocks of
    rows hold about 4M values: k-means makes many iterations, each a few large operations.
    """
    c2 = (centers * centers).sum(dim=1)[None, :]
    rows = max(1, 2**22 // centers.shape[0])
    labels, dists = [], []
    for start in range(0, x.shape[0], rows):
        part = torch.addmm(c2, x[start : start + rows], centers.T, alpha=-2.0).min(dim=1)
        labels.append(part.indices)
        dists.append(part.values.add_(x2[start : start + rows]).clamp_min_(0.0))
    if len(labels) == 1:
        return labels[0], dists[0]
    return torch.cat(labels), torch.cat(dists)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: first center uniform, each next one drawn with probability
    proportional to the squared distance to the nearest chosen center."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = ((x - x[chosen[0]]) ** 2).sum(dim=1).to(torch.float64)
    for _ in range(1, k):
        weights = closest.cpu()
        if weights.sum() > 0:
            pick = int(torch.multinomial(weights, 1, generator=gen))
        else:  # every point coincides with a center: any point will do
            pick = int(torch.randint(n, (1,), generator=gen))
        chosen.append(pick)
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(dim=1).to(torch.float64))
    return x[chosen].clone()


def _lloyd(x: torch.Tensor, centers: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations until the assignment stops changing; returns (labels, inertia)."""
    k = centers.shape[0]
    x2 = (x * x).sum(dim=1)
    previous = None
    for _ in range(iters):
        labels, dist = _assign(x, x2, centers)
        if previous is not None and torch.equal(labels, previous):
            break
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        far = dist.clone()
        for c in (counts == 0).nonzero().flatten().tolist():  # empty: farthest point
            j = int(far.argmax())
            centers[c] = x[j]
            far[j] = -1.0
        previous = labels
    return labels, float(dist.sum(dtype=torch.float64))


def kmeans(
    x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100, n_init: int = 3
) -> torch.Tensor:
    """k-means clustering of (N, D) points into ``k`` clusters; returns labels (N,) int64.

    k-means++ seeding, then Lloyd iterations (assign each point to its nearest center, move
    each center to its points' mean; an empty cluster takes the point farthest from its
    center) until the assignment is stable or ``iters`` is reached. The run with the lowest
    inertia ``sum_i ||x_i - c_{label_i}||^2`` of ``n_init`` wins. Deterministic for a ``seed``.
    Cost per iteration O(N k D), memory O(chunk x k).
    """
    check_items(x, "x")
    integer_at_least("k", k)
    integer_at_least("iters", iters)
    integer_at_least("n_init", n_init)
    if k > x.shape[0]:
        raise ValueError(f"k = {k} exceeds the number of points {x.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, math.inf
    with torch.no_grad():
        x = x.detach()
        for _ in range(n_init):
            labels, inertia = _lloyd(x, _kmeans_pp(x, k, gen), iters)
            if best_labels is None or inertia < best_inertia:
                best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def _as_1d(labels: Any, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalized mutual information of two partitions of the same N items.

    From the contingency table ``n_ij`` (items in class i and cluster j), ``a_i``, ``b_j``
    its row and column sums: ``MI = sum_ij (n_ij / N) log(N n_ij / (a_i b_j))``,
    ``H(U) = -sum_i (a_i / N) log(a_i / N)``, and ``NMI = MI / ((H(true) + H(pred)) / 2)``
    (arithmetic mean: scikit-learn's ``normalized_mutual_info_score`` default).

    Special cases as in scikit-learn: both partitions a single cluster gives 1.0 (identical,
    undivided); otherwise MI = 0 (e.g. only one side is a single cluster) gives 0.0. Two
    partitions equal up to renaming give exactly 1.0. Labels: tensors, arrays or sequences.
    """
    true, pred = _as_1d(labels_true, "labels_true"), _as_1d(labels_pred, "labels_pred")
    if true.shape[0] != pred.shape[0]:
        raise ValueError(f"labels_true has {true.shape[0]} items, labels_pred {pred.shape[0]}")
    if true.shape[0] == 0:
        raise ValueError("nmi needs at least one item")
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    t, p = t.ravel(), p.ravel()
    n_t, n_p = int(t.max()) + 1, int(p.max()) + 1
    if n_t == n_p == 1:
        return 1.0
    # the nonzero cells of the contingency table, without building the (n_t, n_p) table
    cells, nij = np.unique(t.astype(np.int64) * n_p + p, return_counts=True)
    if n_t == n_p == cells.shape[0]:
        return 1.0  # one cell per class and per cluster: the same partition up to renaming
    a = np.bincount(t).astype(np.float64)
    b = np.bincount(p).astype(np.float64)
    total, nij = float(t.shape[0]), nij.astype(np.float64)
    ai, bj = a[cells // n_p], b[cells % n_p]
    mi = float((nij / total * np.log(total * nij / (ai * bj))).sum())
    if mi <= 0.0:
        return 0.0
    return mi / ((_entropy(a) + _entropy(b)) / 2.0)


#: The raw-input baseline reads images at most this many pixels on a side, area-averaged down
#: when larger: every data set measured here is at most 64 x 64 (its baseline unchanged), and
#: a 60,000-image benchmark at 224 x 224 RGB then holds 3 GB of vectors instead of 36.
RAW_MAX_SIDE = 64


def raw_vectors(inputs: Any, *, chunk: int = 1024, max_side: int = RAW_MAX_SIDE) -> torch.Tensor:
    """The raw-input baseline's vectors (N, F) float32: each item flattened and L2-normalised
    (compared in euclidean distance, the ranking of cosine), images (N, C, H, W) larger than
    ``max_side`` on a side first area-averaged down to it on their longer side. ``inputs``: a
    tensor, or anything sliced into tensors (lazy image files), read ``chunk`` items at a
    time, so only the vectors are ever held."""
    integer_at_least("chunk", chunk)
    integer_at_least("max_side", max_side)
    parts = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start : start + chunk]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("inputs must be a tensor (N, ...) of at least 2 dimensions")
        x = x.float()
        if x.dim() == 4 and max(x.shape[-2:]) > max_side:
            h, w = x.shape[-2:]
            scale = max_side / max(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=size, mode="area")
        parts.append(F.normalize(x.flatten(1), dim=1))
    if not parts:
        raise ValueError("inputs must hold at least 1 item")
    return torch.cat(parts)


def raw_input_baseline(
    inputs: torch.Tensor, labels: torch.Tensor, *, per_class: bool = False
) -> dict[str, Any]:
    """:func:`retrieval_metrics` of the raw inputs, no network: each item (N, ...) flattened to
    (N, prod(...)), L2-normalised, compared in euclidean distance (the same ranking as cosine;
    :func:`raw_vectors`: images above :data:`RAW_MAX_SIDE` a side averaged down first);
    ``per_class`` as there.

    The honest baseline of a learned metric: a network that does not beat it on a set of
    classes has learned nothing useful for them.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("inputs must be a tensor (N, ...) of at least 2 dimensions")
    flat = raw_vectors(inputs)
    check_items(flat, "inputs")
    return retrieval_metrics(flat, labels, metric="euclidean", per_class=per_class)


def clustering_nmi(embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> float:
    """NMI between ``labels`` and a k-means clustering of ``embeddings`` (N, D) with k = the
    number of distinct labels (see :func:`kmeans` and :func:`nmi`)."""
    check_items(embeddings)
    check_labels(labels, embeddings.shape[0])
    k = int(torch.unique(labels).numel())
    return nmi(labels, kmeans(embeddings, k, seed=seed))

"""Retrieval and clustering metrics: pure functions over embeddings and labels.

Shapes: ``embeddings`` is an (N, D) floating-point tensor, ``labels`` an (N,) integer tensor.
In the retrieval metrics every item is a query against all the *other* items (leave-one-out:
a query is never its own neighbour). Neighbours are ordered by distance, ties broken by the
lower index, deterministically.

Memory: neighbour searches run over chunks of queries, so they hold one (chunk, R) distance
matrix (R = number of references) and the (chunk, k) results at a time, never a full (Q, R)
matrix; time is that of the (Q, D) x (D, R) distance products plus a top-k per row.

faiss: when ``import faiss`` works, float32 CPU searches use an exact flat index
(``IndexFlatL2`` / ``IndexFlatIP``); otherwise (and always for float64) the torch path runs.
Both return the exact neighbours and order them by (distance, index); faiss computes in float32
(distances may differ from torch's by rounding) and, among references tied at the k-th
distance, returns the ones it finds rather than the lowest indices. The tests cover the torch
path against brute force and the faiss glue against a stand-in index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.distances import Metric, check_embeddings, check_metric, pairwise

try:  # optional: exact flat-index search, used only when installed
    import faiss as _faiss  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _faiss = None

__all__ = [
    "clustering_nmi",
    "kmeans",
    "nearest_neighbors",
    "nearest_other",
    "nmi",
    "retrieval_metrics",
]


# --------------------------------------------------------------------------- validation


def _check_items(embeddings: torch.Tensor, name: str = "embeddings") -> None:
    check_embeddings(embeddings, name)
    if embeddings.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 items, got {embeddings.shape[0]}")


def _check_labels(labels: torch.Tensor, n: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} "
            f"and dtype {labels.dtype}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n} embeddings")


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------- neighbours


def _order_rows(dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row of (dist, idx) by (distance, index)."""
    idx, perm = idx.sort(dim=1)
    dist, order = dist.gather(1, perm).sort(dim=1, stable=True)
    return dist, idx.gather(1, order)


def _smallest_k(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of each row of ``d`` (c, R), ordered by (distance, index).

    ``torch.topk`` gives the right values but an arbitrary choice among entries tied with the
    k-th value; rows with such a tie (the (k+1)-th value equals the k-th) are redone with
    the lowest-index tied entries, and rows with equal values are reordered by index.
    """
    width = min(k + 1, d.shape[1])  # one more: a tie at the boundary shows as value k+1 == k
    vals, idx = torch.topk(d, width, dim=1, largest=False, sorted=True)
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().squeeze(1) if width > k else idx[:0, 0]
    vals, idx, kth = vals[:, :k].contiguous(), idx[:, :k].contiguous(), vals[:, k - 1 : k]
    if tied.numel():
        dt, kt = d[tied], kth[tied]
        below = dt < kt
        equal = dt == kt
        need = k - below.sum(dim=1, keepdim=True)
        keep = below | (equal & (equal.cumsum(dim=1) <= need))  # exactly k per row
        chosen = keep.nonzero()[:, 1].view(-1, k)
        vals[tied], idx[tied] = _order_rows(dt.gather(1, chosen), chosen)
    if k > 1:  # topk orders by value only: reorder rows holding equal values by index too
        redo = (vals[:, 1:] == vals[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if redo.numel():
            vals[redo], idx[redo] = _order_rows(vals[redo], idx[redo])
    return vals, idx


def _faiss_usable(queries: torch.Tensor, refs: torch.Tensor) -> bool:
    return (
        _faiss is not None
        and queries.dtype == refs.dtype == torch.float32
        and queries.device.type == refs.device.type == "cpu"
    )


def _knn_chunks(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    metric: Metric,
    exclude_self: bool,
    chunk: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, dist (c, k), idx (c, k))`` for consecutive chunks of queries."""
    n_q = queries.shape[0]
    if _faiss_usable(queries, refs):
        yield from _faiss_chunks(queries, refs, k, metric, exclude_self, chunk)
        return
    for start in range(0, n_q, chunk):
        d = pairwise(queries[start : start + chunk], refs, metric)
        if exclude_self:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + start] = math.inf
        dist, idx = _smallest_k(d, k)
        yield start, dist, idx


def _faiss_chunks(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    metric: Metric,
    exclude_self: bool,
    chunk: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The faiss path of :func:`_knn_chunks` (float32, CPU): an exact flat index."""
    assert _faiss is not None
    cosine = metric == "cosine"
    if cosine:
        queries, refs = F.normalize(queries, dim=1), F.normalize(refs, dim=1)
    index = (_faiss.IndexFlatIP if cosine else _faiss.IndexFlatL2)(refs.shape[1])
    index.add(np.ascontiguousarray(refs.numpy()))
    kk = k + int(exclude_self)
    for start in range(0, queries.shape[0], chunk):
        q = np.ascontiguousarray(queries[start : start + chunk].numpy())
        score, found = index.search(q, kk)
        score, idx = torch.from_numpy(score), torch.from_numpy(found).long()
        if exclude_self:  # drop the query itself, or the last hit when it is not among them
            rows = torch.arange(idx.shape[0])
            is_self = idx == (rows + start)[:, None]
            drop = torch.where(is_self.any(dim=1), is_self.int().argmax(dim=1), kk - 1)
            keep = torch.ones_like(is_self)
            keep[rows, drop] = False
            score, idx = score[keep].view(-1, k), idx[keep].view(-1, k)
        if cosine:
            dist = (1.0 - score).clamp(0.0, 2.0)
        else:
            dist = score.clamp_min(0.0)
            if metric == "euclidean":
                dist = dist.sqrt()
        yield (start, *_order_rows(dist, idx))


def nearest_neighbors(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    *,
    metric: Metric = "euclidean",
    exclude_self: bool = False,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest references of each query.

    Args:
        queries: (Q, D) embeddings.
        refs: (R, D) embeddings.
        k: neighbours per query, ``1 <= k <= R`` (``R - 1`` with ``exclude_self``).
        metric: see :mod:`deepmetric.distances`.
        exclude_self: the queries are the references (row i of ``queries`` is item i of
            ``refs``, Q == R): item i never returns itself.
        chunk: queries per block; memory is O(chunk x R), never a full (Q, R) matrix.

    Returns:
        ``(dist (Q, k), idx (Q, k))``, each row ordered by distance, ties by lower index.
    """
    check_metric(metric)
    check_embeddings(queries, "queries")
    check_embeddings(refs, "refs")
    _check_positive(k, "k")
    _check_positive(chunk, "chunk")
    if queries.shape[1] != refs.shape[1]:
        raise ValueError(
            f"queries and refs must have the same dimension, got {queries.shape[1]} "
            f"and {refs.shape[1]}"
        )
    if exclude_self and queries.shape[0] != refs.shape[0]:
        raise ValueError(
            "exclude_self needs the queries to be the refs, got "
            f"{queries.shape[0]} queries and {refs.shape[0]} refs"
        )
    available = refs.shape[0] - int(exclude_self)
    if k > available:
        raise ValueError(f"k = {k} but only {available} references are available")
    with torch.no_grad():
        queries, refs = queries.detach(), refs.detach()
        parts = list(_knn_chunks(queries, refs, k, metric, exclude_self, chunk))
    if not parts:
        empty = queries.new_empty((0, k))
        return empty, torch.empty((0, k), dtype=torch.long, device=queries.device)
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def nearest_other(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    metric: Metric = "euclidean",
    *,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's nearest other item (leave-one-out, ties by lower index).

    Returns ``(idx (N,), correct (N,) bool)`` with ``correct[i] = labels[idx[i]] == labels[i]``:
    the per-query precision@1. Unlike :func:`retrieval_metrics` this covers every item, so an
    item whose class has no other item is always ``False``.
    """
    _check_items(embeddings)
    _check_labels(labels, embeddings.shape[0])
    _, idx = nearest_neighbors(
        embeddings, embeddings, 1, metric=metric, exclude_self=True, chunk=chunk
    )
    idx = idx[:, 0]
    labels = labels.to(idx.device)
    return idx, labels[idx] == labels


# --------------------------------------------------------------------------- retrieval


def _query_scores(rel: torch.Tensor, r: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-query scores from ``rel (c, k)`` (neighbour j is of the query's class) and
    ``r (c,)`` (same-class items per query, 1 <= r <= k), as float64 tensors (c,)."""
    width = rel.shape[1]
    ranks = torch.arange(1, width + 1, device=rel.device, dtype=torch.float64)
    r64 = r.to(torch.float64)
    rel_r = rel & (ranks[None, :] <= r64[:, None])  # relevant among the first R
    hits = rel.to(torch.float64).cumsum(dim=1)  # hits[j] = relevant among the first j + 1
    out = {
        "precision_at_1": rel[:, 0].to(torch.float64),
        "r_precision": rel_r.sum(dim=1) / r64,
        "map_at_r": (hits / ranks * rel_r).sum(dim=1) / r64,
    }
    for k in ks:
        out[f"recall@{k}"] = rel[:, : min(k, width)].any(dim=1).to(torch.float64)
    return out


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: Metric = "euclidean",
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk: int = 1024,
) -> dict[str, Any]:
    """Leave-one-out retrieval metrics (Musgrave, Belongie, Lim 2020, "A Metric Learning
    Reality Check").

    For query i with class c: ``R_i`` = number of *other* items of class c, and ``rel(j)`` = 1
    if its j-th nearest other item (ties by lower index) has class c.

    - ``precision_at_1``: mean of ``rel(1)``.
    - ``r_precision``: mean of ``(sum_{j<=R} rel(j)) / R``.
    - ``map_at_r``: mean of ``(1/R) sum_{j<=R} P(j) rel(j)``, ``P(j) = (sum_{l<=j} rel(l)) / j``.
    - ``recall_at_k``: ``{"k": share of queries with a same-class item among their k
      nearest}`` for k in ``ks`` (k beyond N - 1 counts all N - 1 other items).
    - ``queries``: how many queries were counted.

    Queries with ``R = 0`` (their class has no other item) are excluded from every metric;
    with no query left the metrics are NaN.

    One neighbour search with ``k = min(max(max(ks), R_max), N - 1)``, in chunks of ``chunk``
    queries: memory O(chunk x (N + k)), time O(N^2 D) for the distances plus a top-k per
    row; a class of 6000 items makes k = 5999, i.e. 5999 neighbours per query chunk row.
    """
    check_metric(metric)
    _check_items(embeddings)
    _check_labels(labels, embeddings.shape[0])
    _check_positive(chunk, "chunk")
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        _check_positive(k, "every k in ks")
    n = embeddings.shape[0]
    _, cls, counts = torch.unique(
        labels.to(embeddings.device), return_inverse=True, return_counts=True
    )
    r_all = counts[cls] - 1
    width = min(max(max(ks), int(r_all.max())), n - 1)

    names = ["precision_at_1", "r_precision", "map_at_r", *(f"recall@{k}" for k in ks)]
    totals = dict.fromkeys(names, 0.0)
    queries = 0
    with torch.no_grad():
        emb = embeddings.detach()
        for start, _, idx in _knn_chunks(emb, emb, width, metric, True, chunk):
            stop = start + idx.shape[0]
            r = r_all[start:stop]
            valid = r > 0
            if not valid.any():
                continue
            rel = cls[idx[valid]] == cls[start:stop][valid][:, None]
            scores = _query_scores(rel, r[valid], ks)
            for name in names:
                totals[name] += float(scores[name].sum())
            queries += int(valid.sum())

    def mean(name: str) -> float:
        return totals[name] / queries if queries else math.nan

    return {
        "precision_at_1": mean("precision_at_1"),
        "r_precision": mean("r_precision"),
        "map_at_r": mean("map_at_r"),
        "recall_at_k": {str(k): mean(f"recall@{k}") for k in ks},
        "queries": queries,
    }


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
    _check_items(x, "x")
    _check_positive(k, "k")
    _check_positive(iters, "iters")
    _check_positive(n_init, "n_init")
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


def clustering_nmi(embeddings: torch.Tensor, labels: torch.Tensor, *, seed: int = 0) -> float:
    """NMI between ``labels`` and a k-means clustering of ``embeddings`` (N, D) with k = the
    number of distinct labels (see :func:`kmeans` and :func:`nmi`)."""
    _check_items(embeddings)
    _check_labels(labels, embeddings.shape[0])
    k = int(torch.unique(labels).numel())
    return nmi(labels, kmeans(embeddings, k, seed=seed))

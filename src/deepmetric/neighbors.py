"""Exact k nearest neighbours, in chunks (torch; faiss when installed).

The one neighbour search of the project, and the retrieval metrics computed from it: training
(validation precision@1 and MAP@R), evaluation (metrics, figures) and the gallery all use it,
so no layer imports a higher one.

Shapes: ``queries`` (Q, D), ``refs`` (R, D), ``labels`` (N,) integers. Neighbours are ordered
by distance, ties broken by the lower index, deterministically.

Memory: searches run over chunks of queries, so they hold one (chunk, R) distance matrix and
the (chunk, k) results at a time, never a full (Q, R) matrix.

faiss: when ``import faiss`` works, float32 CPU searches use an exact flat index
(``IndexFlatL2`` / ``IndexFlatIP``); otherwise (and always for float64) the torch path runs.
Both return the exact neighbours ordered by (distance, index); faiss computes in float32
(distances may differ from torch's by rounding) and, among references tied at the k-th
distance, returns the ones it finds rather than the lowest indices. The tests check both
paths against brute force, the faiss one with the real faiss-cpu.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepmetric.checks import integer_at_least
from deepmetric.distances import Metric, check_embeddings, check_metric, pairwise
from deepmetric.mining import (  # the one label validator, re-exported
    check_labels,
    check_pair_labels,
    tile_masks,
)

try:  # optional: exact flat-index search, used only when installed
    import faiss as _faiss  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _faiss = None

__all__ = [
    "check_items",
    "check_labels",
    "knn_chunks",
    "nearest_neighbors",
    "nearest_other",
    "retrieval_metrics",
    "smallest_k",
]


# --------------------------------------------------------------------------- validation


def check_items(embeddings: torch.Tensor, name: str = "embeddings") -> None:
    check_embeddings(embeddings, name)
    if embeddings.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 items, got {embeddings.shape[0]}")


# --------------------------------------------------------------------------- neighbours


def _order_rows(dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row of (dist, idx) by (distance, index)."""
    idx, perm = idx.sort(dim=1)
    dist, order = dist.gather(1, perm).sort(dim=1, stable=True)
    return dist, idx.gather(1, order)


def smallest_k(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def knn_chunks(
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
        dist, idx = smallest_k(d, k)
        yield start, dist, idx


def _faiss_chunks(
    queries: torch.Tensor,
    refs: torch.Tensor,
    k: int,
    metric: Metric,
    exclude_self: bool,
    chunk: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The faiss path of :func:`knn_chunks` (float32, CPU): an exact flat index."""
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
    integer_at_least("k", k)
    integer_at_least("chunk", chunk)
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
        parts = list(knn_chunks(queries, refs, k, metric, exclude_self, chunk))
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
    check_items(embeddings)
    check_labels(labels, embeddings.shape[0])
    _, idx = nearest_neighbors(
        embeddings, embeddings, 1, metric=metric, exclude_self=True, chunk=chunk
    )
    idx = idx[:, 0]
    labels = labels.to(idx.device)
    return idx, labels[idx] == labels


# --------------------------------------------------------------------------- retrieval metrics


def _query_scores(rel: torch.Tensor, r: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-query scores from ``rel (c, k)`` (neighbour j is relevant to the query) and
    ``r (c,)`` (relevant items per query, 1 <= r, and min(r, max ks) <= k), as float64 (c,)."""
    width = rel.shape[1]
    ranks = torch.arange(1, width + 1, device=rel.device, dtype=torch.float64)
    r64 = r.to(torch.float64)
    rel_r = rel & (ranks[None, :] <= r64[:, None])  # relevant among the first R
    hits = rel.to(torch.float64).cumsum(dim=1)  # hits[j] = relevant among the first j + 1
    precision = hits / ranks * rel  # P(j) rel(j)
    out = {
        "precision_at_1": rel[:, 0].to(torch.float64),
        "r_precision": rel_r.sum(dim=1) / r64,
        "map_at_r": (precision * rel_r).sum(dim=1) / r64,
    }
    for k in ks:
        top = min(k, width)
        out[f"recall@{k}"] = rel[:, :top].any(dim=1).to(torch.float64)
        out[f"precision@{k}"] = hits[:, top - 1] / k if top else torch.zeros_like(r64)
        out[f"map@{k}"] = precision[:, :top].sum(dim=1) / torch.clamp(r64, max=k)
    return out


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: Metric = "euclidean",
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk: int = 1024,
    per_class: bool = False,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Retrieval metrics (Musgrave, Belongie, Lim 2020, "A Metric Learning Reality Check"):
    leave-one-out over one set, or queries against a gallery (``ref_embeddings``, M x D, with
    ``ref_labels``: DeepFashion In-Shop's protocol, every query searched among the gallery).

    For query i: ``R_i`` = the number of relevant items it can retrieve (leave-one-out: the
    *other* items of its class; with a gallery: the gallery items of its class), and
    ``rel(j)`` = 1 if its j-th nearest item (ties by lower index) is relevant.

    - ``precision_at_1``: mean of ``rel(1)``.
    - ``r_precision``: mean of ``(sum_{j<=R} rel(j)) / R``.
    - ``map_at_r``: mean of ``(1/R) sum_{j<=R} P(j) rel(j)``, ``P(j) = (sum_{l<=j} rel(l)) / j``.
    - ``recall_at_k``: ``{"k": share of queries with a relevant item among their k
      nearest}`` for k in ``ks`` (k beyond the items there are counts them all).
    - ``precision_at_k``: ``{"k": mean of (sum_{j<=k} rel(j)) / k}`` (slots beyond the items
      there are count as misses).
    - ``map_at_k``: ``{"k": mean of (1 / min(k, R)) sum_{j<=k} P(j) rel(j)}`` (1 when the
      first min(k, R) items are all relevant).
    - ``queries``: how many queries were counted.

    Queries with ``R = 0`` are excluded from every metric; with no query left the metrics are
    NaN.

    Multi-label data: ``labels`` multi-hot (N, L) 0/1 integers (``ref_labels`` (M, L)), item j
    relevant to query i when they share a label, or a boolean (N, N) relevance mask (its
    diagonal ignored; with a gallery (N, M) and no ``ref_labels``); ``R_i`` is then the number
    of items relevant to i, and every metric above reads "relevant" for "of class c".
    Relevance is computed per chunk of queries (:func:`deepmetric.mining.tile_masks`), memory
    O(chunk x M). ``per_class`` needs class labels (N,).

    With ``per_class``, also ``by_class``: one row per label (ascending) with ``class``,
    ``queries`` and the means of ``precision_at_1``, ``r_precision``, ``map_at_r`` over that
    class's queries, and where its misses go: of all the slots ``j <= R_i`` of the class's
    queries, ``confused_with`` is the other label holding the most (lowest label among equals;
    None when no slot is held by another label) and ``confused_share`` the share it holds.

    One neighbour search with ``k = min(max(max(ks), R_max), M')`` (M' = N - 1 leave-one-out,
    else M), in chunks of ``chunk`` queries: memory O(chunk x (M + k)), time O(N M D) for the
    distances plus a top-k per row; a class of 6000 items makes k = 5999.
    """
    check_metric(metric)
    own = ref_embeddings is None
    if own:
        check_items(embeddings)  # leave-one-out needs two
    else:
        check_embeddings(embeddings)
        if embeddings.shape[0] < 1:
            raise ValueError("embeddings must hold at least 1 query")
    n = embeddings.shape[0]
    refs = embeddings if own else _check_refs(embeddings, ref_embeddings)
    m = refs.shape[0]
    multi = isinstance(labels, torch.Tensor) and labels.dim() == 2
    if multi:
        check_pair_labels(labels, None if own else ref_labels, n, m, same_set=own)
        if per_class:
            raise ValueError("per_class needs class labels (N,), not multi-hot labels or a mask")
    else:
        check_labels(labels, n)
        if not own:
            if ref_labels is None:
                raise ValueError("ref_embeddings need ref_labels (M,), the gallery's classes")
            check_labels(ref_labels, m, "ref_labels")
    if own and ref_labels is not None:
        raise ValueError("ref_labels without ref_embeddings: pass both, or neither")
    integer_at_least("chunk", chunk)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        integer_at_least("every k in ks", k)
    labels = labels.to(embeddings.device)
    ref_y = labels if own or ref_labels is None else ref_labels.to(embeddings.device)
    tally = None
    if multi:

        def masks(start: int, stop: int) -> torch.Tensor:  # (c, M) bool
            offset = start if own else None
            return tile_masks(labels[start:stop], ref_y, self_offset=offset).positive

        def relevant(start: int, stop: int, idx: torch.Tensor) -> torch.Tensor:  # (c, k) bool
            return masks(start, stop).gather(1, idx)

        r_all = torch.cat([masks(s, s + chunk).sum(dim=1) for s in range(0, n, chunk)])
        names_of_classes: list[int] = []
    else:
        both = labels if own else torch.cat([labels, ref_y])
        names_t, inverse = torch.unique(both, return_inverse=True)
        cls, ref_cls = inverse[:n], inverse if own else inverse[n:]
        counts = torch.bincount(ref_cls, minlength=len(names_t))
        r_all = counts[cls] - (1 if own else 0)

        def relevant(start: int, stop: int, idx: torch.Tensor) -> torch.Tensor:
            return ref_cls[idx] == cls[start:stop][:, None]

        names_of_classes = names_t.tolist()
        if per_class:
            tally = _ClassTally(len(names_t), embeddings.device)
    width = min(max(max(ks), int(r_all.max())), m - 1 if own else m)

    names = ["precision_at_1", "r_precision", "map_at_r"]
    names += [f"{what}@{k}" for what in ("recall", "precision", "map") for k in ks]
    totals = dict.fromkeys(names, 0.0)
    queries = 0
    with torch.no_grad():
        emb, ref = embeddings.detach(), refs.detach()
        for start, _, idx in knn_chunks(emb, ref, width, metric, own, chunk):
            stop = start + idx.shape[0]
            r = r_all[start:stop]
            valid = r > 0
            if not valid.any():
                continue
            rel = relevant(start, stop, idx)[valid]
            scores = _query_scores(rel, r[valid], ks)
            for name in names:
                totals[name] += float(scores[name].sum())
            queries += int(valid.sum())
            if tally is not None:
                tally.add(cls[start:stop][valid], ref_cls[idx[valid]], r[valid], scores)

    def mean(name: str) -> float:
        return totals[name] / queries if queries else math.nan

    out: dict[str, Any] = {
        "precision_at_1": mean("precision_at_1"),
        "r_precision": mean("r_precision"),
        "map_at_r": mean("map_at_r"),
        "recall_at_k": {str(k): mean(f"recall@{k}") for k in ks},
        "precision_at_k": {str(k): mean(f"precision@{k}") for k in ks},
        "map_at_k": {str(k): mean(f"map@{k}") for k in ks},
        "queries": queries,
    }
    if tally is not None:
        out["by_class"] = tally.rows(names_of_classes)
    return out


def _check_refs(embeddings: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """The gallery ``refs`` (M, D), M >= 1, of the queries' D; one-line errors otherwise."""
    if not isinstance(refs, torch.Tensor) or refs.dim() != 2 or refs.shape[0] < 1:
        shape = tuple(refs.shape) if isinstance(refs, torch.Tensor) else type(refs).__name__
        raise ValueError(f"ref_embeddings must be a 2-D tensor (M, D) with M >= 1, got {shape}")
    if refs.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings have {refs.shape[1]} dimensions, the queries {embeddings.shape[1]}"
        )
    if not torch.isfinite(refs).all():
        raise ValueError("ref_embeddings hold NaN or inf")
    return refs.to(embeddings.device)


class _ClassTally:
    """Per-class sums of the query scores, and how often each other class fills a slot
    ``j <= R`` of a class's queries, for ``retrieval_metrics(per_class=True)``. The slot counts
    are kept sparse (key ``query class * C + found class``): memory grows with the pairs of
    classes that actually meet, not with C^2 (a face set has thousands of classes)."""

    SCORES = ("precision_at_1", "r_precision", "map_at_r")

    def __init__(self, n_classes: int, device: torch.device) -> None:
        self.n = n_classes
        self.sums = torch.zeros(len(self.SCORES), n_classes, dtype=torch.float64, device=device)
        self.queries = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.slots = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.keys = torch.zeros(0, dtype=torch.long, device=device)
        self.counts = torch.zeros(0, dtype=torch.long, device=device)

    def add(
        self, q: torch.Tensor, found: torch.Tensor, r: torch.Tensor, scores: dict[str, torch.Tensor]
    ) -> None:
        """``q`` (c,) query classes, ``found`` (c, k) neighbour classes, ``r`` (c,) R."""
        for row, name in enumerate(self.SCORES):
            self.sums[row].index_add_(0, q, scores[name])
        self.queries.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
        self.slots.index_add_(0, q, r.to(torch.float64))
        ranks = torch.arange(1, found.shape[1] + 1, device=found.device)
        missed = (ranks[None, :] <= r[:, None]) & (found != q[:, None])
        keys = torch.cat([self.keys, (q[:, None] * self.n + found)[missed]])
        fresh = torch.ones(len(keys) - len(self.keys), dtype=torch.long, device=keys.device)
        counts = torch.cat([self.counts, fresh])
        self.keys, where = torch.unique(keys, return_inverse=True)
        self.counts = torch.zeros_like(self.keys).index_add_(0, where, counts)

    def rows(self, labels: list[int]) -> list[dict[str, Any]]:
        """One row per class (index order), labelled with ``labels``."""
        sums, queries, slots = self.sums.cpu(), self.queries.cpu(), self.slots.cpu()
        worst: dict[int, tuple[int, int]] = {}  # class -> (count, found class): the largest
        for key, count in zip(self.keys.tolist(), self.counts.tolist()):
            c, other = divmod(key, self.n)
            if count > worst.get(c, (0, 0))[0]:  # keys ascend: the lowest class among equals
                worst[c] = (count, other)
        out = []
        for c, label in enumerate(labels):
            n_q = int(queries[c])
            row: dict[str, Any] = {"class": int(label), "queries": n_q}
            for i, name in enumerate(self.SCORES):
                row[name] = float(sums[i, c]) / n_q if n_q else math.nan
            held, other = worst.get(c, (0, -1))
            row["confused_with"] = int(labels[other]) if held else None
            row["confused_share"] = held / float(slots[c]) if n_q else math.nan
            out.append(row)
        return out

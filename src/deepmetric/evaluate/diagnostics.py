"""Per-class diagnostics of test embeddings: the per-class table (triplet ordering, margins,
verification accuracy, precision@1) and the shares of easy / semi-hard / hard test triplets.

Memory stays bounded for any test set: distances only for sampled triplets and pairs, blocks of
queries for the nearest neighbours, and a stratified sample of items for the triplet categories;
never an N x N matrix of the whole set.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from deepmetric.distances import Metric, check_embeddings, check_metric, paired_at, pairwise
from deepmetric.evaluate.pairs import (
    Groups,
    generator,
    group_by_label,
    others,
    sample_distinct,
    triangle,
)
from deepmetric.mining import triplet_categories
from deepmetric.neighbors import check_labels, nearest_other

__all__ = ["JudgedPairs", "per_class_table", "test_triplet_categories"]


# ----------------------------------------------------------------------------- per-class table


class JudgedPairs(NamedTuple):
    """Pairs of items, each already accepted or rejected by some decision rule.

    ``i``, ``j``: (n,) int64 item indices; ``same``: (n,) bool, ``labels[i] == labels[j]``;
    ``accepted``: (n,) bool, the pair was declared "same" (e.g. the out-of-fold decisions of
    :func:`deepmetric.evaluate.roc.out_of_fold`).
    """

    i: torch.Tensor
    j: torch.Tensor
    same: torch.Tensor
    accepted: torch.Tensor


def _class_triplets(
    groups: Groups, c: int, cap: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, p, n) of class number c: all the n_c (n_c - 1) (N - n_c) valid triplets if at most
    ``cap``, else a uniform sample of ``cap`` of them without replacement."""
    m = int(groups.count[c])
    n_others = len(groups.order) - m
    total = m * (m - 1) * n_others
    r = sample_distinct(total, cap, g)
    pair, neg = r // max(n_others, 1), r % max(n_others, 1)  # r is empty when n_others == 0
    a = pair // max(m - 1, 1)
    q = pair % max(m - 1, 1)
    p = q + (q >= a).long()
    members = groups.order[int(groups.start[c]) : int(groups.start[c]) + m]
    return members[a], members[p], others(groups, c, neg)


def _class_pairs(
    groups: Groups, c: int, cap: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c's positive pairs (all, or a uniform sample of ``cap``) and negative pairs (one
    member in c; all, or a uniform sample of ``cap``): (i_pos, j_pos, i_neg, j_neg)."""
    m = int(groups.count[c])
    n_others = len(groups.order) - m
    members = groups.order[int(groups.start[c]) : int(groups.start[c]) + m]
    a, b = triangle(sample_distinct(m * (m - 1) // 2, cap, g))
    r = sample_distinct(m * n_others, cap, g)
    inside, outside = r // max(n_others, 1), r % max(n_others, 1)
    return members[a], members[b], members[inside], others(groups, c, outside)


def _judged_accuracy(groups: Groups, labels: torch.Tensor, judged: JudgedPairs) -> list[float]:
    """Per class number c: ``(TAR + (1 - FAR)) / 2`` of the judged pairs, over the positive pairs
    of class c and the negative pairs with one member in c (NaN where either kind is absent)."""
    i, j, same, accepted = (t.detach().cpu() for t in judged)
    n = len(i)
    if not all(t.dim() == 1 and len(t) == n for t in (j, same, accepted)):
        raise ValueError("judged: i, j, same and accepted must be 1-D of one length")
    if same.dtype != torch.bool or accepted.dtype != torch.bool:
        raise ValueError("judged: same and accepted must be bool tensors")
    if n and (
        min(int(i.min()), int(j.min())) < 0 or max(int(i.max()), int(j.max())) >= len(labels)
    ):
        raise ValueError(f"judged: item indices must be in [0, {len(labels)})")
    classes = groups.classes.long()
    ci = torch.searchsorted(classes, labels[i].long())  # class numbers of the two items
    cj = torch.searchsorted(classes, labels[j].long())
    if not torch.equal(ci == cj, same):
        raise ValueError("judged: same disagrees with the labels")
    k = len(groups.classes)
    pos = torch.bincount(ci[same], minlength=k).double()
    pos_accepted = torch.bincount(ci[same], weights=accepted[same].double(), minlength=k)
    # a negative pair counts for the class of each of its two (different-class) items
    neg_c = torch.cat([ci[~same], cj[~same]])
    neg_rejected = (~accepted[~same]).double().repeat(2)
    neg = torch.bincount(neg_c, minlength=k).double()
    neg_ok = torch.bincount(neg_c, weights=neg_rejected, minlength=k)
    tar = torch.where(pos > 0, pos_accepted / pos.clamp_min(1), math.nan)
    tnr = torch.where(neg > 0, neg_ok / neg.clamp_min(1), math.nan)
    return ((tar + tnr) / 2).tolist()


#: The most triplets (and pairs of each kind) per class; with many classes the per-class cap
#: shrinks so that all classes together hold about :data:`TOTAL_SAMPLES` (at least
#: :data:`MIN_PER_CLASS` each): 20,000 up to 100 classes, 2,663 for 751.
MAX_PER_CLASS = 20_000
TOTAL_SAMPLES = 2_000_000
MIN_PER_CLASS = 1_000


def per_class_budget(classes: int) -> int:
    """The default per-class cap of :func:`per_class_table` for ``classes`` classes."""
    return min(MAX_PER_CLASS, max(MIN_PER_CLASS, TOTAL_SAMPLES // max(classes, 1)))


def _nan_if_empty(value: torch.Tensor, reduce: str) -> float:
    if value.numel() == 0:
        return math.nan
    return float(getattr(value.double(), reduce)())


@torch.no_grad()
def per_class_table(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: Metric = "euclidean",
    threshold: float | None = None,
    judged: JudgedPairs | None = None,
    max_triplets_per_class: int | None = None,
    max_pairs_per_class: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-class diagnostics of test embeddings, one row per class in ascending label order.

    Row keys:

    - ``class`` (the label), ``n`` (its items), ``triplets`` (triplets used);
    - ``triplet_accuracy``: the share of triplets (a, p, n) with ``label a = label p = c``,
      ``p != a``, ``label n != c`` where ``d(a, p) < d(a, n)``; all the
      ``n_c (n_c - 1) (N - n_c)`` triplets when there are at most ``max_triplets_per_class``,
      else a uniform sample (without replacement) of that many;
    - ``margin_min``, ``margin_max``, ``margin_mean`` of ``d(a, p) - d(a, n)`` over them
      (negative is good);
    - ``verification_accuracy``, ``(TAR + (1 - FAR)) / 2`` over the class's positive pairs and
      its negative pairs (one member in c): the accuracy on the positive pairs and as many
      negative pairs, in expectation over the choice of those negatives. With ``threshold``: over
      all the class's positive pairs and all its negative pairs (each kind: a uniform sample of
      ``max_pairs_per_class`` when there are more), accepted when ``d <= threshold``. With
      ``judged``: over the judged pairs that are the class's, with their given decisions;
    - ``precision_at_1``: the share of the class's items whose nearest other item (lowest index
      among equal distances) has the same label.

    The caps (None: :func:`per_class_budget` of the number of classes, 20,000 up to 100
    classes, fewer beyond so the whole table stays about 2,000,000 samples) bound the work.
    Statistics without data (a singleton class, a single class) are NaN. Sampling uses one
    generator seeded with ``seed``, through the classes in order. Memory: distances only for the
    sampled triplets and pairs (with :func:`~deepmetric.distances.paired_at`), and blocks of 1024
    queries x N for the nearest neighbours; never an N x N matrix.

    Args:
        embeddings: (N, D) floating embeddings (any device).
        labels: (N,) integer labels.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        threshold: the verification threshold, chosen on other (validation) data.
        judged: instead of ``threshold``, pairs of these items already decided, e.g. the
            cross-validated decisions on the scored verification pairs when there is no
            validation data (so no decision comes from a threshold fitted on the pair it judges).

    Exactly one of ``threshold`` and ``judged`` is given.
    """
    check_metric(metric)
    check_embeddings(embeddings)
    check_labels(labels, len(embeddings))
    budget = per_class_budget(len(torch.unique(labels)))
    max_triplets_per_class = max_triplets_per_class or budget
    max_pairs_per_class = max_pairs_per_class or budget
    if max_triplets_per_class < 1 or max_pairs_per_class < 1:
        raise ValueError("max_triplets_per_class and max_pairs_per_class must be >= 1")
    if (threshold is None) == (judged is None):
        raise ValueError("give exactly one of threshold and judged")
    x = embeddings.detach()
    lab = labels.detach().cpu()
    groups = group_by_label(lab)
    if len(lab) > 1:
        _, correct = nearest_other(x, labels, metric)
        correct = correct.cpu()
    else:
        correct = torch.zeros(len(lab), dtype=torch.bool)
    judged_accuracy = None if judged is None else _judged_accuracy(groups, lab, judged)
    g = generator(seed)

    # Sample every class first (the generator in the same order as one class at a time), then
    # compute all the distances in a few large calls instead of four small ones per class.
    triplets, pairs = [], []
    for c in range(len(groups.classes)):
        triplets.append(_class_triplets(groups, c, max_triplets_per_class, g))
        if judged_accuracy is None:
            pairs.append(_class_pairs(groups, c, max_pairs_per_class, g))

    def dist(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return paired_at(x, i, j, metric).double().cpu()

    def split(values: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        return torch.split(values, sizes)

    sizes = [len(t[0]) for t in triplets]
    a, p, n = (torch.cat([t[k] for t in triplets]) for k in range(3))
    margins = split(dist(a, p) - dist(a, n), sizes)
    if judged_accuracy is None:
        assert threshold is not None
        pos_sizes = [len(t[0]) for t in pairs]
        neg_sizes = [len(t[2]) for t in pairs]
        i_pos, j_pos, i_neg, j_neg = (torch.cat([t[k] for t in pairs]) for k in range(4))
        accepted = split((dist(i_pos, j_pos) <= threshold).double(), pos_sizes)
        rejected = split((dist(i_neg, j_neg) > threshold).double(), neg_sizes)
    rows = []
    for c in range(len(groups.classes)):
        margin = margins[c]
        if judged_accuracy is None:
            verification = (
                _nan_if_empty(accepted[c], "mean") + _nan_if_empty(rejected[c], "mean")
            ) / 2
        else:
            verification = judged_accuracy[c]
        members = groups.order[int(groups.start[c]) : int(groups.start[c] + groups.count[c])]
        hits = correct[members].double() if len(lab) > 1 else lab[:0].double()
        rows.append(
            {
                "class": int(groups.classes[c]),
                "n": int(groups.count[c]),
                "triplets": sizes[c],
                "triplet_accuracy": _nan_if_empty(margin < 0, "mean"),
                "margin_min": _nan_if_empty(margin, "min"),
                "margin_max": _nan_if_empty(margin, "max"),
                "margin_mean": _nan_if_empty(margin, "mean"),
                "verification_accuracy": verification,
                "precision_at_1": _nan_if_empty(hits, "mean"),
            }
        )
    return rows


# ----------------------------------------------------------------------------- triplet categories


def _stratified_sample(groups: Groups, k: int, g: torch.Generator) -> torch.Tensor:
    """Sorted indices of k items: per class, a uniform sample of its share of k (largest
    remainder rounding of ``k n_c / N``, ties to the lower class)."""
    n = len(groups.order)
    exact = groups.count.double() * k / n
    quota = torch.floor(exact).long()
    extra = k - int(quota.sum())
    if extra:
        by_remainder = torch.argsort(-(exact - quota), stable=True)
        quota[by_remainder[:extra]] += 1
    chosen = []
    for c in range(len(groups.classes)):
        start, m = int(groups.start[c]), int(groups.count[c])
        pick = torch.randperm(m, generator=g)[: int(quota[c])]
        chosen.append(groups.order[start + pick])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def test_triplet_categories(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    metric: Metric = "euclidean",
    max_items: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """Shares of easy, semi-hard and hard triplets among all valid triplets of a test set.

    Categories as in :func:`deepmetric.mining.triplet_categories` (hard ``d_an <= d_ap``,
    semi-hard ``d_ap < d_an < d_ap + margin``, easy ``d_an >= d_ap + margin``), counted on the
    pairwise distance matrix of the items. When N > ``max_items``, a deterministic stratified
    sample of ``max_items`` items (each class in proportion to its size) is used, so the memory is
    O(max_items^2).

    Returns:
        ``easy``, ``semi_hard``, ``hard`` (fractions summing to 1; NaN when there is no valid
        triplet), ``triplets`` (the count), ``sampled_items`` (the number of items used) and
        ``sampled`` (True when that is a sample of fewer than N items).
    """
    check_metric(metric)
    check_embeddings(embeddings)
    check_labels(labels, len(embeddings))
    if max_items < 2:
        raise ValueError(f"max_items must be >= 2, got {max_items}")
    lab = labels.detach().cpu()
    x = embeddings.detach()
    sampled = len(lab) > max_items
    if sampled:
        keep = _stratified_sample(group_by_label(lab), max_items, generator(seed))
        x, lab = x[keep.to(x.device)], lab[keep]
    dist = pairwise(x, metric=metric)
    counts = triplet_categories(dist, lab.to(dist.device), margin=margin)
    total = counts.total
    return {
        "easy": counts.easy / total if total else math.nan,
        "semi_hard": counts.semi_hard / total if total else math.nan,
        "hard": counts.hard / total if total else math.nan,
        "triplets": total,
        "sampled_items": len(lab),
        "sampled": sampled,
    }


test_triplet_categories.__test__ = False  # type: ignore[attr-defined]  # not a pytest test

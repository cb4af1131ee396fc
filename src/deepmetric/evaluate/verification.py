"""Verification: is a pair of items of the same kind? Decided by thresholding their distance.

Conventions used throughout:

- A pair is *accepted* (declared "same") when its distance ``d <= t``.
- ``distances`` is a 1-D floating tensor (n,) of finite values; ``same`` is a 1-D (n,) bool tensor
  (integer 0/1 is accepted too): True for a positive pair (same label), False for a negative one.
  Array-likes (lists, NumPy arrays) are converted with :func:`torch.as_tensor`.
- With P positive and N negative pairs: the true accept rate ``TAR(t) = #{positive, d <= t} / P``,
  the false accept rate ``FAR(t) = #{negative, d <= t} / N``, the false reject rate
  ``FRR(t) = 1 - TAR(t)``, and the accuracy ``(#{positive, d <= t} + #{negative, d > t}) / n``.
- Everything from one set of pairs is computed from one sort of the distances, O(n log n); equal
  distances always move together (they are accepted or rejected as a group).
- A threshold is never scored on the pairs it was chosen on: choose it on validation pairs with
  :func:`choose_threshold` and pass it to :func:`verification_metrics`, or use
  :func:`cross_validated_accuracy` (the LFW protocol).

Invalid input (mismatched lengths, NaN or infinite distances, a ROC statistic without any positive
or any negative pair) raises ``ValueError`` with a message saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from deepmetric.distances import Metric, check_embeddings, check_metric, paired, pairwise
from deepmetric.mining import check_labels, triplet_categories

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "best_threshold",
    "choose_threshold",
    "cross_validated_accuracy",
    "cross_validation_folds",
    "eer",
    "per_class_table",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "test_triplet_categories",
    "verification_metrics",
    "verification_pairs",
]

#: FAR operating points reported by :func:`tar_at_far` and :func:`verification_metrics`.
DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-3, 1e-2)

#: Queries per block when searching every item's nearest neighbour (precision@1).
_NN_CHUNK = 1024


# ----------------------------------------------------------------------------- validation


def _check_pairs(distances: Any, same: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated CPU copies: ``distances`` (n,) floating, finite; ``same`` (n,) bool; n >= 1."""
    d = distances if isinstance(distances, torch.Tensor) else torch.as_tensor(distances)
    s = same if isinstance(same, torch.Tensor) else torch.as_tensor(same)
    if d.dim() != 1:
        raise ValueError(f"distances must be 1-D (n,), got shape {tuple(d.shape)}")
    if not d.is_floating_point():
        raise ValueError(f"distances must be a floating-point tensor, got {d.dtype}")
    if s.dim() != 1:
        raise ValueError(f"same must be 1-D (n,), got shape {tuple(s.shape)}")
    if len(d) != len(s):
        raise ValueError(f"distances has {len(d)} entries but same has {len(s)}")
    if len(d) == 0:
        raise ValueError("no pairs: distances and same are empty")
    d = d.detach().cpu()
    s = s.detach().cpu()
    if s.dtype != torch.bool:
        if s.is_floating_point() or s.is_complex() or not ((s == 0) | (s == 1)).all():
            raise ValueError(f"same must be a bool (or 0/1 integer) tensor, got {s.dtype}")
        s = s.bool()
    if torch.isnan(d).any():
        raise ValueError("distances contain NaN")
    if not torch.isfinite(d).all():
        raise ValueError("distances contain inf; verification needs finite distances")
    return d, s


def _counts(s: torch.Tensor) -> tuple[int, int]:
    positives = int(s.sum())
    return positives, len(s) - positives


def _require_both(positives: int, negatives: int) -> None:
    if positives == 0:
        raise ValueError("no positive pair (same == True): the statistic is undefined")
    if negatives == 0:
        raise ValueError("no negative pair (same == False): the statistic is undefined")


def _check_labels_tensor(labels: Any) -> torch.Tensor:
    lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    n = len(lab) if lab.dim() == 1 else -1
    check_labels(lab, n)
    return lab.detach().cpu()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------- the sorted ROC


class _Roc(NamedTuple):
    """Cumulative counts at every distinct threshold, (m + 1,) each, m = #distinct distances.

    ``thresholds[0] = -inf`` (nothing accepted), then the distinct distances ascending;
    ``tp[k]`` / ``fp[k]`` (int64): positive / negative pairs with ``d <= thresholds[k]``.
    """

    thresholds: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    positives: int
    negatives: int


def _roc_sorted(values: torch.Tensor, s_sorted: torch.Tensor) -> _Roc:
    """The ROC counts of pairs already sorted by distance (``values`` ascending). O(n)."""
    n = len(values)
    tp = torch.cumsum(s_sorted, 0, dtype=torch.int64)
    fp = torch.arange(1, n + 1, dtype=torch.int64) - tp
    last = torch.ones(n, dtype=torch.bool)  # last pair of each run of equal distances
    last[:-1] = values[1:] != values[:-1]
    zero = torch.zeros(1, dtype=torch.int64)
    thresholds = torch.cat([torch.full((1,), -math.inf, dtype=values.dtype), values[last]])
    positives = int(tp[-1]) if n else 0
    tp, fp = torch.cat([zero, tp[last]]), torch.cat([zero, fp[last]])
    return _Roc(thresholds, tp, fp, positives, n - positives)


def _roc(d: torch.Tensor, s: torch.Tensor) -> _Roc:
    values, order = torch.sort(d)
    return _roc_sorted(values, s[order])


def _rates(roc: _Roc) -> tuple[torch.Tensor, torch.Tensor]:
    """(FAR, TAR) float64 at every point of ``roc``."""
    return roc.fp.double() / roc.negatives, roc.tp.double() / roc.positives


def _auc(roc: _Roc) -> float:
    # Trapezoids, exactly in integers: 2 P N AUC = sum_k dFP_k (TP_k + TP_{k-1}).
    twice = int(((roc.fp[1:] - roc.fp[:-1]) * (roc.tp[1:] + roc.tp[:-1])).sum())
    return twice / (2 * roc.positives * roc.negatives)


def _eer(roc: _Roc) -> tuple[float, float]:
    far, _ = _rates(roc)
    p, n = roc.positives, roc.negatives
    # h = P N (FAR - FRR) = P fp + N tp - P N: strictly increasing from -P N (at -inf) to P N.
    h = roc.fp * p + roc.tp * n - p * n
    k = int(torch.searchsorted(h, torch.zeros(1, dtype=torch.int64))[0])  # first h >= 0
    if int(h[k]) == 0:
        return float(far[k]), float(roc.thresholds[k])
    lo, hi = int(h[k - 1]), int(h[k])
    alpha = -lo / (hi - lo)  # in (0, 1): where FAR - FRR crosses 0 on the segment
    rate = float(far[k - 1]) + alpha * float(far[k] - far[k - 1])
    t_hi = float(roc.thresholds[k])
    if k == 1:  # the lower point is the (0, 0) point at -inf
        return rate, t_hi
    t_lo = float(roc.thresholds[k - 1])
    return rate, t_lo + alpha * (t_hi - t_lo)


def _far_key(target: float) -> str:
    """``1e-03`` for 0.001; more digits only where needed to tell targets apart."""
    for digits in range(17):
        key = f"{target:.{digits}e}"
        if float(key) == target:
            return key
    return repr(target)


def _tar_at_far(roc: _Roc, far_targets: Sequence[float]) -> dict[str, float]:
    far, tar = _rates(roc)
    out: dict[str, float] = {}
    for target in far_targets:
        target = float(target)
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"FAR targets must be in [0, 1], got {target}")
        # TAR and FAR both increase with t: the last point with FAR <= target has the largest TAR.
        k = int(torch.searchsorted(far, torch.tensor([target], dtype=torch.float64), right=True))
        out[_far_key(target)] = float(tar[k - 1])
    return out


def _best_sorted(values: torch.Tensor, s_sorted: torch.Tensor) -> tuple[float, float]:
    """best_threshold on pairs sorted by distance."""
    roc = _roc_sorted(values, s_sorted)
    correct = roc.tp + (roc.negatives - roc.fp)  # accept exactly the points up to index k
    k = int(torch.argmax(correct))  # first maximum: the smallest threshold among ties
    u = roc.thresholds[1:]  # distinct distances, ascending, in the distances' dtype
    m = len(u)
    if k == 0:  # below the minimum: mirror the first midpoint (or 1 below a single value)
        t = u[0] - (u[1] - u[0]) / 2 if m > 1 else u[0] - 1
        if not t < u[0]:
            t = torch.nextafter(u[0], torch.tensor(-math.inf, dtype=u.dtype))
    elif k == m:  # above the maximum: mirror the last midpoint (or 1 above a single value)
        t = u[m - 1] + (u[m - 1] - u[m - 2]) / 2 if m > 1 else u[m - 1] + 1
    else:  # midpoint between the k-th and (k+1)-th distinct distances, strictly below the latter
        a, b = u[k - 1], u[k]
        t = a + (b - a) / 2
        if not t < b:
            t = a
    return float(t), int(correct[k]) / len(values)


def _accuracy(d: torch.Tensor, s: torch.Tensor, threshold: float) -> float:
    return float(((d.double() <= threshold) == s).double().mean())


# ----------------------------------------------------------------------------- pair sampling


def _sample_distinct(total: int, k: int, g: torch.Generator) -> torch.Tensor:
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


def _triangle(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair number r -> (a, b), a < b, with r = b (b - 1) / 2 + a (column-wise lower triangle)."""
    b = torch.floor((1 + torch.sqrt(1 + 8 * r.double())) / 2).long()
    for _ in range(2):  # fix float rounding for huge r
        b = b - (b * (b - 1) // 2 > r).long()
        b = b + ((b + 1) * b // 2 <= r).long()
    return r - b * (b - 1) // 2, b


def _randbelow(high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Uniform integers in [0, high) elementwise (bias < high / 2^62)."""
    return torch.randint(0, 2**62, high.shape, generator=g) % high


class _Groups(NamedTuple):
    """Items grouped by label: ``order`` (N,) indices sorted by label (ascending index within a
    class); class ``c``'s members are ``order[start[c] : start[c] + count[c]]``."""

    classes: torch.Tensor
    count: torch.Tensor
    start: torch.Tensor
    order: torch.Tensor


def _groups(labels: torch.Tensor) -> _Groups:
    order = torch.argsort(labels, stable=True)
    classes, count = torch.unique_consecutive(labels[order], return_counts=True)
    return _Groups(classes, count, torch.cumsum(count, 0) - count, order)


def _others(groups: _Groups, c: int, u: torch.Tensor) -> torch.Tensor:
    """The u-th item (0 <= u < N - n_c) not in class number c, elementwise (u may be a tensor
    of per-element class numbers c too)."""
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
    lab = _check_labels_tensor(labels)
    if max_positive < 1:
        raise ValueError(f"max_positive must be >= 1, got {max_positive}")
    groups = _groups(lab)
    if len(groups.classes) < 2:
        raise ValueError("verification pairs need at least two classes (no negative pair)")
    per_class = groups.count * (groups.count - 1) // 2
    total = int(per_class.sum())
    if total == 0:
        raise ValueError("no positive pair: every class has a single item")
    g = _generator(seed)

    r = _sample_distinct(total, max_positive, g)
    ends = torch.cumsum(per_class, 0)
    c = torch.searchsorted(ends, r, right=True)  # class number of each pair
    a, b = _triangle(r - (ends - per_class)[c])
    pos_i = groups.order[groups.start[c] + a]
    pos_j = groups.order[groups.start[c] + b]  # order is ascending within a class: pos_i < pos_j

    k = len(r)
    n = len(lab)
    # Ordered negative pairs (x, y) with x in class c: n_c (N - n_c) of them, so drawing c with
    # that weight, then x in c and y outside c uniformly, is uniform over negative pairs.
    weight = (groups.count * (n - groups.count)).double()
    c = torch.multinomial(weight, k, replacement=True, generator=g)
    x = groups.order[groups.start[c] + _randbelow(groups.count[c], g)]
    u = _randbelow(n - groups.count[c], g)
    y = groups.order[u + groups.count[c] * (u >= groups.start[c]).long()]
    neg_i, neg_j = torch.minimum(x, y), torch.maximum(x, y)

    i = torch.cat([pos_i, neg_i])
    j = torch.cat([pos_j, neg_j])
    same = torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
    device = labels.device if isinstance(labels, torch.Tensor) else torch.device("cpu")
    return i.to(device), j.to(device), same.to(device)


# ----------------------------------------------------------------------------- ROC statistics


def roc_curve(
    distances: torch.Tensor, same: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ROC of the rule ``d <= t`` at every distinct threshold. One sort, O(n log n).

    Convention: ``thresholds`` (m + 1,) is ``-inf`` followed by the m distinct distances in
    ascending order; point k is the operating point of ``d <= thresholds[k]``. So the curve starts
    at (FAR, TAR) = (0, 0) for ``-inf`` and ends at (1, 1) for the largest distance. Equal
    distances make a single point (there is no threshold that separates them).

    Returns:
        ``(far, tar, thresholds)``: float64 (m + 1,), float64 (m + 1,), and the thresholds in the
        distances' dtype; ``far`` and ``tar`` are non-decreasing.

    Raises:
        ValueError: bad input, no positive or no negative pair.
    """
    d, s = _check_pairs(distances, same)
    roc = _roc(d, s)
    _require_both(roc.positives, roc.negatives)
    far, tar = _rates(roc)
    return far, tar, roc.thresholds


def roc_auc(distances: torch.Tensor, same: torch.Tensor) -> float:
    """Area under :func:`roc_curve` (trapezoids, computed exactly in integers).

    Equals ``P(d_pos < d_neg) + P(d_pos == d_neg) / 2`` for a random positive and a random
    negative pair (the Mann-Whitney statistic): 1 is perfect, 0.5 is chance. O(n log n).
    """
    d, s = _check_pairs(distances, same)
    roc = _roc(d, s)
    _require_both(roc.positives, roc.negatives)
    return _auc(roc)


def eer(distances: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """Equal error rate: the error where FAR = FRR (= 1 - TAR).

    FAR - FRR is strictly increasing along :func:`roc_curve` from -1 (at ``-inf``) to 1. If it
    is 0 at a point, that point's FAR and threshold are returned. Otherwise the crossing lies
    between the two consecutive points k - 1, k that bracket it; with
    ``alpha = -g_{k-1} / (g_k - g_{k-1})`` (g = FAR - FRR), the EER is
    ``FAR_{k-1} + alpha (FAR_k - FAR_{k-1})`` (which equals the interpolated FRR), and the
    threshold is interpolated the same way between ``t_{k-1}`` and ``t_k``; when point k - 1 is
    the ``-inf`` point, the threshold is ``t_k`` (the smallest distance).

    Returns:
        ``(eer, threshold)`` as floats.
    """
    d, s = _check_pairs(distances, same)
    roc = _roc(d, s)
    _require_both(roc.positives, roc.negatives)
    return _eer(roc)


def tar_at_far(
    distances: torch.Tensor,
    same: torch.Tensor,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> dict[str, float]:
    """For each target: the largest TAR over the ROC points with ``FAR <= target``.

    No interpolation: the point must be reachable by a threshold. Keys are the targets in
    exponent notation, as short as exact: ``{"1e-03": ..., "1e-02": ...}``. Targets in [0, 1].
    """
    d, s = _check_pairs(distances, same)
    roc = _roc(d, s)
    _require_both(roc.positives, roc.negatives)
    return _tar_at_far(roc, far_targets)


def best_threshold(distances: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """The threshold that maximises accuracy on these pairs, and that accuracy. O(n log n).

    Candidates: one threshold per way of splitting the sorted distinct distances
    ``u_1 < ... < u_m`` into accepted and rejected: the midpoints ``(u_k + u_{k+1}) / 2``
    (computed in the distances' dtype, and kept strictly below ``u_{k+1}``), below the minimum
    ``u_1 - (u_2 - u_1) / 2`` (reject all) and above the maximum ``u_m + (u_m - u_{m-1}) / 2``
    (accept all); with a single distinct value, ``u_1 - 1`` and ``u_1 + 1``. Ties in accuracy go
    to the smallest threshold. Works with only positive or only negative pairs.

    Returns:
        ``(threshold, accuracy)``: ``accuracy`` is exactly the accuracy of ``d <= threshold``.
    """
    d, s = _check_pairs(distances, same)
    values, order = torch.sort(d)
    return _best_sorted(values, s[order])


def choose_threshold(dist_val: torch.Tensor, same_val: torch.Tensor) -> float:
    """The accuracy-maximising threshold on validation pairs (:func:`best_threshold`), to be
    used on other (test) pairs with :func:`verification_metrics`."""
    return best_threshold(dist_val, same_val)[0]


def verification_metrics(
    dist_eval: torch.Tensor,
    same_eval: torch.Tensor,
    *,
    threshold: float,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
) -> dict[str, Any]:
    """All the verification statistics of evaluation pairs, from one sort.

    Args:
        dist_eval, same_eval: (n,) distances and same-label flags of the evaluation pairs.
        threshold: the decision threshold, chosen elsewhere (:func:`choose_threshold` on
            validation pairs); it is never re-tuned here.
        far_targets: the FAR operating points of ``tar_at_far``.

    Returns:
        ``accuracy`` (of ``d <= threshold``), ``roc_auc``, ``eer``, ``eer_threshold``,
        ``tar_at_far`` (dict, see :func:`tar_at_far`), ``threshold``, and the counts ``pairs``,
        ``positive_pairs``, ``negative_pairs``.
    """
    d, s = _check_pairs(dist_eval, same_eval)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    roc = _roc(d, s)
    _require_both(roc.positives, roc.negatives)
    rate, eer_threshold = _eer(roc)
    return {
        "accuracy": _accuracy(d, s, threshold),
        "roc_auc": _auc(roc),
        "eer": rate,
        "eer_threshold": eer_threshold,
        "tar_at_far": _tar_at_far(roc, far_targets),
        "threshold": threshold,
        "pairs": len(d),
        "positive_pairs": roc.positives,
        "negative_pairs": roc.negatives,
    }


# ----------------------------------------------------------------------------- cross-validation


def cross_validation_folds(same: torch.Tensor, *, folds: int = 10, seed: int = 0) -> torch.Tensor:
    """Deterministic stratified fold of every pair: (n,) int64 in [0, folds).

    The positive pairs, shuffled, then the negative pairs, shuffled, are dealt round-robin to the
    folds, so every fold has the same number of pairs and of positives up to one.
    """
    s = same if isinstance(same, torch.Tensor) else torch.as_tensor(same)
    _, s = _check_pairs(torch.zeros(len(s), dtype=torch.float64), s)
    n = len(s)
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, number of pairs = {n}], got {folds}")
    g = _generator(seed)
    pos = torch.nonzero(s).flatten()
    neg = torch.nonzero(~s).flatten()
    pos = pos[torch.randperm(len(pos), generator=g)]
    neg = neg[torch.randperm(len(neg), generator=g)]
    dealt = torch.cat([pos, neg])
    fold = torch.empty(n, dtype=torch.int64)
    fold[dealt] = torch.arange(n, dtype=torch.int64) % folds
    return fold


def cross_validated_accuracy(
    distances: torch.Tensor, same: torch.Tensor, *, folds: int = 10, seed: int = 0
) -> tuple[float, float, list[float]]:
    """The LFW protocol: k-fold cross-validated verification accuracy.

    The pairs are split by :func:`cross_validation_folds`; for each fold f, the threshold is
    :func:`best_threshold` of the pairs of the other folds only, and the accuracy is that of
    fold f at that threshold. One sort in all, O(n log n + folds n).

    Returns:
        ``(mean, std, thresholds)``: the mean and population standard deviation (ddof = 0, as in
        the LFW evaluation scripts) of the ``folds`` fold accuracies, and each fold's threshold.
    """
    d, s = _check_pairs(distances, same)
    fold = cross_validation_folds(s, folds=folds, seed=seed)
    values, order = torch.sort(d)
    s_sorted, fold_sorted = s[order], fold[order]
    accuracies: list[float] = []
    thresholds: list[float] = []
    for f in range(folds):
        held_out = fold_sorted == f
        t, _ = _best_sorted(values[~held_out], s_sorted[~held_out])  # sorted order is kept
        accuracies.append(_accuracy(values[held_out], s_sorted[held_out], t))
        thresholds.append(t)
    acc = torch.tensor(accuracies, dtype=torch.float64)
    return float(acc.mean()), float(acc.std(correction=0)), thresholds


# ----------------------------------------------------------------------------- per-class table


def _class_triplets(
    groups: _Groups, c: int, cap: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, p, n) of class number c: all the n_c (n_c - 1) (N - n_c) valid triplets if at most
    ``cap``, else a uniform sample of ``cap`` of them without replacement."""
    m = int(groups.count[c])
    others = len(groups.order) - m
    total = m * (m - 1) * others
    r = _sample_distinct(total, cap, g)
    pair, neg = r // max(others, 1), r % max(others, 1)  # r is empty when others == 0
    a = pair // max(m - 1, 1)
    q = pair % max(m - 1, 1)
    p = q + (q >= a).long()
    members = groups.order[int(groups.start[c]) : int(groups.start[c]) + m]
    return members[a], members[p], _others(groups, c, neg)


def _class_pairs(
    groups: _Groups, c: int, cap: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c's positive pairs (all, or a uniform sample of ``cap``) and negative pairs (one
    member in c; all, or a uniform sample of ``cap``): (i_pos, j_pos, i_neg, j_neg)."""
    m = int(groups.count[c])
    others = len(groups.order) - m
    members = groups.order[int(groups.start[c]) : int(groups.start[c]) + m]
    a, b = _triangle(_sample_distinct(m * (m - 1) // 2, cap, g))
    r = _sample_distinct(m * others, cap, g)
    inside, outside = r // max(others, 1), r % max(others, 1)
    return members[a], members[b], members[inside], _others(groups, c, outside)


def _nearest_other(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    """(N,) index of each item's nearest other item (lowest index among ties), in blocks of
    ``_NN_CHUNK`` queries: memory O(_NN_CHUNK N)."""
    n = len(x)
    nearest = torch.empty(n, dtype=torch.int64)
    for start in range(0, n, _NN_CHUNK):
        block = pairwise(x[start : start + _NN_CHUNK], x, metric)
        rows = torch.arange(len(block), device=block.device)
        block[rows, rows + start] = math.inf
        nearest[start : start + len(block)] = block.argmin(dim=1).cpu()
    return nearest


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
    threshold: float,
    max_triplets_per_class: int = 20_000,
    max_pairs_per_class: int = 20_000,
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
    - ``verification_accuracy`` at ``threshold``: the accuracy on the class's positive pairs and
      as many negative pairs with one member in c, taken in expectation over the choice of those
      negatives, i.e. ``(TAR + (1 - FAR)) / 2`` over all the class's positive pairs and all its
      negative pairs (each kind: a uniform sample of ``max_pairs_per_class`` when there are more);
    - ``precision_at_1``: the share of the class's items whose nearest other item (lowest index
      among equal distances) has the same label.

    Statistics without data (a singleton class, a single class) are NaN. Sampling uses one
    generator seeded with ``seed``, through the classes in order. Memory: distances only for the
    sampled triplets and pairs (with :func:`~deepmetric.distances.paired`), and blocks of 1024
    queries x N for the nearest neighbours; never an N x N matrix.

    Args:
        embeddings: (N, D) floating embeddings (any device).
        labels: (N,) integer labels.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        threshold: the verification threshold (chosen on validation data).
    """
    check_metric(metric)
    check_embeddings(embeddings)
    check_labels(labels, len(embeddings))
    if max_triplets_per_class < 1 or max_pairs_per_class < 1:
        raise ValueError("max_triplets_per_class and max_pairs_per_class must be >= 1")
    x = embeddings.detach()
    lab = labels.detach().cpu()
    groups = _groups(lab)
    nearest_label = lab[_nearest_other(x, metric)] if len(lab) > 1 else lab[:0]
    g = _generator(seed)
    device = x.device

    def dist(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return paired(x[i.to(device)], x[j.to(device)], metric).double().cpu()

    rows = []
    for c in range(len(groups.classes)):
        label = int(groups.classes[c])
        a, p, n = _class_triplets(groups, c, max_triplets_per_class, g)
        margin = dist(a, p) - dist(a, n)
        i_pos, j_pos, i_neg, j_neg = _class_pairs(groups, c, max_pairs_per_class, g)
        accepted_pos = (dist(i_pos, j_pos) <= threshold).double()
        rejected_neg = (dist(i_neg, j_neg) > threshold).double()
        members = groups.order[int(groups.start[c]) : int(groups.start[c] + groups.count[c])]
        hits = (nearest_label[members] == label).double() if len(lab) > 1 else lab[:0].double()
        rows.append(
            {
                "class": label,
                "n": int(groups.count[c]),
                "triplets": len(a),
                "triplet_accuracy": _nan_if_empty(margin < 0, "mean"),
                "margin_min": _nan_if_empty(margin, "min"),
                "margin_max": _nan_if_empty(margin, "max"),
                "margin_mean": _nan_if_empty(margin, "mean"),
                "verification_accuracy": (
                    _nan_if_empty(accepted_pos, "mean") + _nan_if_empty(rejected_neg, "mean")
                )
                / 2,
                "precision_at_1": _nan_if_empty(hits, "mean"),
            }
        )
    return rows


# ----------------------------------------------------------------------------- triplet categories


def _stratified_sample(groups: _Groups, k: int, g: torch.Generator) -> torch.Tensor:
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
        keep = _stratified_sample(_groups(lab), max_items, _generator(seed))
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

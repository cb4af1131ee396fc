"""Verification statistics: is a pair of items of the same kind? Decided by thresholding their
distance. ROC curve, AUC, EER, TAR@FAR, the accuracy-maximising threshold, and cross-validation.

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
  :func:`choose_threshold` and pass it to :func:`verification_metrics`, or, without validation
  pairs, use :func:`cross_validated_accuracy` (the LFW protocol) or :func:`out_of_fold`, which
  judges every pair with a threshold fitted on the other folds.

Invalid input (mismatched lengths, NaN or infinite distances, a ROC statistic without any positive
or any negative pair) raises ``ValueError`` with a message saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "OutOfFold",
    "best_threshold",
    "choose_threshold",
    "cross_validated_accuracy",
    "cross_validation_folds",
    "eer",
    "out_of_fold",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "threshold_at_far",
    "verification_metrics",
]

#: FAR operating points reported by :func:`tar_at_far` and :func:`verification_metrics`.
DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-3, 1e-2)


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


def _require_both(positives: int, negatives: int) -> None:
    if positives == 0:
        raise ValueError("no positive pair (same == True): the statistic is undefined")
    if negatives == 0:
        raise ValueError("no negative pair (same == False): the statistic is undefined")


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


def threshold_at_far(distances: torch.Tensor, same: torch.Tensor, far: float) -> float:
    """The largest threshold whose false accept rate on these pairs is ``<= far``.

    With the distinct distances ``u_1 < ... < u_m`` and FAR(t) = #{negative, d <= t} / N
    (non-decreasing in t), let ``k`` be the last point of :func:`roc_curve` with FAR <= far.
    Every ``t`` in ``[u_k, u_{k+1})`` decides these pairs alike, and any larger ``t`` accepts
    ``u_{k+1}`` and exceeds ``far``; the value returned is the midpoint of that interval (kept
    strictly below ``u_{k+1}``), as :func:`~deepmetric.evaluate.best_threshold` places its own.
    Below the smallest distance (even it exceeds ``far``): ``u_1 - (u_2 - u_1) / 2``; above the
    largest (``far >= 1``): ``u_m + (u_m - u_{m-1}) / 2`` (1 below / above with one value).
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    rates, _, points = roc_curve(distances, same)
    k = int(torch.searchsorted(rates, torch.tensor([far], dtype=torch.float64), right=True)) - 1
    u = points[1:]  # distinct distances, ascending, in the distances' dtype
    m = len(u)
    if k == 0:
        return float(u[0] - (u[1] - u[0]) / 2) if m > 1 else float(u[0]) - 1.0
    if k == m:
        return float(u[m - 1] + (u[m - 1] - u[m - 2]) / 2) if m > 1 else float(u[0]) + 1.0
    a, b = u[k - 1], u[k]
    t = a + (b - a) / 2
    return float(t if t < b else a)


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


def cross_validation_folds(
    same: torch.Tensor,
    *,
    folds: int = 10,
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic stratified fold of every pair: (n,) int64 in [0, folds).

    The positive pairs, shuffled, then the negative pairs, shuffled, are dealt round-robin to the
    folds, so every fold has the same number of pairs and of positives up to one.

    ``groups`` (n,) integer, optional: pairs with equal ids (e.g. the same pair of items drawn
    twice) are kept in one fold, that of the group's first pair in the dealing order; only first
    pairs advance the deal (so there must be at least ``folds`` groups). So a pair is never
    scored with a threshold fitted on its own copy. With every id distinct the folds are those
    without ``groups``.
    """
    s = same if isinstance(same, torch.Tensor) else torch.as_tensor(same)
    _, s = _check_pairs(torch.zeros(len(s), dtype=torch.float64), s)
    n = len(s)
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, number of pairs = {n}], got {folds}")
    g = torch.Generator().manual_seed(int(seed))
    pos = torch.nonzero(s).flatten()
    neg = torch.nonzero(~s).flatten()
    pos = pos[torch.randperm(len(pos), generator=g)]
    neg = neg[torch.randperm(len(neg), generator=g)]
    dealt = torch.cat([pos, neg])
    fold = torch.empty(n, dtype=torch.int64)
    if groups is None:
        fold[dealt] = torch.arange(n, dtype=torch.int64) % folds
        return fold
    if not isinstance(groups, torch.Tensor) or groups.shape != (n,) or groups.is_floating_point():
        raise ValueError(f"groups must be an integer tensor of shape ({n},)")
    ids, group = torch.unique(groups.detach().cpu()[dealt], return_inverse=True)
    if len(ids) < folds:
        raise ValueError(f"folds must be at most the number of groups ({len(ids)}), got {folds}")
    position = torch.arange(n, dtype=torch.int64)
    first = torch.full((int(group.max()) + 1,), n, dtype=torch.int64)
    first = first.scatter_reduce(0, group, position, reduce="amin")  # each group's first deal
    leads = first[group] == position
    rank = torch.cumsum(leads.long(), 0) - 1  # among the first pairs: the deal of a new group
    fold[dealt] = rank[first[group]] % folds
    return fold


class OutOfFold(NamedTuple):
    """Cross-validated decisions: every pair judged with a threshold fitted on the other folds.

    ``accepted`` (n,) bool: ``d <= thresholds[fold]``; ``fold`` (n,) int64; ``thresholds``: each
    fold's threshold (:func:`best_threshold` of the pairs of the other folds); ``accuracies``:
    each fold's accuracy at its threshold.
    """

    accepted: torch.Tensor
    fold: torch.Tensor
    thresholds: list[float]
    accuracies: list[float]


def out_of_fold(
    distances: torch.Tensor,
    same: torch.Tensor,
    *,
    folds: int = 10,
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> OutOfFold:
    """Judge every pair with a threshold that never saw it (k-fold cross-validation).

    The pairs are split by :func:`cross_validation_folds` (``groups``: see there); for each fold
    f the threshold is :func:`best_threshold` of the pairs of the other folds only, and the pairs
    of fold f are accepted when ``d <= threshold_f``. Any statistic of these decisions (the
    accuracy over all pairs, or over a subset such as one class's pairs) is then computed without
    a threshold fitted on the pairs it scores. One sort in all, O(n log n + folds n).
    """
    d, s = _check_pairs(distances, same)
    fold = cross_validation_folds(s, folds=folds, seed=seed, groups=groups)
    values, order = torch.sort(d)
    s_sorted, fold_sorted = s[order], fold[order]
    thresholds = torch.empty(folds, dtype=torch.float64)
    for f in range(folds):
        held_out = fold_sorted == f
        thresholds[f] = _best_sorted(values[~held_out], s_sorted[~held_out])[0]  # still sorted
    accepted = d.double() <= thresholds[fold]
    correct = (accepted == s).double()
    accuracies = [float(correct[fold == f].mean()) for f in range(folds)]
    return OutOfFold(accepted, fold, thresholds.tolist(), accuracies)


def cross_validated_accuracy(
    distances: torch.Tensor,
    same: torch.Tensor,
    *,
    folds: int = 10,
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> tuple[float, float, list[float]]:
    """The LFW protocol: k-fold cross-validated verification accuracy (see :func:`out_of_fold`).

    Returns:
        ``(mean, std, thresholds)``: the mean and population standard deviation (ddof = 0, as in
        the LFW evaluation scripts) of the ``folds`` fold accuracies, and each fold's threshold.
    """
    cv = out_of_fold(distances, same, folds=folds, seed=seed, groups=groups)
    acc = torch.tensor(cv.accuracies, dtype=torch.float64)
    return float(acc.mean()), float(acc.std(correction=0)), cv.thresholds

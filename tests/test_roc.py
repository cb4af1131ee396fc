"""deepmetric.evaluate.roc: ROC statistics, thresholds and cross-validation, against loops."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric.evaluate import roc as R

# ----------------------------------------------------------------------------- helpers


def _pairs(seed: int, n: int, levels: int, both: bool = True):
    """Random distances (with many ties when ``levels`` is small) and same flags."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        d = torch.randint(0, levels, (n,), generator=g).double() / levels
    else:
        d = torch.rand(n, generator=g, dtype=torch.float64)
    same = torch.rand(n, generator=g) < 0.5
    if both:
        same[0], same[-1] = True, False
    return d, same


pair_sets = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "n": st.integers(2, 25),
        "levels": st.sampled_from([0, 2, 3, 5]),
    }
)


def _count(d, same, t):
    """(accepted positives, accepted negatives, positives, negatives) of ``d <= t``, by loops."""
    tp = fp = p = n = 0
    for di, si in zip(d.tolist(), same.tolist()):
        if si:
            p += 1
            tp += di <= t
        else:
            n += 1
            fp += di <= t
    return tp, fp, p, n


def _accuracy(d, same, t):
    return sum((di <= t) == si for di, si in zip(d.tolist(), same.tolist())) / len(d)


def _all_thresholds(d):
    return [-math.inf, *sorted(set(d.tolist()))]


# ----------------------------------------------------------------------------- ROC


@given(pairs=pair_sets)
def test_roc_curve_counts_every_threshold(pairs):
    d, same = _pairs(**pairs)
    far, tar, thresholds = R.roc_curve(d, same)
    assert thresholds.tolist() == _all_thresholds(d)
    for k, t in enumerate(thresholds.tolist()):
        tp, fp, p, n = _count(d, same, t)
        assert far[k].item() == fp / n
        assert tar[k].item() == tp / p
    assert (far[0].item(), tar[0].item()) == (0.0, 0.0)
    assert (far[-1].item(), tar[-1].item()) == (1.0, 1.0)


@given(pairs=pair_sets)
def test_roc_auc_is_the_probability_a_positive_is_closer(pairs):
    d, same = _pairs(**pairs)
    pos = [x for x, s in zip(d.tolist(), same.tolist()) if s]
    neg = [x for x, s in zip(d.tolist(), same.tolist()) if not s]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a < b else 0.5 if a == b else 0.0
    assert R.roc_auc(d, same) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


@given(pairs=pair_sets)
def test_eer_lies_between_the_bracketing_points(pairs):
    d, same = _pairs(**pairs)
    rate, threshold = R.eer(d, same)
    ts = _all_thresholds(d)
    points = []
    for t in ts:
        tp, fp, p, n = _count(d, same, t)
        points.append((fp / n, 1 - tp / p))  # (FAR, FRR)
    k = next(i for i, (far, frr) in enumerate(points) if far >= frr)
    assert k >= 1
    (far0, frr0), (far1, frr1) = points[k - 1], points[k]
    if far1 == frr1:
        assert rate == pytest.approx(far1, abs=1e-12)
        assert threshold == ts[k]
        return
    assert min(far0, far1) - 1e-12 <= rate <= max(far0, far1) + 1e-12
    assert min(frr0, frr1) - 1e-12 <= rate <= max(frr0, frr1) + 1e-12
    alpha = (frr0 - far0) / ((frr0 - far0) - (frr1 - far1))
    assert rate == pytest.approx(far0 + alpha * (far1 - far0), abs=1e-12)
    assert rate == pytest.approx(frr0 + alpha * (frr1 - frr0), abs=1e-12)  # FAR = FRR there
    if k == 1:
        assert threshold == ts[1]
    else:
        assert ts[k - 1] <= threshold <= ts[k]
        assert threshold == pytest.approx(ts[k - 1] + alpha * (ts[k] - ts[k - 1]), abs=1e-12)


@given(pairs=pair_sets, targets=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3))
def test_tar_at_far_is_the_best_reachable_tar(pairs, targets):
    d, same = _pairs(**pairs)
    found = R.tar_at_far(d, same, targets)
    assert len(found) == len(set(targets))
    for target in targets:
        best = 0.0
        for t in _all_thresholds(d):
            tp, fp, p, n = _count(d, same, t)
            if fp / n <= target:
                best = max(best, tp / p)
        [value] = [v for key, v in found.items() if float(key) == target]
        assert value == best


def test_tar_at_far_keys():
    d, same = _pairs(0, 50, 0)
    assert list(R.tar_at_far(d, same)) == ["1e-03", "1e-02"]
    assert list(R.tar_at_far(d, same, (0.05, 1.5e-3))) == ["5e-02", "1.5e-03"]


@given(pairs=pair_sets, both=st.booleans())
def test_best_threshold_tries_every_candidate(pairs, both):
    d, same = _pairs(**pairs, both=both)
    t, acc = R.best_threshold(d, same)
    u = sorted(set(d.tolist()))
    gap = [u[1] - u[0], u[-1] - u[-2]] if len(u) > 1 else [2.0, 2.0]
    midpoints = [(a + b) / 2 for a, b in itertools.pairwise(u)]
    candidates = [u[0] - gap[0] / 2, *midpoints, u[-1] + gap[1] / 2]
    scores = [_accuracy(d, same, c) for c in candidates]
    best = max(scores)
    assert acc == pytest.approx(best, abs=1e-12)
    assert _accuracy(d, same, t) == pytest.approx(acc, abs=1e-12)  # scored exactly at t
    first = scores.index(best)  # ties go to the smallest threshold
    assert t == pytest.approx(candidates[first], abs=1e-12)
    assert R.choose_threshold(d, same) == t


def test_best_threshold_in_float32_between_adjacent_values():
    one = torch.tensor(1.0, dtype=torch.float32)
    odd = torch.nextafter(one, torch.tensor(2.0))  # odd mantissa: a + ulp / 2 rounds up to b
    for a in (one, odd):
        b = torch.nextafter(a, torch.tensor(2.0))
        d = torch.stack([a, b, b + 1])
        same = torch.tensor([True, False, False])
        t, acc = R.best_threshold(d, same)
        assert acc == 1.0
        assert ((d <= t) == same).all()  # also with torch's float32 comparison
        assert ((d.double() <= t) == same).all()


# ----------------------------------------------------------------------------- metrics


def test_verification_metrics_scores_the_given_threshold():
    d, same = _pairs(3, 200, 0)
    same = same | (d < 0.3)  # some signal
    for t in (-1.0, 0.25, 0.6, 2.0):
        m = R.verification_metrics(d, same, threshold=t, far_targets=(0.1,))
        assert m["threshold"] == t
        assert m["accuracy"] == pytest.approx(_accuracy(d, same, t), abs=1e-12)
        assert m["roc_auc"] == R.roc_auc(d, same)
        assert (m["eer"], m["eer_threshold"]) == R.eer(d, same)
        assert m["tar_at_far"] == R.tar_at_far(d, same, (0.1,))
        assert m["pairs"] == 200
        assert m["positive_pairs"] + m["negative_pairs"] == 200


@pytest.mark.parametrize(
    ("distances", "same", "message"),
    [
        (torch.tensor([0.1, 0.2]), torch.tensor([True]), "entries"),
        (torch.tensor([0.1, math.nan]), torch.tensor([True, False]), "NaN"),
        (torch.tensor([0.1, math.inf]), torch.tensor([True, False]), "inf"),
        (torch.tensor([0.1, 0.2]), torch.tensor([True, True]), "no negative"),
        (torch.tensor([0.1, 0.2]), torch.tensor([False, False]), "no positive"),
        (torch.tensor([[0.1, 0.2]]), torch.tensor([True, False]), "1-D"),
        (torch.tensor([1, 2]), torch.tensor([True, False]), "floating"),
        (torch.tensor([0.1, 0.2]), torch.tensor([2, 0]), "bool"),
        (torch.zeros(0), torch.zeros(0, dtype=torch.bool), "empty"),
    ],
)
def test_bad_pairs_raise(distances, same, message):
    for fn in (R.roc_curve, R.roc_auc, R.eer, R.tar_at_far):
        with pytest.raises(ValueError, match=message):
            fn(distances, same)
    with pytest.raises(ValueError, match=message):
        R.verification_metrics(distances, same, threshold=0.5)


def test_tar_at_far_rejects_bad_targets():
    d, same = _pairs(0, 10, 0)
    with pytest.raises(ValueError, match="FAR targets"):
        R.tar_at_far(d, same, (1.5,))


# ----------------------------------------------------------------------------- cross-validation


@given(pairs=pair_sets, folds=st.integers(2, 5), seed=st.integers(0, 5))
def test_cross_validation_scores_each_fold_with_a_threshold_from_the_others(pairs, folds, seed):
    d, same = _pairs(**pairs)
    if len(d) < folds:
        return
    fold = R.cross_validation_folds(same, folds=folds, seed=seed)
    sizes = torch.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    pos = torch.bincount(fold[same], minlength=folds)
    assert pos.max() - pos.min() <= 1
    mean, std, thresholds = R.cross_validated_accuracy(d, same, folds=folds, seed=seed)
    accs = []
    for f in range(folds):
        train = fold != f
        assert thresholds[f] == R.best_threshold(d[train], same[train])[0]
        accs.append(_accuracy(d[~train], same[~train], thresholds[f]))
    want_mean = sum(accs) / folds
    assert mean == pytest.approx(want_mean, abs=1e-12)
    assert std == pytest.approx(math.sqrt(sum((a - want_mean) ** 2 for a in accs) / folds))


def test_cross_validation_never_looks_at_the_held_out_fold():
    # Fold 0: positives at 1, negatives at 2; fold 1: positives at 3, negatives at 4. On all the
    # data the best threshold is 1.5 (or 3.5), 75 % accurate; each fold's threshold comes from
    # the other fold, 3.5 for fold 0 and 1.5 for fold 1, and scores only 50 % on its own fold.
    same = torch.tensor([True, False] * 4)
    fold = R.cross_validation_folds(same, folds=2, seed=1)
    d = (1 + 2 * fold + (~same).long()).double()
    assert R.best_threshold(d, same) == (1.5, 0.75)
    mean, std, thresholds = R.cross_validated_accuracy(d, same, folds=2, seed=1)
    assert thresholds == [3.5, 1.5]
    assert (mean, std) == (0.5, 0.0)

    # Changing the held-out fold's distances never changes the threshold it is scored with.
    d, same = _pairs(11, 300, 0)
    fold = R.cross_validation_folds(same, folds=10, seed=0)
    _, _, thresholds = R.cross_validated_accuracy(d, same, folds=10, seed=0)
    for f in (0, 4, 9):
        changed = d.clone()
        changed[fold == f] = torch.rand(int((fold == f).sum()), dtype=torch.float64) * 5
        _, _, again = R.cross_validated_accuracy(changed, same, folds=10, seed=0)
        assert again[f] == thresholds[f]
        assert again != thresholds


def test_cross_validation_rejects_bad_folds():
    d, same = _pairs(0, 5, 0)
    for folds in (1, 6):
        with pytest.raises(ValueError, match="folds"):
            R.cross_validated_accuracy(d, same, folds=folds)


# ----------------------------------------------------------------------------- out-of-fold


def _best_by_loops(d, same):
    """best_threshold by trying every candidate (first maximum), with plain Python."""
    u = sorted(set(d))
    if len(u) == 1:
        candidates = [u[0] - 1, u[0] + 1]
    else:
        mids = [(a + b) / 2 for a, b in itertools.pairwise(u)]
        candidates = [u[0] - (u[1] - u[0]) / 2, *mids, u[-1] + (u[-1] - u[-2]) / 2]
    scores = [sum((x <= t) == s for x, s in zip(d, same)) for t in candidates]
    return candidates[scores.index(max(scores))]


@given(pairs=pair_sets, folds=st.integers(2, 5), seed=st.integers(0, 5), copies=st.booleans())
def test_out_of_fold_decisions_match_a_brute_force_loop(pairs, folds, seed, copies):
    d, same = _pairs(**pairs)
    if len(d) < folds:
        return
    groups = None
    if copies:  # pair k is a copy of pair k // 2 (even k), as a pair drawn twice would be
        n = len(d)
        groups = torch.arange(n) // 2
        d = d[(torch.arange(n) // 2) * 2]
        same = same[(torch.arange(n) // 2) * 2]
    if groups is not None and int(groups[-1]) + 1 < folds:
        with pytest.raises(ValueError, match="groups"):
            R.out_of_fold(d, same, folds=folds, seed=seed, groups=groups)
        return
    cv = R.out_of_fold(d, same, folds=folds, seed=seed, groups=groups)
    fold = cv.fold.tolist()
    dl, sl = d.tolist(), same.tolist()
    for k in range(len(dl)):
        if groups is not None:  # copies share a fold: no threshold was fitted on a copy
            assert all(fold[m] == fold[k] for m in range(len(dl)) if groups[m] == groups[k])
        train = [m for m in range(len(dl)) if fold[m] != fold[k]]
        t = _best_by_loops([dl[m] for m in train], [sl[m] for m in train])
        assert cv.thresholds[fold[k]] == pytest.approx(t, abs=1e-12)
        assert bool(cv.accepted[k]) == (dl[k] <= cv.thresholds[fold[k]])
    for f in range(folds):
        held = [k for k in range(len(dl)) if fold[k] == f]
        want = sum(bool(cv.accepted[k]) == sl[k] for k in held) / len(held)
        assert cv.accuracies[f] == pytest.approx(want, abs=1e-12)
    mean, _, thresholds = R.cross_validated_accuracy(d, same, folds=folds, seed=seed, groups=groups)
    assert thresholds == cv.thresholds
    assert mean == pytest.approx(sum(cv.accuracies) / folds, abs=1e-12)


def test_cross_validation_folds_with_distinct_groups_are_the_plain_folds():
    _, same = _pairs(5, 103, 0)
    for folds in (2, 10):
        plain = R.cross_validation_folds(same, folds=folds, seed=3)
        grouped = R.cross_validation_folds(same, folds=folds, seed=3, groups=torch.arange(103) * 7)
        assert torch.equal(plain, grouped)
    with pytest.raises(ValueError, match="groups"):
        R.cross_validation_folds(same, groups=torch.zeros(5, dtype=torch.long))

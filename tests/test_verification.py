import itertools
import math

import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric import mining
from deepmetric.distances import pairwise
from deepmetric.evaluate import verification as V

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
    far, tar, thresholds = V.roc_curve(d, same)
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
    assert V.roc_auc(d, same) == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)


@given(pairs=pair_sets)
def test_eer_lies_between_the_bracketing_points(pairs):
    d, same = _pairs(**pairs)
    rate, threshold = V.eer(d, same)
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
    found = V.tar_at_far(d, same, targets)
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
    assert list(V.tar_at_far(d, same)) == ["1e-03", "1e-02"]
    assert list(V.tar_at_far(d, same, (0.05, 1.5e-3))) == ["5e-02", "1.5e-03"]


@given(pairs=pair_sets, both=st.booleans())
def test_best_threshold_tries_every_candidate(pairs, both):
    d, same = _pairs(**pairs, both=both)
    t, acc = V.best_threshold(d, same)
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
    assert V.choose_threshold(d, same) == t


def test_best_threshold_in_float32_between_adjacent_values():
    one = torch.tensor(1.0, dtype=torch.float32)
    odd = torch.nextafter(one, torch.tensor(2.0))  # odd mantissa: a + ulp / 2 rounds up to b
    for a in (one, odd):
        b = torch.nextafter(a, torch.tensor(2.0))
        d = torch.stack([a, b, b + 1])
        same = torch.tensor([True, False, False])
        t, acc = V.best_threshold(d, same)
        assert acc == 1.0
        assert ((d <= t) == same).all()  # also with torch's float32 comparison
        assert ((d.double() <= t) == same).all()


# ----------------------------------------------------------------------------- metrics


def test_verification_metrics_scores_the_given_threshold():
    d, same = _pairs(3, 200, 0)
    same = same | (d < 0.3)  # some signal
    for t in (-1.0, 0.25, 0.6, 2.0):
        m = V.verification_metrics(d, same, threshold=t, far_targets=(0.1,))
        assert m["threshold"] == t
        assert m["accuracy"] == pytest.approx(_accuracy(d, same, t), abs=1e-12)
        assert m["roc_auc"] == V.roc_auc(d, same)
        assert (m["eer"], m["eer_threshold"]) == V.eer(d, same)
        assert m["tar_at_far"] == V.tar_at_far(d, same, (0.1,))
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
    for fn in (V.roc_curve, V.roc_auc, V.eer, V.tar_at_far):
        with pytest.raises(ValueError, match=message):
            fn(distances, same)
    with pytest.raises(ValueError, match=message):
        V.verification_metrics(distances, same, threshold=0.5)


def test_tar_at_far_rejects_bad_targets():
    d, same = _pairs(0, 10, 0)
    with pytest.raises(ValueError, match="FAR targets"):
        V.tar_at_far(d, same, (1.5,))


# ----------------------------------------------------------------------------- cross-validation


@given(pairs=pair_sets, folds=st.integers(2, 5), seed=st.integers(0, 5))
def test_cross_validation_scores_each_fold_with_a_threshold_from_the_others(pairs, folds, seed):
    d, same = _pairs(**pairs)
    if len(d) < folds:
        return
    fold = V.cross_validation_folds(same, folds=folds, seed=seed)
    sizes = torch.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    pos = torch.bincount(fold[same], minlength=folds)
    assert pos.max() - pos.min() <= 1
    mean, std, thresholds = V.cross_validated_accuracy(d, same, folds=folds, seed=seed)
    accs = []
    for f in range(folds):
        train = fold != f
        assert thresholds[f] == V.best_threshold(d[train], same[train])[0]
        accs.append(_accuracy(d[~train], same[~train], thresholds[f]))
    want_mean = sum(accs) / folds
    assert mean == pytest.approx(want_mean, abs=1e-12)
    assert std == pytest.approx(math.sqrt(sum((a - want_mean) ** 2 for a in accs) / folds))


def test_cross_validation_never_looks_at_the_held_out_fold():
    # Fold 0: positives at 1, negatives at 2; fold 1: positives at 3, negatives at 4. On all the
    # data the best threshold is 1.5 (or 3.5), 75 % accurate; each fold's threshold comes from
    # the other fold, 3.5 for fold 0 and 1.5 for fold 1, and scores only 50 % on its own fold.
    same = torch.tensor([True, False] * 4)
    fold = V.cross_validation_folds(same, folds=2, seed=1)
    d = (1 + 2 * fold + (~same).long()).double()
    assert V.best_threshold(d, same) == (1.5, 0.75)
    mean, std, thresholds = V.cross_validated_accuracy(d, same, folds=2, seed=1)
    assert thresholds == [3.5, 1.5]
    assert (mean, std) == (0.5, 0.0)

    # Changing the held-out fold's distances never changes the threshold it is scored with.
    d, same = _pairs(11, 300, 0)
    fold = V.cross_validation_folds(same, folds=10, seed=0)
    _, _, thresholds = V.cross_validated_accuracy(d, same, folds=10, seed=0)
    for f in (0, 4, 9):
        changed = d.clone()
        changed[fold == f] = torch.rand(int((fold == f).sum()), dtype=torch.float64) * 5
        _, _, again = V.cross_validated_accuracy(changed, same, folds=10, seed=0)
        assert again[f] == thresholds[f]
        assert again != thresholds


def test_cross_validation_rejects_bad_folds():
    d, same = _pairs(0, 5, 0)
    for folds in (1, 6):
        with pytest.raises(ValueError, match="folds"):
            V.cross_validated_accuracy(d, same, folds=folds)


# ----------------------------------------------------------------------------- pairs


def _check_valid_pairs(labels, i, j, same):
    assert i.dtype == j.dtype == torch.int64 and same.dtype == torch.bool
    assert int(same.sum()) * 2 == len(same)  # balanced
    assert same[: len(same) // 2].all()  # positives first
    li, lj = labels[i], labels[j]
    assert torch.equal(li == lj, same)
    assert (i < j).all()


def test_verification_pairs_lists_all_positive_pairs():
    labels = torch.tensor([3, 1, 3, 3, 0, 1, 7, 3, 0])
    i, j, same = V.verification_pairs(labels, seed=5)
    _check_valid_pairs(labels, i, j, same)
    want = {(a, b) for a in range(9) for b in range(a + 1, 9) if labels[a] == labels[b]}
    got = list(zip(i[same].tolist(), j[same].tolist()))
    assert len(got) == len(want) and set(got) == want
    again = V.verification_pairs(labels, seed=5)
    assert all(torch.equal(x, y) for x, y in zip((i, j, same), again))
    other = V.verification_pairs(labels, seed=6)
    assert not torch.equal(i, other[0])  # the negatives depend on the seed


@pytest.mark.parametrize("sizes", [[30, 40, 5], [2000, 2000]])  # randperm / rejection sampling
def test_verification_pairs_samples_distinct_positives(sizes):
    labels = torch.cat([torch.full((m,), c) for c, m in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    i, j, same = V.verification_pairs(labels, max_positive=500, seed=2)
    _check_valid_pairs(labels, i, j, same)
    assert int(same.sum()) == 500
    positives = set(zip(i[same].tolist(), j[same].tolist()))
    assert len(positives) == 500  # without replacement
    again = V.verification_pairs(labels, max_positive=500, seed=2)
    assert all(torch.equal(x, y) for x, y in zip((i, j, same), again))


def test_verification_pairs_negatives_are_uniform():
    labels = torch.tensor([0, 1, 1, 1, 1, 1, 1, 2, 2])  # 20 negative, 16 positive pairs
    counts: dict[tuple[int, int], int] = {}
    for seed in range(300):
        i, j, same = V.verification_pairs(labels, seed=seed)
        for pair in zip(i[~same].tolist(), j[~same].tolist()):
            counts[pair] = counts.get(pair, 0) + 1
    want = {(a, b) for a in range(9) for b in range(a + 1, 9) if labels[a] != labels[b]}
    assert set(counts) == want
    expected = 300 * 16 / 20
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 45  # 19 degrees of freedom: P(chi2 > 45) < 0.001 when uniform


def test_verification_pairs_errors():
    with pytest.raises(ValueError, match="two classes"):
        V.verification_pairs(torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no positive"):
        V.verification_pairs(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        V.verification_pairs(torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------- per-class table


def _table_reference(x, labels, metric, threshold):
    n = len(labels)
    lab = labels.tolist()
    d = [[reference.dist(x[a], x[b], metric).item() for b in range(n)] for a in range(n)]
    rows = []
    for c in sorted(set(lab)):
        margins = [
            d[a][p] - d[a][q]
            for a, p, q in reference.valid_triplets(lab)
            if lab[a] == c  # valid triplets with anchor in c
        ]
        pos = [d[a][b] for a in range(n) for b in range(a + 1, n) if lab[a] == lab[b] == c]
        neg = [d[a][b] for a in range(n) for b in range(n) if lab[a] == c and lab[b] != c]
        hits = []
        for a in range(n):
            if lab[a] == c:
                nearest = min((b for b in range(n) if b != a), key=lambda b: (d[a][b], b))
                hits.append(lab[nearest] == c)
        rows.append(
            {
                "class": c,
                "n": lab.count(c),
                "triplets": len(margins),
                "triplet_accuracy": sum(m < 0 for m in margins) / len(margins),
                "margin_min": min(margins),
                "margin_max": max(margins),
                "margin_mean": sum(margins) / len(margins),
                "verification_accuracy": (
                    sum(v <= threshold for v in pos) / len(pos)
                    + sum(v > threshold for v in neg) / len(neg)
                )
                / 2,
                "precision_at_1": sum(hits) / len(hits),
            }
        )
    return rows


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_table_matches_loops(metric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([5, 2, 2, 9, 5, 2, 9, 9, 5, 2, 5, 9, 2])
    x = x + labels[:, None].double() * 0.3  # some structure
    threshold = 1.0
    got = V.per_class_table(x, labels, metric=metric, threshold=threshold)
    want = _table_reference(x, labels, metric, threshold)
    assert [r["class"] for r in got] == [2, 5, 9]
    for row, ref in zip(got, want):
        assert row.keys() == ref.keys()
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, abs=1e-9), key


def test_per_class_table_samples_deterministically():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    labels = torch.arange(60) % 3
    kw = {"threshold": 2.0, "max_triplets_per_class": 100, "max_pairs_per_class": 50}
    table = V.per_class_table(x, labels, **kw, seed=3)
    assert table == V.per_class_table(x, labels, **kw, seed=3)
    assert table != V.per_class_table(x, labels, **kw, seed=4)
    full = V.per_class_table(x, labels, threshold=2.0)
    for row, all_row in zip(table, full):
        assert row["triplets"] == 100
        assert all_row["triplets"] == 20 * 19 * 40
        assert all_row["margin_min"] <= row["margin_min"] <= row["margin_max"]
        assert row["margin_max"] <= all_row["margin_max"]
        assert row["precision_at_1"] == all_row["precision_at_1"]  # not sampled


def test_per_class_table_singleton_class_is_nan():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    table = V.per_class_table(x, torch.tensor([0, 0, 1, 1, 2]), threshold=1.0)
    last = table[2]
    assert last["n"] == 1 and last["triplets"] == 0
    assert math.isnan(last["triplet_accuracy"]) and math.isnan(last["margin_mean"])
    assert math.isnan(last["verification_accuracy"])
    assert 0.0 <= last["precision_at_1"] <= 1.0


def test_class_triplets_are_valid_and_distinct():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0, 1])
    groups = V._groups(labels)
    for cap in (5, 1000):
        for c in range(3):
            a, p, n = V._class_triplets(groups, c, cap, torch.Generator().manual_seed(0))
            triplets = set(zip(a.tolist(), p.tolist(), n.tolist()))
            want = {t for t in reference.valid_triplets(labels.tolist()) if labels[t[0]] == c}
            assert len(triplets) == len(a) == min(cap, len(want))
            assert triplets <= want


# ----------------------------------------------------------------------------- triplet categories


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 14),
    classes=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_triplet_category_shares(seed, n, classes, margin):
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(n, 2, generator=g, dtype=torch.float64) * 2) / 2  # ties
    labels = torch.randint(0, classes, (n,), generator=g)
    got = V.test_triplet_categories(x, labels, margin=margin)
    counts = mining.triplet_categories(pairwise(x), labels, margin=margin)
    assert got["triplets"] == counts.total
    assert got["sampled_items"] == n and not got["sampled"]
    if counts.total == 0:
        assert math.isnan(got["easy"])
        return
    assert got["easy"] + got["semi_hard"] + got["hard"] == pytest.approx(1.0)
    assert got["hard"] == counts.hard / counts.total
    assert got["easy"] == counts.easy / counts.total


def test_triplet_categories_stratified_sample():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((m,), c) for c, m in enumerate([50, 30, 17, 3])])
    labels = labels[torch.randperm(100, generator=g)]
    x = torch.randn(100, 3, generator=g)
    got = V.test_triplet_categories(x, labels, margin=0.5, max_items=40, seed=1)
    assert got == V.test_triplet_categories(x, labels, margin=0.5, max_items=40, seed=1)
    assert got["sampled"] and got["sampled_items"] == 40
    keep = V._stratified_sample(V._groups(labels), 40, V._generator(1))
    assert len(set(keep.tolist())) == 40
    assert torch.bincount(labels[keep]).tolist() == [20, 12, 7, 1]  # 40 * share, rounded
    counts = mining.triplet_categories(pairwise(x[keep]), labels[keep], margin=0.5)
    assert got["triplets"] == counts.total
    assert got["semi_hard"] == counts.semi_hard / counts.total
    assert sum(got[k] for k in ("easy", "semi_hard", "hard")) == pytest.approx(1.0)

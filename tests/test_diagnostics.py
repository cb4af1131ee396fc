"""deepmetric.evaluate.diagnostics: the per-class table and test triplet categories, against
loops."""

import math

import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric import mining
from deepmetric.distances import pairwise
from deepmetric.evaluate import diagnostics as D
from deepmetric.evaluate.pairs import generator, group_by_label

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
    got = D.per_class_table(x, labels, metric=metric, threshold=threshold)
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
    table = D.per_class_table(x, labels, **kw, seed=3)
    assert table == D.per_class_table(x, labels, **kw, seed=3)
    assert table != D.per_class_table(x, labels, **kw, seed=4)
    full = D.per_class_table(x, labels, threshold=2.0)
    for row, all_row in zip(table, full):
        assert row["triplets"] == 100
        assert all_row["triplets"] == 20 * 19 * 40
        assert all_row["margin_min"] <= row["margin_min"] <= row["margin_max"]
        assert row["margin_max"] <= all_row["margin_max"]
        assert row["precision_at_1"] == all_row["precision_at_1"]  # not sampled


def test_per_class_table_singleton_class_is_nan():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    table = D.per_class_table(x, torch.tensor([0, 0, 1, 1, 2]), threshold=1.0)
    last = table[2]
    assert last["n"] == 1 and last["triplets"] == 0
    assert math.isnan(last["triplet_accuracy"]) and math.isnan(last["margin_mean"])
    assert math.isnan(last["verification_accuracy"])
    assert 0.0 <= last["precision_at_1"] <= 1.0


def test_class_triplets_are_valid_and_distinct():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 0, 1])
    groups = group_by_label(labels)
    for cap in (5, 1000):
        for c in range(3):
            a, p, n = D._class_triplets(groups, c, cap, torch.Generator().manual_seed(0))
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
    got = D.test_triplet_categories(x, labels, margin=margin)
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
    got = D.test_triplet_categories(x, labels, margin=0.5, max_items=40, seed=1)
    assert got == D.test_triplet_categories(x, labels, margin=0.5, max_items=40, seed=1)
    assert got["sampled"] and got["sampled_items"] == 40
    keep = D._stratified_sample(group_by_label(labels), 40, generator(1))
    assert len(set(keep.tolist())) == 40
    assert torch.bincount(labels[keep]).tolist() == [20, 12, 7, 1]  # 40 * share, rounded
    counts = mining.triplet_categories(pairwise(x[keep]), labels[keep], margin=0.5)
    assert got["triplets"] == counts.total
    assert got["semi_hard"] == counts.semi_hard / counts.total
    assert sum(got[k] for k in ("easy", "semi_hard", "hard")) == pytest.approx(1.0)


def test_per_class_table_from_judged_pairs_matches_loops():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(15, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([4, 1, 1, 7, 4, 1, 7, 7, 4, 1, 4, 7, 1, 9, 9])
    i = torch.randint(0, 15, (60,), generator=g)
    j = torch.randint(0, 15, (60,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    same = labels[i] == labels[j]
    accepted = torch.rand(len(i), generator=g) < 0.5
    judged = D.JudgedPairs(i, j, same, accepted)
    got = D.per_class_table(x, labels, judged=judged)
    by_threshold = D.per_class_table(x, labels, threshold=1.0)
    lab, il, jl = labels.tolist(), i.tolist(), j.tolist()
    for row, other in zip(got, by_threshold):
        c = row["class"]
        pos = [a for k, a in enumerate(accepted.tolist()) if lab[il[k]] == lab[jl[k]] == c]
        neg = [
            not a
            for k, a in enumerate(accepted.tolist())
            if lab[il[k]] != lab[jl[k]] and c in (lab[il[k]], lab[jl[k]])
        ]
        if pos and neg:
            want = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2
            assert row["verification_accuracy"] == pytest.approx(want, abs=1e-12)
        else:
            assert math.isnan(row["verification_accuracy"])
        for key in row.keys() - {"verification_accuracy"}:  # the rest does not depend on it
            assert row[key] == other[key] or (math.isnan(row[key]) and math.isnan(other[key]))


def test_per_class_table_needs_one_decision_rule():
    x = torch.randn(4, 2)
    labels = torch.tensor([0, 0, 1, 1])
    judged = D.JudgedPairs(
        torch.tensor([0, 0]),
        torch.tensor([1, 2]),
        torch.tensor([True, False]),
        torch.ones(2, dtype=torch.bool),
    )
    for kw in ({}, {"threshold": 1.0, "judged": judged}):
        with pytest.raises(ValueError, match="exactly one"):
            D.per_class_table(x, labels, **kw)
    wrong = judged._replace(same=torch.tensor([False, False]))
    with pytest.raises(ValueError, match="disagrees"):
        D.per_class_table(x, labels, judged=wrong)
    with pytest.raises(ValueError, match="integer"):
        D.per_class_table(x, labels.float(), threshold=1.0)


def test_the_per_class_caps_shrink_with_many_classes(monkeypatch):
    """Up to 100 classes each gets 20,000 triplets and pairs; beyond, the table stays about
    2,000,000 samples in all (at least 1,000 per class)."""
    assert [D.per_class_budget(n) for n in (2, 100, 101, 751, 5000)] == [
        20_000,
        20_000,
        19_801,
        2_663,
        1_000,
    ]
    monkeypatch.setattr(D, "TOTAL_SAMPLES", 20_000)  # the same rule, small enough to run fast
    monkeypatch.setattr(D, "MAX_PER_CLASS", 200)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(110).repeat_interleave(10)
    emb = torch.randn(len(labels), 4, generator=g)
    rows = D.per_class_table(emb, labels, threshold=1.0, metric="euclidean")
    assert {r["triplets"] for r in rows} == {200}  # of 10 * 9 * 1090 per class: the maximum
    monkeypatch.setattr(D, "MIN_PER_CLASS", 10)
    rows = D.per_class_table(emb, labels, threshold=1.0, metric="euclidean")
    assert {r["triplets"] for r in rows} == {181}  # 20,000 // 110

import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric import mining
from deepmetric.distances import pairwise


def _batch(seed: int, b: int, classes: int, d: int = 3, quantize: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if quantize:  # few distinct values: many exactly tied distances
        x = torch.round(x)
    labels = torch.randint(0, classes, (b,), generator=g)
    return x, labels


batches = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "b": st.integers(1, 10),
        "classes": st.integers(1, 4),
        "quantize": st.booleans(),
    }
)
margins = st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0])


def _with_ref(seed: int, ref: bool, x: torch.Tensor, classes: int):
    if not ref:
        return None, None
    return _batch(seed + 7, 9, classes)


@given(batch=batches, margin=margins, ref=st.booleans(), method=st.sampled_from(["sort", "direct"]))
def test_batch_all_lists_and_counts_the_active_triplets(batch, margin, ref, method):
    x, labels = _batch(**batch)
    ref_x, ref_labels = _with_ref(batch["seed"], ref, x, batch["classes"])
    dist = pairwise(x, ref_x)
    rl = None if ref_labels is None else ref_labels.tolist()
    expected = {
        (a, p, n)
        for a, p, n in reference.valid_triplets(labels.tolist(), rl)
        if dist[a, p] - dist[a, n] + margin > 0
    }
    found = mining.batch_all(dist, labels, ref_labels, margin=margin)
    assert set(zip(*(t.tolist() for t in found))) == expected
    assert len(found.anchor) == len(expected)

    counts = mining.batch_all_counts(dist, labels, ref_labels, margin=margin, method=method)
    per_pos, per_neg = counts.per_positive(), counts.per_negative.long()
    want_pos = torch.zeros_like(per_pos)
    want_neg = torch.zeros_like(per_neg)
    for a, p, n in expected:
        want_pos[a, p] += 1
        want_neg[a, n] += 1
    assert torch.equal(per_pos, want_pos)
    assert torch.equal(per_neg, want_neg)


@given(batch=batches, ref=st.booleans())
def test_batch_hard_picks_the_farthest_positive_and_nearest_negative(batch, ref):
    x, labels = _batch(**batch)
    ref_x, ref_labels = _with_ref(batch["seed"], ref, x, batch["classes"])
    dist = pairwise(x, ref_x)
    ref_l = labels if ref_labels is None else ref_labels
    t = mining.batch_hard(dist, labels, ref_labels)
    anchors = []
    for a in range(len(labels)):
        pos = [p for p in range(len(ref_l)) if ref_l[p] == labels[a] and (ref or p != a)]
        neg = [n for n in range(len(ref_l)) if ref_l[n] != labels[a]]
        if pos and neg:
            anchors.append((a, max(dist[a, p] for p in pos), min(dist[a, n] for n in neg)))
    assert t.anchor.tolist() == [a for a, _, _ in anchors]
    for i, (a, d_ap, d_an) in enumerate(anchors):
        assert labels[a] == ref_l[t.positive[i]] and labels[a] != ref_l[t.negative[i]]
        assert dist[a, t.positive[i]] == d_ap and dist[a, t.negative[i]] == d_an


@given(batch=batches, ref=st.booleans())
def test_semi_hard_follows_the_facenet_rule_and_both_methods_agree(batch, ref):
    x, labels = _batch(**batch)
    ref_x, ref_labels = _with_ref(batch["seed"], ref, x, batch["classes"])
    dist = pairwise(x, ref_x)
    ref_l = (labels if ref_labels is None else ref_labels).tolist()
    by_sort = mining.semi_hard(dist, labels, ref_labels, method="sort")
    by_direct = mining.semi_hard(dist, labels, ref_labels, method="direct")
    for field in range(3):
        assert torch.equal(by_sort[field], by_direct[field])
    expected = []
    for a in range(len(labels)):
        negatives = [n for n in range(len(ref_l)) if ref_l[n] != labels[a]]
        for p in range(len(ref_l)):
            if negatives and ref_l[p] == labels[a] and (ref or p != a):
                n = reference.semi_hard_negative(dist[a], dist[a, p], negatives)
                expected.append((a, p, float(dist[a, n])))
    got = [(a, p, float(dist[a, n])) for a, p, n in zip(*(t.tolist() for t in by_sort))]
    assert got == expected


def test_semi_hard_ties_go_to_the_lowest_index():
    # Anchor 0 (class 0) with positive 1 at distance 1; negatives 2, 3 at distance 2, 4 at 3.
    x = torch.tensor([[0.0], [1.0], [2.0], [2.0], [3.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    for method in ("sort", "direct"):
        t = mining.semi_hard(pairwise(x), labels, method=method)
        chosen = dict(zip(zip(t.anchor.tolist(), t.positive.tolist()), t.negative.tolist()))
        assert chosen[(0, 1)] == 2
        assert chosen[(2, 3)] == 1  # d_ap = 0; negatives 1 and 4 tie at 1, nearer than 0 at 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_semi_hard_direct_reads_signed_zeros_and_equal_distances_as_the_sort(dtype):
    """The direct method compares distances as integers: -0.0 (which a clamp can leave) must
    count as 0, a negative at exactly d_ap is not beyond it, +inf is farther than all."""
    dist = torch.tensor(
        [
            [0.0, -0.0, 0.0, 1.0, 2.0, 1.0],
            [-0.0, 0.0, 0.0, 0.5, 0.5, float("inf")],
            [1.0, 1.0, 0.0, -0.0, 0.0, 3.0],
            [2.0, 0.5, -0.0, 0.0, 1.0, 1.0],
            [1.0, 1.0, -0.0, 0.5, 0.25, 0.0],
        ],
        dtype=dtype,
    )
    labels = torch.tensor([0, 0, 1, 1, 0])
    ref_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    sort = mining.semi_hard(dist, labels, ref_labels, method="sort")
    direct = mining.semi_hard(dist, labels, ref_labels, method="direct")
    for field in sort._fields:
        assert torch.equal(getattr(sort, field), getattr(direct, field))
    chosen = dict(zip(zip(sort.anchor.tolist(), sort.positive.tolist()), sort.negative.tolist()))
    assert chosen[(0, 1)] == 3 and chosen[(1, 0)] == 3  # equal distances: the lower index
    assert chosen[(2, 3)] == 0  # d_ap = -0.0 = 0: the negative at 0.0 (column 4) is not beyond
    assert chosen[(3, 2)] == 1 and chosen[(3, 3)] == 1
    assert chosen[(4, 0)] == 3  # none beyond 1.0: the farthest negative, not the one at -0.0


@given(
    batch=batches,
    margin=st.sampled_from([0.1, 0.5, 1.0]),
    method=st.sampled_from(["sort", "direct"]),
)
def test_triplet_categories_match_loops(batch, margin, method):
    x, labels = _batch(**batch)
    got = mining.triplet_categories(pairwise(x), labels, margin=margin, method=method)
    assert tuple(got) == reference.categories(x, labels, margin)
    assert got.total == len(reference.valid_triplets(labels.tolist()))


def test_methods_agree_on_a_pk_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(256, 16, generator=g), dim=1)
    labels = torch.arange(64).repeat_interleave(4)[torch.randperm(256, generator=g)]
    dist = pairwise(x)
    for margin in (0.05, 0.3):
        sort = mining.batch_all_counts(dist, labels, margin=margin, method="sort")
        direct = mining.batch_all_counts(dist, labels, margin=margin, method="direct")
        assert torch.equal(sort.per_slot, direct.per_slot)
        assert torch.equal(sort.per_negative.long(), direct.per_negative.long())
        n_active = len(mining.batch_all(dist, labels, margin=margin).anchor)
        assert int(sort.per_slot.sum()) == int(sort.per_negative.sum()) == n_active
    for field in range(3):
        s = mining.semi_hard(dist, labels, method="sort")[field]
        assert torch.equal(s, mining.semi_hard(dist, labels, method="direct")[field])


def test_auto_method_uses_sort_for_many_positives(monkeypatch):
    calls = []
    real = mining._count_below
    monkeypatch.setattr(
        mining, "_count_below", lambda *a, **k: calls.append(k["method"]) or real(*a, **k)
    )
    few = torch.arange(8).repeat_interleave(2)
    many = torch.zeros(mining.DIRECT_MAX_POSITIVES + 3, dtype=torch.long)  # P = the limit + 1
    many[0] = 1
    for labels in (few, many):
        mining.batch_all_counts(torch.rand(len(labels), len(labels)), labels, margin=0.1)
    assert calls == ["direct", "sort"]


def test_errors_name_the_problem():
    dist = torch.rand(4, 4)
    with pytest.raises(ValueError, match="labels has length 3"):
        mining.batch_hard(dist, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        mining.batch_hard(dist, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="must be square"):
        mining.semi_hard(torch.rand(4, 5), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        mining.semi_hard(dist, torch.tensor([0, 1, 0, 1]), method="fast")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        mining.triplet_categories(dist, torch.tensor([0, 1, 0, 1]), margin=-1)


@pytest.mark.parametrize("shape", [(5, 16), (5, 13), (3, 0), (0, 8), (7, 64)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_mask_scans_agree_with_torch(shape, density):
    """true_entries, row_counts and any_per_row (the word and byte scans) against nonzero, sum
    and any, on whole masks and on a slice whose rows do not start on an 8-byte word."""
    g = torch.Generator().manual_seed(1)
    whole = torch.rand(shape, generator=g) < density
    masks = [whole, whole[:, 1:] if shape[1] > 1 else whole, whole[1:] if shape[0] > 1 else whole]
    for mask in masks:
        rows, cols = mining.true_entries(mask)
        want_rows, want_cols = mask.nonzero(as_tuple=True)
        assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
        assert torch.equal(mining.row_counts(mask), mask.sum(dim=1))
        assert torch.equal(mining.any_per_row(mask), mask.any(dim=1))

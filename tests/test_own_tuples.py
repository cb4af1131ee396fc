"""Your own tuples: the triplet and pair losses on given indices (``indices=``) and with a miner of
one's own (``miner=``), against plain Python loops, torch's ``triplet_margin_loss`` and the
built-in mining; and a one-line ``ValueError`` for every kind of bad index."""

import functools
import math

import pytest
import reference
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from deepmetric import mining
from deepmetric.distances import METRICS, pairwise
from deepmetric.losses import (
    ContrastiveLoss,
    LiftedStructuredLoss,
    TripletLoss,
    triplet_margin_loss,
)
from deepmetric.mining import PairMasks, Pairs, Triplets

L = torch.tensor
EMPTY = torch.zeros(0, dtype=torch.long)


def _x(seed: int, n: int, d: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _labels(seed: int, n: int, classes: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, classes, (n,), generator=g)


def _random_triplets(seed: int, b: int, r: int, t: int, same_set: bool) -> Triplets:
    """t random triplets with p != n (and a not in {p, n} when the references are the batch)."""
    g = torch.Generator().manual_seed(seed + 2)
    out: list[tuple[int, int, int]] = []
    while len(out) < t:
        a, p, n = (int(torch.randint(0, m, (), generator=g)) for m in (b, r, r))
        if p != n and not (same_set and a in (p, n)):
            out.append((a, p, n))
    cols = list(zip(*out)) if out else [(), (), ()]
    return Triplets(*(torch.tensor(c, dtype=torch.long) for c in cols))


def _random_pairs(seed: int, b: int, n_pos: int, n_neg: int) -> Pairs:
    g = torch.Generator().manual_seed(seed + 3)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, b, (k,), generator=g)
        j = (i + torch.randint(1, b, (k,), generator=g)) % b  # never i itself
        return i, j

    return Pairs(*draw(n_pos), *draw(n_neg))


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _same(ours, ref, inputs, rtol=1e-7, atol=1e-9):
    """Values and gradients of two functions of the same (float64) inputs agree."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    a, b = ours(*inputs), ref(*inputs)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=rtol, atol=atol)
    for ga, gb in zip(_grads(a, inputs), _grads(torch.as_tensor(b), inputs)):
        torch.testing.assert_close(ga, gb, rtol=10 * rtol, atol=10 * atol)


# ----------------------------------------------------------------------------- brute force


def _triplet_loop(x, triplets, margin, metric, soft, ref_x=None):
    """mean over the listed triplets of the hinge, one triplet at a time."""
    ref_x = x if ref_x is None else ref_x
    terms = []
    for a, p, n in zip(*(t.tolist() for t in triplets)):
        v = reference.dist(x[a], ref_x[p], metric) - reference.dist(x[a], ref_x[n], metric)
        terms.append(reference.hinge(v, margin, soft))
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=x.dtype)


def _contrastive_loop(x, pairs, margin, metric):
    terms = []
    for i, j in zip(pairs.pos_anchor.tolist(), pairs.positive.tolist()):
        terms.append(0.5 * reference.dist(x[i], x[j], metric) ** 2)
    for i, j in zip(pairs.neg_anchor.tolist(), pairs.negative.tolist()):
        terms.append(0.5 * torch.relu(margin - reference.dist(x[i], x[j], metric)) ** 2)
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=x.dtype)


def _lifted_loop(x, pairs, margin, metric):
    """1/(2P) sum over given positive pairs (i, j) of relu(log(S_i + S_j) + D_ij)^2, with S_k
    over the given negative pairs whose first index is k; a pair with S_i + S_j = 0 adds 0."""
    negatives = list(zip(pairs.neg_anchor.tolist(), pairs.negative.tolist()))
    positives = list(zip(pairs.pos_anchor.tolist(), pairs.positive.tolist()))
    total = torch.zeros((), dtype=x.dtype)
    for i, j in positives:
        exps = [
            torch.exp(margin - reference.dist(x[k], x[m], metric))
            for k, m in negatives
            if k in (i, j)
        ]
        if exps:
            total = (
                total + torch.relu(torch.log(sum(exps)) + reference.dist(x[i], x[j], metric)) ** 2
            )
    return total / (2 * len(positives)) if positives else total


# ----------------------------------------------------------------------------- triplets


@given(
    seed=st.integers(0, 2**31),
    b=st.integers(3, 7),
    t=st.integers(0, 12),
    margin=st.sampled_from([0.0, 0.2, 1.0]),
    metric=st.sampled_from(METRICS),
    soft=st.booleans(),
    with_ref=st.booleans(),
)
def test_given_triplets_match_brute_force(seed, b, t, margin, metric, soft, with_ref):
    x = _x(seed, b)
    ref_x = _x(seed + 7, 5) if with_ref else None
    triplets = _random_triplets(seed, b, len(x if ref_x is None else ref_x), t, not with_ref)
    loss = TripletLoss(margin=margin, metric=metric, soft=soft)
    if ref_x is None:
        _same(
            lambda e: loss(e, None, indices=triplets),
            lambda e: _triplet_loop(e, triplets, margin, metric, soft),
            [x],
        )
    else:
        _same(
            lambda e, r: loss(e, None, r, indices=triplets),
            lambda e, r: _triplet_loop(e, triplets, margin, metric, soft, ref_x=r),
            [x, ref_x],
        )


@given(seed=st.integers(0, 2**31), b=st.integers(3, 8), t=st.integers(1, 12))
def test_given_triplets_equal_torch_triplet_margin_loss(seed, b, t):
    """Euclidean, hard margin: torch's triplet_margin_loss of the same rows, mean over all of them
    (eps=0; torch's default eps=1e-6 moves the value by about 1e-6)."""
    x = _x(seed, b)
    triplets = _random_triplets(seed, b, b, t, True)
    a, p, n = triplets
    loss = TripletLoss(margin=0.5)
    _same(
        lambda e: loss(e, None, indices=triplets),
        lambda e: F.triplet_margin_loss(e[a], e[p], e[n], margin=0.5, eps=0.0),
        [x],
    )
    _same(
        lambda e: loss(e, None, indices=triplets),
        lambda e: F.triplet_margin_loss(e[a], e[p], e[n], margin=0.5),
        [x],
        rtol=0,
        atol=1e-5,
    )
    _same(  # and deepmetric's own, on the gathered rows
        lambda e: loss(e, None, indices=triplets),
        lambda e: triplet_margin_loss(e[a], e[p], e[n], margin=0.5),
        [x],
    )


def test_given_triplets_average_over_all_not_only_active():
    x = torch.tensor([[0.0], [0.1], [5.0], [0.3]], dtype=torch.float64)
    # (0, 1, 2) is easy (loss 0), (0, 1, 3): d_ap 0.1, d_an 0.3, margin 1: loss 0.8
    triplets = Triplets(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))
    value = TripletLoss(margin=1.0)(x, None, indices=triplets)
    assert math.isclose(float(value), 0.8 / 2)


def test_empty_triplets_give_zero_and_zero_gradient():
    x = _x(0, 4).requires_grad_(True)
    empty = torch.zeros(0, dtype=torch.long)
    value = TripletLoss()(x, None, indices=Triplets(empty, empty, empty))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("rule", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_library_miners_as_miner_equal_builtin_mining(rule, with_ref, metric):
    x, labels = _x(3, 12), _labels(3, 12, 3)
    ref = [_x(4, 9), _labels(4, 9, 3)] if with_ref else []
    miner = {"batch_hard": mining.batch_hard, "semi_hard": mining.semi_hard}[rule]
    own = TripletLoss(margin=0.3, miner=miner, metric=metric)
    builtin = TripletLoss(margin=0.3, mining=rule, metric=metric)
    if with_ref:
        _same(
            lambda e, r: own(e, labels, r, ref[1]),
            lambda e, r: builtin(e, labels, r, ref[1]),
            [x, ref[0]],
        )
    else:
        _same(lambda e: own(e, labels), lambda e: builtin(e, labels), [x])


@given(seed=st.integers(0, 2**31), b=st.integers(2, 10), classes=st.integers(1, 4))
def test_batch_all_miner_equals_batch_all_mining(seed, b, classes):
    """The batch-all miner lists the triplets with a loss > 0, so the mean over all given
    triplets is batch-all's mean over the active ones."""
    x, labels = _x(seed, b), _labels(seed, b, classes)
    own = TripletLoss(margin=0.4, miner=functools.partial(mining.batch_all, margin=0.4))
    builtin = TripletLoss(margin=0.4)
    _same(lambda e: own(e, labels), lambda e: builtin(e, labels), [x])


def test_own_miner_gets_the_distances_and_labels_and_its_triplets_count():
    x, labels = _x(5, 9), _labels(5, 9, 3)
    seen = {}

    def farthest_negative(dist, labels):
        """A rule of one's own: per anchor, its nearest positive and its farthest negative."""
        seen["dist"], seen["labels"], seen["grad"] = dist, labels, dist.requires_grad
        rows = []
        for a in range(len(labels)):
            pos = [j for j in range(len(labels)) if j != a and labels[j] == labels[a]]
            neg = [j for j in range(len(labels)) if labels[j] != labels[a]]
            if pos and neg:
                p = min(pos, key=lambda j: float(dist[a, j]))
                n = max(neg, key=lambda j: float(dist[a, j]))
                rows.append((a, p, n))
        return Triplets(*(torch.tensor(c) for c in zip(*rows)))

    x = x.requires_grad_(True)
    value = TripletLoss(margin=3.0, miner=farthest_negative)(x, labels)
    torch.testing.assert_close(seen["dist"], pairwise(x.detach(), None))
    assert torch.equal(seen["labels"], labels) and not seen["grad"]
    expected = _triplet_loop(
        x, farthest_negative(pairwise(x.detach()), labels), 3.0, "euclidean", False
    )
    torch.testing.assert_close(value, expected)


# ----------------------------------------------------------------------------- pairs


@given(
    seed=st.integers(0, 2**31),
    b=st.integers(2, 7),
    n_pos=st.integers(0, 8),
    n_neg=st.integers(0, 8),
    margin=st.sampled_from([0.0, 0.5, 2.0]),
    metric=st.sampled_from(METRICS),
)
def test_given_pairs_match_brute_force(seed, b, n_pos, n_neg, margin, metric):
    x = _x(seed, b)
    pairs = _random_pairs(seed, b, n_pos, n_neg)
    contrastive = ContrastiveLoss(margin=margin, metric=metric)
    _same(
        lambda e: contrastive(e, None, indices=pairs),
        lambda e: _contrastive_loop(e, pairs, margin, metric),
        [x],
    )
    lifted = LiftedStructuredLoss(margin=margin, metric=metric)
    _same(
        lambda e: lifted(e, None, indices=pairs),
        lambda e: _lifted_loop(e, pairs, margin, metric),
        [x],
    )


@pytest.mark.parametrize("cls", [ContrastiveLoss, LiftedStructuredLoss])
@given(seed=st.integers(0, 2**31), b=st.integers(1, 9), classes=st.integers(1, 4))
def test_all_pairs_as_indices_or_miner_equal_the_batch_loss(cls, seed, b, classes):
    """pair_masks lists every ordered pair: each unordered pair twice, so the same mean."""
    x, labels = _x(seed, b), _labels(seed, b, classes)
    masks = mining.pair_masks(labels)
    loss = cls(margin=1.5)
    by_miner = cls(margin=1.5, miner=lambda dist, labels: mining.pair_masks(labels))
    _same(lambda e: loss(e, None, indices=masks), lambda e: loss(e, labels), [x])
    listed = mining.pairs_from_masks(masks)
    _same(lambda e: loss(e, None, indices=listed), lambda e: loss(e, labels), [x])
    _same(lambda e: by_miner(e, labels), lambda e: loss(e, labels), [x])


def test_unordered_pairs_miner_equals_the_contrastive_batch_loss():
    """A miner of one's own listing each unordered pair i < j once, from the labels."""

    def all_pairs(dist, labels):
        pos, neg = [], []
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                (pos if labels[i] == labels[j] else neg).append((i, j))
        cols = [torch.tensor(c, dtype=torch.long) for c in zip(*pos)] or [EMPTY, EMPTY]
        cols += [torch.tensor(c, dtype=torch.long) for c in zip(*neg)] or [EMPTY, EMPTY]
        return Pairs(*cols)

    x, labels = _x(9, 8), _labels(9, 8, 3)
    own, builtin = ContrastiveLoss(margin=2.0, miner=all_pairs), ContrastiveLoss(margin=2.0)
    _same(lambda e: own(e, labels), lambda e: builtin(e, labels), [x])


def test_given_pairs_equal_explicit_siamese_pairs():
    x = _x(6, 6)
    first, second = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 4, 0, 2, 1])
    same = torch.tensor([1, 0, 0, 1, 1])
    pairs = mining.pairs_from_same(first, second, same)
    assert pairs.pos_anchor.tolist() == [0, 3, 4] and pairs.negative.tolist() == [4, 0]
    loss = ContrastiveLoss(margin=2.0)
    _same(
        lambda e: loss(e, None, indices=pairs),
        lambda e: loss(e[first], e[second], same),
        [x],
    )


def test_lifted_without_negatives_gives_zero_not_nan():
    x = _x(7, 4).requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    pairs = Pairs(torch.tensor([0, 1]), torch.tensor([2, 3]), none, none)
    value = LiftedStructuredLoss()(x, None, indices=pairs)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None  # a negative for item 0 only: the pair (1, 3) adds 0, the pair (0, 2) counts
    pairs = Pairs(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0]), torch.tensor([1]))
    value = LiftedStructuredLoss(margin=5.0)(x, None, indices=pairs)
    value.backward()
    assert float(value.detach()) > 0 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(value, _lifted_loop(x, pairs, 5.0, "euclidean"))


def test_empty_pairs_give_zero():
    x = _x(8, 3).requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    for loss in (ContrastiveLoss(), LiftedStructuredLoss()):
        value = loss(x, None, indices=Pairs(none, none, none, none))
        assert float(value.detach()) == 0.0 and value.requires_grad


# ----------------------------------------------------------------------------- bad input

BAD_TRIPLETS = [
    ("not triplets", (L([0]), L([1])), "must be Triplets"),
    ("a list", [L([0]), L([1]), L([2])], "must be Triplets"),
    ("lengths", Triplets(L([0, 1]), L([1]), L([2])), "different lengths"),
    ("float", Triplets(L([0.0]), L([1]), L([2])), "integer"),
    ("bool", Triplets(L([True]), L([1]), L([2])), "integer"),
    ("2-D", Triplets(L([[0]]), L([1]), L([2])), "1-D"),
    ("not a tensor", Triplets([0], L([1]), L([2])), "torch.Tensor"),
    ("too large", Triplets(L([0]), L([1]), L([4])), "out of range"),
    ("negative", Triplets(L([-1]), L([1]), L([2])), "out of range"),
    ("a == p", Triplets(L([0, 1]), L([2, 1]), L([3, 2])), "anchor equals positive"),
    ("a == n", Triplets(L([1]), L([2]), L([1])), "anchor equals negative"),
    ("p == n", Triplets(L([0]), L([2]), L([2])), "positive equals negative"),
]


@pytest.mark.parametrize(
    ("case", "indices", "match"), BAD_TRIPLETS, ids=[c[0] for c in BAD_TRIPLETS]
)
def test_bad_triplets_raise_one_line(case, indices, match):
    with pytest.raises(ValueError, match=match) as info:
        TripletLoss()(_x(0, 4), None, indices=indices)
    assert "\n" not in str(info.value)


def test_anchor_may_equal_positive_index_with_a_reference_set():
    """With ref_embeddings, positive / negative index another set: a == p is a valid triplet."""
    x, ref = _x(0, 3), _x(1, 3)
    triplets = Triplets(L([0, 1]), L([0, 2]), L([1, 1]))
    value = TripletLoss(margin=0.1)(x, None, ref, indices=triplets)
    torch.testing.assert_close(value, _triplet_loop(x, triplets, 0.1, "euclidean", False, ref))
    with pytest.raises(ValueError, match="out of range"):
        TripletLoss()(x, None, ref[:2], indices=triplets)


BAD_PAIRS = [
    ("not pairs", (L([0]), L([1]), L([2])), "must be Pairs"),
    ("lengths", Pairs(L([0, 1]), L([1]), EMPTY, EMPTY), "different lengths"),
    ("neg lengths", Pairs(EMPTY, EMPTY, L([0]), L([1, 2])), "different lengths"),
    ("float", Pairs(L([0.5]), L([1]), EMPTY, EMPTY), "integer"),
    ("out of range", Pairs(EMPTY, EMPTY, L([0]), L([4])), "out of range"),
    ("self pair", Pairs(L([2]), L([2]), EMPTY, EMPTY), "with itself"),
    ("self negative", Pairs(EMPTY, EMPTY, L([3]), L([3])), "with itself"),
    (
        "mask shape",
        PairMasks(torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 3, dtype=torch.bool)),
        "shape",
    ),
    ("mask dtype", PairMasks(torch.ones(4, 4), torch.ones(4, 4)), "boolean"),
    (
        "mask diagonal",
        mining.pair_masks(L([0, 0, 1, 1]))._replace(positive=torch.eye(4, dtype=torch.bool)),
        "with itself",
    ),
]


@pytest.mark.parametrize(("case", "indices", "match"), BAD_PAIRS, ids=[c[0] for c in BAD_PAIRS])
@pytest.mark.parametrize("cls", [ContrastiveLoss, LiftedStructuredLoss])
def test_bad_pairs_raise_one_line(case, indices, match, cls):
    with pytest.raises(ValueError, match=match) as info:
        cls()(_x(0, 4), None, indices=indices)
    assert "\n" not in str(info.value)


def test_bad_combinations_raise():
    x, labels = _x(0, 4), L([0, 0, 1, 1])
    triplets = Triplets(L([0]), L([1]), L([2]))
    pairs = Pairs(L([0]), L([1]), L([0]), L([2]))
    cases = [
        (lambda: TripletLoss()(x, None), "labels is None"),
        (lambda: ContrastiveLoss()(x, None), "labels is None"),
        (lambda: LiftedStructuredLoss()(x, None), "labels is None"),
        (lambda: TripletLoss(miner=mining.batch_hard)(x, None), "labels is None"),
        (lambda: ContrastiveLoss(miner=lambda d, y: pairs)(x, None), "labels is None"),
        (lambda: TripletLoss(miner=mining.batch_hard)(x, labels, indices=triplets), "miner"),
        (lambda: LiftedStructuredLoss(miner=lambda d, y: pairs)(x, labels, indices=pairs), "miner"),
        (lambda: TripletLoss(mining="batch_hard", miner=mining.batch_hard), "not both"),
        (lambda: TripletLoss(miner="batch_hard"), "callable"),
        (lambda: ContrastiveLoss(miner=3), "callable"),
        (lambda: TripletLoss(miner=lambda d, y: "oops")(x, labels), "the miner's triplets"),
        (lambda: ContrastiveLoss(miner=lambda d, y: triplets)(x, labels), "the miner's pairs"),
        (lambda: ContrastiveLoss()(x, labels, L([1, 0, 1, 0]), indices=pairs), "same="),
        (lambda: TripletLoss()(x, L([0, 1]), indices=triplets), "labels has length"),
        (lambda: TripletLoss()(x, None, None, L([0]), indices=triplets), "without ref_embeddings"),
        (lambda: mining.pairs_from_same(L([0, 1]), L([1, 0]), L([2, 0])), "0 and 1"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_labels_and_existing_calls_unchanged():
    """Labels given with indices are accepted (checked only); the batch call works as before."""
    x, labels = _x(2, 6), _labels(2, 6, 2)
    triplets = Triplets(L([0, 1]), L([2, 3]), L([4, 5]))
    loss = TripletLoss(margin=0.3)
    torch.testing.assert_close(loss(x, labels, indices=triplets), loss(x, None, indices=triplets))
    assert loss.mining == "batch_all" and "mining='batch_all'" in repr(loss)
    assert "miner=" in repr(TripletLoss(miner=mining.batch_hard))


def test_the_readme_example_runs_as_written():
    """README.md's example of ``indices=`` and ``miner=`` (its Python blocks are not run by
    tests/test_readme.py, which runs the shell commands)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "indices=Triplets(a, p, n)" in b]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["loss"].ndim == 0 and torch.isfinite(scope["loss"])
    assert scope["emb"].grad is not None and scope["emb"].grad.abs().sum() > 0

"""Multi-label data: multi-hot (B, L) labels and boolean positive masks in the miners, the losses
and the retrieval metrics, against plain-loop references; one-hot labels give exactly what the
1-D class labels give."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric import mining
from deepmetric.distances import pairwise
from deepmetric.evaluate.metrics import retrieval_metrics
from deepmetric.losses import (
    ContrastiveLoss,
    CrossBatchMemory,
    LiftedStructuredLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    TripletLoss,
)

MARGIN = 0.3


def _data(seed: int, b: int = 9, n_labels: int = 4, d: int = 3, p: float = 0.3):
    """Embeddings (b, d) float64 and multi-hot (b, n_labels) int64 labels; row 0 has no label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = (torch.rand(b, n_labels, generator=g) < p).long()
    y[0] = 0
    return x, y


def _rel(y: torch.Tensor, i: int, j: int) -> bool:
    """Plain-loop relevance: the two items share a label (multi-hot), or mask[i, j]."""
    if y.dtype == torch.bool:
        return bool(y[i, j])
    return any(int(a) == 1 and int(b) == 1 for a, b in zip(y[i], y[j]))


def _pos_neg(y, i, j, same_set=True):
    if same_set and i == j:
        return False, False
    r = _rel(y, i, j)
    return r, not r


def _dist(x, i, j, ref=None):
    ref = x if ref is None else ref
    return torch.linalg.norm(x[i] - ref[j])


def _mask(seed: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, b, generator=g) < 0.35
    return m | m.T  # symmetric: one relation, read either way


# ----------------------------------------------------------------------------- masks, miners


@pytest.mark.parametrize("form", ["multi_hot", "mask"])
def test_pair_masks_follow_shared_labels(form):
    _, y = _data(1)
    labels = y if form == "multi_hot" else _mask(1, len(y))
    masks = mining.pair_masks(labels)
    for i in range(len(y)):
        for j in range(len(y)):
            pos, neg = _pos_neg(labels, i, j)
            assert bool(masks.positive[i, j]) == pos and bool(masks.negative[i, j]) == neg
    if form == "multi_hot":  # the item with no label: no positive, everyone's negative
        assert not masks.positive[0].any() and masks.negative[0, 1:].all()
        assert not masks.positive[:, 0].any() and masks.negative[1:, 0].all()


def test_pair_masks_with_a_reference_set():
    _, y = _data(2)
    _, ref_y = _data(3, b=5)
    masks = mining.pair_masks(y, ref_y)
    for i in range(len(y)):
        for j in range(len(ref_y)):
            shared = bool((y[i] * ref_y[j]).sum() > 0)
            assert bool(masks.positive[i, j]) == shared and bool(masks.negative[i, j]) != shared


def _brute_valid(y, dist, same_set=True):
    b, r = dist.shape
    for a in range(b):
        for p in range(r):
            if not _pos_neg(y, a, p, same_set)[0]:
                continue
            for n in range(r):
                if _pos_neg(y, a, n, same_set)[1]:
                    yield a, p, n


@pytest.mark.parametrize("form", ["multi_hot", "mask"])
def test_miners_against_brute_force(form):
    x, y = _data(4, b=10)
    labels = y if form == "multi_hot" else _mask(4, len(y))
    dist = pairwise(x, None, "euclidean")
    valid = list(_brute_valid(labels, dist))
    assert valid
    got = mining.batch_all(dist, labels, margin=MARGIN)
    want = {(a, p, n) for a, p, n in valid if dist[a, p] - dist[a, n] + MARGIN > 0}
    assert set(zip(*(t.tolist() for t in got))) == want
    cats = mining.triplet_categories(dist, labels, margin=MARGIN)
    hard = sum(1 for a, p, n in valid if dist[a, n] <= dist[a, p])
    easy = sum(1 for a, p, n in valid if dist[a, n] >= dist[a, p] + MARGIN)
    assert (cats.hard, cats.easy, cats.total) == (hard, easy, len(valid))
    for method in ("sort", "direct"):
        counts = mining.batch_all_counts(dist, labels, margin=MARGIN, method=method)
        assert int(counts.per_slot.sum()) == len(want)

    hard_t = mining.batch_hard(dist, labels)
    want_hard = []
    for a in range(len(y)):
        ps = [p for p in range(len(y)) if _pos_neg(labels, a, p)[0]]
        ns = [n for n in range(len(y)) if _pos_neg(labels, a, n)[1]]
        if ps and ns:
            want_hard.append(
                (a, max(ps, key=lambda p: dist[a, p]), min(ns, key=lambda n: dist[a, n]))
            )
    assert list(zip(*(t.tolist() for t in hard_t))) == want_hard

    for method in ("sort", "direct"):
        semi = mining.semi_hard(dist, labels, method=method)
        want_semi = []
        for a in range(len(y)):
            ns = [n for n in range(len(y)) if _pos_neg(labels, a, n)[1]]
            if not ns:
                continue
            for p in range(len(y)):
                if not _pos_neg(labels, a, p)[0]:
                    continue
                above = [n for n in ns if dist[a, n] > dist[a, p]]
                pick = (
                    min(above, key=lambda n: dist[a, n])
                    if above
                    else max(ns, key=lambda n: dist[a, n])
                )
                want_semi.append((a, p, pick))
        assert list(zip(*(t.tolist() for t in semi))) == want_semi


def test_miners_with_a_multi_hot_reference_set_and_a_rectangular_mask():
    x, y = _data(5, b=6)
    ref_x, ref_y = _data(6, b=7)
    dist = pairwise(x, ref_x, "euclidean")
    mask = mining.pair_masks(y, ref_y).positive
    valid = list(_brute_valid(mask, dist, same_set=False))
    want = {(a, p, n) for a, p, n in valid if dist[a, p] - dist[a, n] + MARGIN > 0}
    for labels, ref_labels in ((y, ref_y), (mask, None)):
        got = mining.batch_all(dist, labels, ref_labels, margin=MARGIN)
        assert set(zip(*(t.tolist() for t in got))) == want


# ----------------------------------------------------------------------------- losses


def _triplet_reference(x, labels, mining_rule, soft=False, ref_x=None):
    same_set = ref_x is None
    r = len(x) if same_set else len(ref_x)
    d = {(i, j): _dist(x, i, j, ref_x) for i in range(len(x)) for j in range(r)}
    pos = {(a, p) for a in range(len(x)) for p in range(r) if _pos_neg(labels, a, p, same_set)[0]}
    neg = {(a, n) for a in range(len(x)) for n in range(r) if _pos_neg(labels, a, n, same_set)[1]}
    terms = []

    def h(v):
        return F.softplus(v) if soft else F.relu(v + MARGIN)

    if mining_rule == "batch_all":
        for a, p in sorted(pos):
            for n in range(r):
                if (a, n) in neg:
                    terms.append(h(d[a, p] - d[a, n]))
        if not soft:
            terms = [t for t in terms if t > 0]
    elif mining_rule == "batch_hard":
        for a in range(len(x)):
            ps = [d[a, p] for p in range(r) if (a, p) in pos]
            ns = [d[a, n] for n in range(r) if (a, n) in neg]
            if ps and ns:
                terms.append(h(max(ps) - min(ns)))
    else:
        for a, p in sorted(pos):
            ns = [d[a, n] for n in range(r) if (a, n) in neg]
            if ns:
                above = [v for v in ns if v > d[a, p]]
                terms.append(h(d[a, p] - (min(above) if above else max(ns))))
    return torch.stack(terms).mean() if terms else x.sum() * 0


def _check_value_and_grad(loss_fn, ref_fn, *inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    got = loss_fn(*leaves)
    got.backward()
    refs = [t.clone().requires_grad_(True) for t in inputs]
    want = ref_fn(*refs)
    want.backward()
    assert torch.allclose(got, want, atol=1e-9), (float(got), float(want))
    for a, b in zip(leaves, refs):
        assert torch.allclose(a.grad, b.grad, atol=1e-8)


@pytest.mark.parametrize("form", ["multi_hot", "mask"])
@pytest.mark.parametrize(
    ("rule", "soft"),
    [("batch_all", False), ("batch_all", True), ("batch_hard", False), ("semi_hard", False)],
)
def test_triplet_loss_against_brute_force(form, rule, soft):
    x, y = _data(7)
    labels = y if form == "multi_hot" else _mask(7, len(y))
    loss = TripletLoss(margin=MARGIN, mining=rule, soft=soft)
    _check_value_and_grad(
        lambda e: loss(e, labels),
        lambda e: _triplet_reference(e, labels, rule, soft),
        x,
    )


def test_triplet_loss_with_a_reference_set_multi_hot_and_mask():
    x, y = _data(8, b=6)
    ref_x, ref_y = _data(9, b=7)
    mask = mining.pair_masks(y, ref_y).positive
    loss = TripletLoss(margin=MARGIN)
    for labels, ref_labels in ((y, ref_y), (mask, None)):
        _check_value_and_grad(
            lambda e, r, lab=labels, rl=ref_labels: loss(e, lab, r, rl),
            lambda e, r, lab=labels: _triplet_reference(e, mask, "batch_all", ref_x=r),
            x,
            ref_x,
        )


@pytest.mark.parametrize("rule", ["batch_all", "batch_hard", "semi_hard"])
def test_tiled_triplet_loss_matches_one_tile_with_multi_hot_labels(rule):
    x, y = _data(10, b=12)
    x = x.float()
    one = x.clone().requires_grad_(True)
    tiled = x.clone().requires_grad_(True)
    v1 = TripletLoss(margin=MARGIN, mining=rule)(one, y)
    v2 = TripletLoss(margin=MARGIN, mining=rule, tile_bytes=4 * 12 * 2)(tiled, y)  # 2 rows
    v1.backward()
    v2.backward()
    assert torch.allclose(v1, v2, atol=1e-6)
    assert torch.allclose(one.grad, tiled.grad, atol=1e-6)


def _contrastive_reference(x, labels):
    n = len(x)
    terms = []
    for i in range(n):
        for j in range(n):
            if i != j:
                d = _dist(x, i, j)
                terms.append(0.5 * (d**2 if _rel(labels, i, j) else F.relu(MARGIN - d) ** 2))
    return torch.stack(terms).mean()


def _lifted_reference(x, labels):
    n = len(x)
    d = {(i, j): _dist(x, i, j) for i in range(n) for j in range(n) if i != j}
    s = []
    for i in range(n):
        negs = [torch.exp(MARGIN - d[i, k]) for k in range(n) if _pos_neg(labels, i, k)[1]]
        s.append(torch.stack(negs).sum() if negs else None)
    total, pairs = x.sum() * 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if not _rel(labels, i, j):
                continue
            pairs += 1
            parts = [v for v in (s[i], s[j]) if v is not None]
            if parts:
                total = total + F.relu(torch.log(sum(parts)) + d[i, j]) ** 2
    return total / (2 * pairs)


def _ms_reference(x, labels, alpha=2.0, beta=50.0, base=0.5, eps=0.1):
    n = len(x)
    total = x.sum() * 0
    for i in range(n):
        s = [x[i] @ x[j] / (torch.linalg.norm(x[i]) * torch.linalg.norm(x[j])) for j in range(n)]
        ps = [j for j in range(n) if _pos_neg(labels, i, j)[0]]
        ns = [j for j in range(n) if _pos_neg(labels, i, j)[1]]
        if not ps or not ns:
            continue
        min_p = min(float(s[j].detach()) for j in ps)
        max_n = max(float(s[j].detach()) for j in ns)
        kn = [j for j in ns if float(s[j].detach()) + eps > min_p]
        kp = [j for j in ps if float(s[j].detach()) - eps < max_n]
        if kp:
            total = (
                total + torch.log(1 + sum(torch.exp(-alpha * (s[j] - base)) for j in kp)) / alpha
            )
        if kn:
            total = total + torch.log(1 + sum(torch.exp(beta * (s[j] - base)) for j in kn)) / beta
    return total / n


@pytest.mark.parametrize("form", ["multi_hot", "mask"])
@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (lambda: ContrastiveLoss(margin=MARGIN), _contrastive_reference),
        (lambda: LiftedStructuredLoss(margin=MARGIN), _lifted_reference),
        (lambda: MultiSimilarityLoss(), _ms_reference),
    ],
)
def test_pair_losses_against_brute_force(form, make, reference):
    x, y = _data(11)
    labels = y if form == "multi_hot" else _mask(11, len(y))
    loss = make()
    _check_value_and_grad(lambda e: loss(e, labels), lambda e: reference(e, labels), x)


def test_lifted_with_an_item_that_shares_a_label_with_everyone():
    x, y = _data(12, b=6)
    y[:, 0] = 1  # everyone shares label 0: no item has a negative
    loss = LiftedStructuredLoss(margin=MARGIN)(x.clone().requires_grad_(True), y)
    assert loss == 0
    y[1:, 0] = 0
    y[1, 0] = 1  # items 0 and 1 are positives; others may have negatives
    e = x.clone().requires_grad_(True)
    value = LiftedStructuredLoss(margin=MARGIN)(e, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(e.grad).all()
    assert torch.allclose(value, _lifted_reference(x, y), atol=1e-9)


# ----------------------------------------------------------------------------- one-hot == classes


@pytest.mark.parametrize(
    "make",
    [
        lambda: TripletLoss(margin=MARGIN),
        lambda: TripletLoss(margin=MARGIN, mining="batch_hard"),
        lambda: TripletLoss(margin=MARGIN, mining="semi_hard"),
        lambda: TripletLoss(soft=True),
        lambda: ContrastiveLoss(margin=MARGIN),
        lambda: LiftedStructuredLoss(margin=MARGIN),
        lambda: MultiSimilarityLoss(),
    ],
)
def test_one_hot_labels_give_exactly_the_class_result(make):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(16, 4, generator=g)
    classes = torch.randint(0, 4, (16,), generator=g)
    one_hot = F.one_hot(classes, 5)  # a never-used fifth label column changes nothing
    results = []
    for labels in (classes, one_hot):
        e = x.clone().requires_grad_(True)
        value = make()(e, labels)
        value.backward()
        results.append((value, e.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_one_hot_miners_and_metrics_give_exactly_the_class_result():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(20, 3, generator=g)
    classes = torch.randint(0, 4, (20,), generator=g)
    one_hot = F.one_hot(classes, 4)
    dist = pairwise(x, None, "euclidean")
    for miner in (mining.batch_hard, mining.semi_hard):
        assert all(torch.equal(a, b) for a, b in zip(miner(dist, classes), miner(dist, one_hot)))
    a = mining.batch_all(dist, classes, margin=MARGIN)
    b = mining.batch_all(dist, one_hot, margin=MARGIN)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert mining.triplet_categories(dist, classes, margin=0.2) == mining.triplet_categories(
        dist, one_hot, margin=0.2
    )
    assert retrieval_metrics(x, classes, chunk=7) == retrieval_metrics(x, one_hot, chunk=7)


# ----------------------------------------------------------------------------- metrics


def _retrieval_reference(x, labels, ks):
    n = len(x)
    sums = {"p1": 0.0, "rp": 0.0, "map": 0.0, **{k: 0.0 for k in ks}}
    queries = 0
    for q in range(n):
        others = sorted((j for j in range(n) if j != q), key=lambda j: (float(_dist(x, q, j)), j))
        rel = [_rel(labels, q, j) for j in others]
        r = sum(rel)
        if r == 0:
            continue
        queries += 1
        sums["p1"] += rel[0]
        sums["rp"] += sum(rel[:r]) / r
        hits, ap = 0, 0.0
        for rank, is_rel in enumerate(rel[:r], start=1):
            hits += is_rel
            ap += hits / rank if is_rel else 0.0
        sums["map"] += ap / r
        for k in ks:
            sums[k] += any(rel[:k])
    return {key: value / queries for key, value in sums.items()}, queries


@pytest.mark.parametrize("form", ["multi_hot", "mask"])
def test_retrieval_metrics_against_brute_force(form):
    x, y = _data(15, b=14, n_labels=5, p=0.25)
    labels = y if form == "multi_hot" else _mask(15, len(y))
    ks = (1, 2, 4)
    got = retrieval_metrics(x, labels, ks=ks, chunk=5)
    want, queries = _retrieval_reference(x, labels, ks)
    assert got["queries"] == queries
    assert math.isclose(got["precision_at_1"], want["p1"], abs_tol=1e-12)
    assert math.isclose(got["r_precision"], want["rp"], abs_tol=1e-12)
    assert math.isclose(got["map_at_r"], want["map"], abs_tol=1e-12)
    for k in ks:
        assert math.isclose(got["recall_at_k"][str(k)], want[k], abs_tol=1e-12)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TripletLoss()(torch.randn(4, 2), torch.tensor([[0, 2]] * 4)), "only 0 and 1"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.ones(3, 2, dtype=torch.long)), "3 rows"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.ones(4, 3, dtype=torch.bool)), "(4, 4)"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long)), "1-D"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.zeros(4, 2, 2, dtype=torch.long)), "got"),
        (
            lambda: TripletLoss()(
                torch.randn(4, 2),
                torch.ones(4, 3, dtype=torch.long),
                torch.randn(5, 2),
                torch.ones(5, 2, dtype=torch.long),
            ),
            "label columns",
        ),
        (
            lambda: TripletLoss()(
                torch.randn(4, 2),
                torch.ones(4, 5, dtype=torch.bool),
                torch.randn(5, 2),
                torch.arange(5),
            ),
            "no ref_labels",
        ),
        (
            lambda: ProxyAnchorLoss(classes=[0, 1, 2], dim=2)(
                torch.randn(4, 2), torch.ones(4, 3, dtype=torch.long)
            ),
            "one class per item",
        ),
        (
            lambda: CrossBatchMemory(TripletLoss(), size=8)(
                torch.randn(4, 2), torch.ones(4, 3, dtype=torch.long)
            ),
            "one class per item",
        ),
        (
            lambda: retrieval_metrics(
                torch.randn(4, 2), torch.ones(4, 3, dtype=torch.long), per_class=True
            ),
            "per_class",
        ),
        (
            lambda: mining.batch_hard(
                torch.rand(4, 4), torch.ones(4, 4, dtype=torch.bool), torch.arange(4)
            ),
            "no ref_labels",
        ),
        (
            lambda: mining.batch_hard(torch.rand(4, 5), torch.ones(4, 3, dtype=torch.long)),
            "ref_labels must be multi-hot",
        ),
    ],
)
def test_bad_multi_label_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_the_mask_diagonal_is_ignored():
    x, _ = _data(16, b=8)
    mask = _mask(16, 8)
    other = mask.clone()
    other.diagonal().copy_(~mask.diagonal())
    for loss in (TripletLoss(margin=MARGIN), ContrastiveLoss(margin=MARGIN), MultiSimilarityLoss()):
        assert torch.equal(loss(x, mask), loss(x, other))
    assert retrieval_metrics(x, mask) == retrieval_metrics(x, other)


def test_the_readme_example_runs_as_written(capsys):
    """README.md's multi-label example (its Python blocks are not run by tests/test_readme.py)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (block,) = [b for b in blocks if "tags @ tags.T" in b]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["embeddings"].grad is not None and scope["embeddings"].grad.abs().sum() > 0
    assert "tensor(" in capsys.readouterr().out

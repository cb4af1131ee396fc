"""Threshold transfer and open-set identification (deepmetric.evaluate.transfer) against plain
loops over pairs and probes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dist as ref_dist

from deepmetric.evaluate.roc import threshold_at_far
from deepmetric.evaluate.transfer import (
    open_set,
    open_set_probes,
    pair_threshold,
    threshold_transfer,
)


def blobs(n_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    centers = torch.randn(n_classes, dim, generator=g)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def pairs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(n, generator=g).double()
    same = torch.rand(n, generator=g) < 0.4
    dist[same] *= 0.7  # positives closer, with overlap
    same[0], same[1] = True, False
    return dist, same


@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0]))
@settings(max_examples=40, deadline=None)
def test_threshold_transfer_matches_loops(seed, far):
    vd, vs = pairs(60, seed)
    td, ts = pairs(80, seed + 1)
    got = threshold_transfer(vd, vs, td, ts, fars=(far,))
    (key,) = got
    r = got[key]
    t = r["threshold"]
    assert t == threshold_at_far(vd, vs, far)
    negatives = [float(d) for d, s in zip(td, ts) if not s]
    positives = [float(d) for d, s in zip(td, ts) if s]
    val_negatives = [float(d) for d, s in zip(vd, vs) if not s]
    assert r["far_reached"] == pytest.approx(sum(d <= t for d in negatives) / len(negatives))
    assert r["tar_reached"] == pytest.approx(sum(d <= t for d in positives) / len(positives))
    assert r["far_validation"] == pytest.approx(
        sum(d <= t for d in val_negatives) / len(val_negatives)
    )
    assert r["far_validation"] <= far  # the validation FAR never exceeds the asked one
    assert r["resolution"] == pytest.approx(1 / len(negatives))
    assert r["test_pairs"] == {"positive": len(positives), "negative": len(negatives)}
    if far > 0:
        assert r["far_ratio"] == pytest.approx(r["far_reached"] / far)


def brute_open_set(emb, labels, metric, enrolled, t):
    """Plain loops: each probe against each enrolled item; DIR, FAR at t and rank-1."""
    lab = labels.tolist()
    enrolled_classes = {lab[e] for e in enrolled}
    hits = genuine = impostors = accepted = right = 0
    for i in range(len(lab)):
        if i in enrolled:
            continue
        d = [float(ref_dist(emb[i].double(), emb[e].double(), metric)) for e in enrolled]
        best = min(range(len(d)), key=lambda k: (d[k], k))
        if lab[i] in enrolled_classes:
            genuine += 1
            own = lab[enrolled[best]] == lab[i]
            right += own
            hits += own and d[best] <= t
        else:
            impostors += 1
            accepted += d[best] <= t
    return hits / genuine, accepted / impostors, right / genuine, genuine, impostors


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_open_set_matches_loops(metric, seed):
    emb, labels = blobs(9, 5, 4, seed)
    val_emb, val_labels = blobs(6, 4, 4, seed + 10)
    got = open_set(
        emb,
        labels,
        metric=metric,
        fars=(0.1, 0.0),
        seed=seed,
        val_embeddings=val_emb,
        val_labels=val_labels,
    )
    probes = open_set_probes(emb, labels, metric=metric, seed=seed)
    enrolled = probes.enrolled.tolist()
    assert got["enrolled"] == 4 and got["strangers"] == 5
    for key, far in (("1e-01", 0.1), ("0e+00", 0.0)):
        block = got["at_far"][key]
        for which in ("oracle", "validation"):
            t = block[which]["threshold"]
            dir_, far_reached, rank1, genuine, impostors = brute_open_set(
                emb, labels, metric, enrolled, t
            )
            assert block[which]["dir"] == pytest.approx(dir_)
            assert block[which]["far_reached"] == pytest.approx(far_reached)
        assert block["oracle"]["far_reached"] <= far
        assert block["validation"]["far_validation"] <= far
    assert got["rank1"] == pytest.approx(rank1)
    assert (got["genuine_probes"], got["impostor_probes"]) == (genuine, impostors)


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_open_set_ties_go_to_the_lower_gallery_index(metric):
    """Small integer embeddings: many exactly tied distances (exact in float32), so rank-1 and
    DIR depend on the tie rule; the loops take the lowest gallery index among the nearest."""
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(12).repeat_interleave(4)
    emb = torch.randint(0, 2, (len(labels), 3), generator=g).float()
    for seed in range(4):
        got = open_set(emb, labels, metric=metric, fars=(0.2,), seed=seed)
        enrolled = open_set_probes(emb, labels, metric=metric, seed=seed).enrolled.tolist()
        t = got["at_far"]["2e-01"]["oracle"]["threshold"]
        dir_, far_reached, rank1, _, _ = brute_open_set(emb, labels, metric, enrolled, t)
        assert got["rank1"] == rank1
        assert got["at_far"]["2e-01"]["oracle"]["dir"] == dir_
        assert got["at_far"]["2e-01"]["oracle"]["far_reached"] == far_reached <= 0.2


def test_open_set_float64_matches_loops_closely():
    emb, labels = blobs(8, 4, 5, 7)
    emb = emb.double()
    got = open_set(emb, labels, metric="cosine", fars=(0.25,), seed=1)
    enrolled = open_set_probes(emb, labels, metric="cosine", seed=1).enrolled.tolist()
    o = got["at_far"]["2.5e-01"]["oracle"]
    dir_, far_reached, rank1, _, _ = brute_open_set(emb, labels, "cosine", enrolled, o["threshold"])
    assert (o["dir"], o["far_reached"], got["rank1"]) == (dir_, far_reached, rank1)


@given(
    st.integers(2, 9),
    st.integers(2, 4),
    st.integers(0, 1000),
    st.sampled_from(["cosine", "euclidean"]),
)
@settings(max_examples=30, deadline=None)
def test_open_set_properties(n_classes, per_class, seed, metric):
    emb, labels = blobs(n_classes, per_class, 3, seed)
    fars = (0.0, 0.1, 0.5, 1.0)
    got = open_set(emb, labels, metric=metric, fars=fars, seed=seed)
    assert got["enrolled"] == n_classes // 2
    assert got["enrolled"] + got["strangers"] == n_classes
    assert got["genuine_probes"] == got["enrolled"] * (per_class - 1)
    assert got["impostor_probes"] == got["strangers"] * per_class
    blocks = [got["at_far"][key] for key in ("0e+00", "1e-01", "5e-01", "1e+00")]
    for far, block in zip(fars, blocks):
        assert block["far_asked"] == far
        assert block["oracle"]["far_reached"] <= far
        assert block["oracle"]["dir"] <= got["rank1"]
    dirs = [b["oracle"]["dir"] for b in blocks]
    assert dirs == sorted(dirs)  # a larger FAR allows a larger threshold
    assert blocks[-1]["oracle"]["dir"] == got["rank1"]  # FAR 1 accepts every probe


def test_threshold_at_far_is_one_function_everywhere():
    import deepmetric.evaluate as evaluate
    import deepmetric.inference as inference
    import deepmetric.inference.threshold as threshold

    assert evaluate.threshold_at_far is threshold_at_far
    assert inference.threshold_at_far is threshold_at_far
    assert threshold.threshold_at_far is threshold_at_far


def test_the_split_is_half_enrolled_one_item_each_and_seeded():
    emb, labels = blobs(10, 4, 3, 0)
    lab = labels.numpy()
    a = open_set_probes(emb, labels, metric="cosine", seed=3)
    b = open_set_probes(emb, labels, metric="cosine", seed=3)
    c = open_set_probes(emb, labels, metric="cosine", seed=4)
    enrolled_classes = set(lab[a.enrolled].tolist())
    assert len(a.enrolled) == 5 and len(enrolled_classes) == 5  # one item per class
    assert not enrolled_classes & set(a.strangers.tolist())
    assert enrolled_classes | set(a.strangers.tolist()) == set(range(10))
    assert np.array_equal(a.enrolled, b.enrolled) and torch.equal(
        a.impostor_nearest, b.impostor_nearest
    )
    assert not np.array_equal(a.enrolled, c.enrolled)
    assert len(a.genuine_nearest) == 5 * 3 and len(a.impostor_nearest) == 5 * 4


def test_bad_inputs_are_one_line_value_errors():
    emb, labels = blobs(4, 3, 2, 0)
    vd, vs = pairs(20, 0)
    cases = [
        (
            lambda: open_set(emb, torch.zeros(12, dtype=torch.int64), metric="cosine"),
            "needs 2 classes or more; got 1",
        ),
        (lambda: open_set(emb, torch.arange(12), metric="cosine"), "no genuine probe"),
        (lambda: open_set(emb[:5], labels, metric="cosine"), "5 embeddings but labels"),
        (lambda: open_set(emb, labels, metric="manhattan"), "manhattan"),
        (lambda: open_set(emb, labels, metric="cosine", fars=(2.0,)), "FAR must be in [0, 1]"),
        (
            lambda: threshold_transfer(vd, torch.ones(20, dtype=torch.bool), vd, vs),
            "the validation pairs need positives and negatives; got 20 and 0",
        ),
        (
            lambda: threshold_transfer(vd, vs, vd, torch.zeros(20, dtype=torch.bool)),
            "the test pairs need positives and negatives; got 0 and 20",
        ),
        (lambda: threshold_transfer(vd, vs, vd[:19], vs), "distances has 19 entries"),
        (
            lambda: threshold_transfer(vd, vs, torch.full((20,), float("nan")), vs),
            "distances contain NaN",
        ),
        (lambda: threshold_transfer(vd, vs, vd, vs, fars=(-0.1,)), "FAR must be in [0, 1]"),
        (lambda: pair_threshold(emb, torch.zeros(12), 0.1, metric="cosine"), "2 classes or more"),
        (lambda: pair_threshold(emb, labels, 1.5, metric="cosine"), "FAR must be in [0, 1]"),
        (lambda: pair_threshold(emb, labels[:3], 0.1, metric="cosine"), "12 embeddings but"),
        (
            lambda: open_set(emb, labels, metric="cosine", val_labels=labels),
            "pass both or neither",
        ),
        (
            lambda: open_set(
                emb, labels, metric="cosine", val_embeddings=emb[:5], val_labels=labels
            ),
            "5 embeddings but labels",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)


def _negative_distances(emb, labels, metric):
    """Every pair i < j of different classes, by plain loops."""
    n = len(labels)
    return [
        float(ref_dist(emb[i], emb[j], metric))
        for i in range(n)
        for j in range(i + 1, n)
        if labels[i] != labels[j]
    ]


@given(
    st.integers(0, 10_000),
    st.sampled_from([0.0, 1e-3, 0.01, 0.2, 0.9, 1.0]),
    st.sampled_from(["euclidean", "cosine"]),
    st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_pair_threshold_matches_loops(seed, rate, metric, ties):
    emb, labels = blobs(5, 4, 3, seed)
    emb = emb.double()
    if ties:
        emb = emb.round(decimals=0)  # many equal distances
    t, pairs = pair_threshold(emb, labels, rate, metric=metric)
    negatives = sorted(_negative_distances(emb, labels, metric))
    assert pairs == len(negatives)
    k = int(np.floor(rate * pairs + 1e-9))
    eps = 1e-9  # the matrix and the loops may differ in the last bits
    within = sum(x <= t for x in negatives)
    assert within <= k  # the rate is kept
    if k < pairs:  # the largest such threshold: the next distance (and its ties) exceed the rate
        nxt = negatives[within]
        assert t < nxt + eps
        assert sum(x <= nxt + eps for x in negatives) > k
    else:
        assert t >= negatives[-1] - eps


def test_pair_threshold_in_chunks_equals_one_piece(monkeypatch):
    import deepmetric.evaluate.transfer as transfer

    emb, labels = blobs(7, 5, 4, 1)
    whole = pair_threshold(emb, labels, 0.05, metric="euclidean")
    monkeypatch.setattr(transfer, "CHUNK", 7)  # one row per chunk
    threshold, count = pair_threshold(emb, labels, 0.05, metric="euclidean")
    # The same pairs; the distances to float32 rounding, which a matrix product of 1 row may
    # do otherwise than one of 28 (measured: 6e-8 apart on an AVX-512 machine, equal on another)
    assert count == whole[1] and threshold == pytest.approx(whole[0], rel=1e-6)


def test_the_sized_threshold_is_the_pair_rate_for_the_gallery_size():
    emb, labels = blobs(40, 6, 4, 2, spread=0.9)
    val_emb, val_labels = blobs(30, 6, 4, 3, spread=0.9)
    got = open_set(
        emb, labels, metric="euclidean", fars=(0.05,), val_embeddings=val_emb, val_labels=val_labels
    )
    again = open_set(
        emb,
        labels,
        metric="euclidean",
        fars=(0.05, 0.01),
        val_embeddings=val_emb,
        val_labels=val_labels,
    )
    for key, far in (("5e-02", 0.05), ("1e-02", 0.01)):  # one walk serves every FAR
        rate_f = 1 - (1 - far) ** (1 / 20)
        sized = again["at_far"][key]["validation_sized"]["threshold"]
        assert sized == pair_threshold(val_emb, val_labels, rate_f, metric="euclidean")[0]
    z = got["at_far"]["5e-02"]["validation_sized"]
    rate = 1 - (1 - 0.05) ** (1 / 20)
    assert z["enrolled"] == 20 and z["pair_rate"] == pytest.approx(rate)
    assert z["threshold"] == pair_threshold(val_emb, val_labels, rate, metric="euclidean")[0]
    probes = open_set_probes(emb, labels, metric="euclidean", seed=0)
    t = z["threshold"]
    assert z["far_reached"] == pytest.approx(float((probes.impostor_nearest <= t).double().mean()))
    assert z["dir"] == pytest.approx(
        float((probes.genuine_right & (probes.genuine_nearest <= t)).double().mean())
    )

"""Retrieval and clustering metrics against brute-force references written as plain Python
loops: full distance lists sorted per query by (distance, index) with ``sorted``."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric import neighbors as NB
from deepmetric.distances import METRICS
from deepmetric.evaluate import metrics as M
from deepmetric.evaluate.metrics import (
    clustering_nmi,
    kmeans,
    nearest_neighbors,
    nearest_other,
    nmi,
    retrieval_metrics,
)

# ----------------------------------------------------------------------------- references


def _dist(u: list[float], v: list[float], metric: str) -> float:
    if metric == "cosine":
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(b * b for b in v))
        if nu == 0 or nv == 0:
            return 1.0
        return min(max(1.0 - sum(a * b for a, b in zip(u, v)) / (nu * nv), 0.0), 2.0)
    sq = sum((a - b) ** 2 for a, b in zip(u, v))
    return sq if metric == "squared_euclidean" else math.sqrt(sq)


def _ranking(query: list[float], refs: list[list[float]], metric: str, skip: int | None):
    """[(distance, index)] of all refs but ``skip``, sorted by distance, then index."""
    pairs = [(_dist(query, r, metric), j) for j, r in enumerate(refs) if j != skip]
    return sorted(pairs)


def _reference_retrieval(
    x: torch.Tensor, labels: torch.Tensor, metric: str, ks, refs=None, ref_labels=None
):
    """Plain loops: each query ranks every other item (or, with ``refs``, every gallery
    item); relevance = the same class."""
    pts, lab = x.tolist(), labels.tolist()
    own = refs is None
    ref_pts = pts if own else refs.tolist()
    ref_lab = lab if own else ref_labels.tolist()
    p1 = rp = mapr = 0.0
    recall, precision, mapk = (dict.fromkeys(ks, 0.0) for _ in range(3))
    queries = 0
    for i in range(len(lab)):
        others = [j for j in range(len(ref_lab)) if not (own and j == i)]
        r = sum(1 for j in others if ref_lab[j] == lab[i])
        if r == 0:
            continue
        ranking = _ranking(pts[i], ref_pts, metric, i if own else None)
        rel = [ref_lab[j] == lab[i] for _, j in ranking]
        queries += 1
        p1 += rel[0]
        rp += sum(rel[:r]) / r
        hits, prec_at = 0, []
        for pos in range(len(rel)):
            if rel[pos]:
                hits += 1
            prec_at.append(hits / (pos + 1) if rel[pos] else 0.0)
        mapr += sum(prec_at[:r]) / r
        for k in ks:
            recall[k] += any(rel[:k])
            precision[k] += sum(rel[:k]) / k
            mapk[k] += sum(prec_at[:k]) / min(k, r)
    if queries == 0:
        return None
    return {
        "precision_at_1": p1 / queries,
        "r_precision": rp / queries,
        "map_at_r": mapr / queries,
        "recall_at_k": {str(k): v / queries for k, v in recall.items()},
        "precision_at_k": {str(k): v / queries for k, v in precision.items()},
        "map_at_k": {str(k): v / queries for k, v in mapk.items()},
        "queries": queries,
    }


def _reference_by_class(x: torch.Tensor, labels: torch.Tensor, metric: str) -> list[dict]:
    """Per label (ascending): mean precision@1, R-precision, MAP@R over its queries, and the
    other label filling most of its queries' first-R slots (lowest label among equals)."""
    pts, lab = x.tolist(), labels.tolist()
    rows = []
    for c in sorted(set(lab)):
        sums = {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0}
        slots: dict[int, int] = {}
        queries = 0
        for i in (i for i in range(len(lab)) if lab[i] == c):
            r = lab.count(c) - 1
            if r == 0:
                continue
            ranked = [lab[j] for _, j in _ranking(pts[i], pts, metric, i)]
            queries += 1
            sums["precision_at_1"] += ranked[0] == c
            sums["r_precision"] += sum(v == c for v in ranked[:r]) / r
            hits, ap = 0, 0.0
            for pos, v in enumerate(ranked[:r]):
                slots[v] = slots.get(v, 0) + 1
                if v == c:
                    hits += 1
                    ap += hits / (pos + 1)
            sums["map_at_r"] += ap / r
        others = sorted((-n, v) for v, n in slots.items() if v != c)
        row = {"class": c, "queries": queries}
        row |= {k: (v / queries if queries else math.nan) for k, v in sums.items()}
        row["confused_with"] = others[0][1] if others else None
        total = sum(slots.values())
        row["confused_share"] = (-others[0][0] if others else 0) / total if total else math.nan
        rows.append(row)
    return rows


def _points(seed: int, n: int, d: int, metric: str) -> torch.Tensor:
    """Gaussian points for cosine; small integer coordinates otherwise, so that euclidean
    distances are exact in float64 and ties (broken by lower index) are frequent."""
    g = torch.Generator().manual_seed(seed)
    if metric == "cosine":
        return torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.randint(-2, 3, (n, d), generator=g).to(torch.float64)


# ----------------------------------------------------------------------------- neighbours


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 12),
    n_q=st.integers(1, 8),
    d=st.integers(1, 3),
    metric=st.sampled_from(METRICS),
    exclude_self=st.booleans(),
    data=st.data(),
)
def test_nearest_neighbors_matches_brute_force(seed, n, n_q, d, metric, exclude_self, data):
    refs = _points(seed, n, d, metric)
    queries = refs if exclude_self else _points(seed + 1, n_q, d, metric)
    k = data.draw(st.integers(1, n - int(exclude_self)), label="k")
    chunk = data.draw(st.integers(1, queries.shape[0] + 1), label="chunk")
    dist, idx = nearest_neighbors(
        queries, refs, k, metric=metric, exclude_self=exclude_self, chunk=chunk
    )
    assert dist.shape == idx.shape == (queries.shape[0], k)
    assert idx.dtype == torch.long and dist.dtype == torch.float64
    pts = refs.tolist()
    for i, q in enumerate(queries.tolist()):
        expected = _ranking(q, pts, metric, i if exclude_self else None)[:k]
        assert idx[i].tolist() == [j for _, j in expected]
        for got, (want, _) in zip(dist[i].tolist(), expected):
            assert got == pytest.approx(want, rel=0, abs=1e-9)


def test_ties_broken_by_lower_index():
    x = torch.zeros(200, 2)  # every distance ties: topk alone would pick arbitrary indices
    _, idx = nearest_neighbors(x, x, 5, exclude_self=True, chunk=64)
    assert idx[0].tolist() == [1, 2, 3, 4, 5]
    assert idx[3].tolist() == [0, 1, 2, 4, 5]
    assert (idx[10:] == torch.arange(5)).all()
    # equal values inside the k (not at the boundary) are ordered by index as well
    y = torch.tensor([[0.0], [2.0], [-1.0], [1.0], [-2.0], [3.0]])
    dist, idx = nearest_neighbors(y, y, 4, exclude_self=True)
    assert idx[0].tolist() == [2, 3, 1, 4]
    assert dist[0].tolist() == [1.0, 1.0, 2.0, 2.0]
    # the tie decides precision@1: item 0 has two neighbours at distance 1
    x = torch.tensor([[0.0], [1.0], [-1.0]])
    wrong_first = retrieval_metrics(x, torch.tensor([0, 1, 0]))  # neighbour 1, other class
    right_first = retrieval_metrics(x, torch.tensor([0, 0, 1]))  # neighbour 1, same class
    assert wrong_first["precision_at_1"] == 0.5 and wrong_first["queries"] == 2
    assert right_first["precision_at_1"] == 1.0 and right_first["queries"] == 2


def test_chunks_bound_the_distance_matrix(monkeypatch):
    shapes, original = [], NB.pairwise

    def spy(x, y=None, metric="euclidean"):
        shapes.append((x.shape[0], y.shape[0]))
        return original(x, y, metric)

    monkeypatch.setattr(NB, "pairwise", spy)
    x = _points(0, 50, 3, "euclidean")
    nearest_neighbors(x, x, 3, chunk=8)
    retrieval_metrics(x, torch.arange(50) % 4, chunk=8)
    assert shapes and all(rows <= 8 and cols == 50 for rows, cols in shapes)


@pytest.mark.parametrize("metric", METRICS)
def test_nearest_other(metric):
    x = _points(3, 30, 2, metric)
    labels = torch.arange(30) % 4
    labels[7] = 9  # a class of one: always wrong
    idx, correct = nearest_other(x, labels, metric)
    _, nn = nearest_neighbors(x, x, 1, metric=metric, exclude_self=True)
    assert idx.tolist() == nn[:, 0].tolist()
    pts = x.tolist()
    for i in range(30):
        j = _ranking(pts[i], pts, metric, i)[0][1]
        assert idx[i] == j and bool(correct[i]) == (labels[j] == labels[i])
    assert not correct[7]


# ----------------------------------------------------------------------------- retrieval


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(2, 14),
    n_classes=st.integers(1, 5),
    d=st.integers(1, 3),
    metric=st.sampled_from(METRICS),
    ks=st.lists(st.integers(1, 16), min_size=1, max_size=4, unique=True),
    chunk=st.integers(1, 6),
)
def test_retrieval_metrics_match_brute_force(seed, n, n_classes, d, metric, ks, chunk):
    x = _points(seed, n, d, metric)
    labels = torch.randint(0, n_classes, (n,), generator=torch.Generator().manual_seed(seed))
    labels = labels * 3 + 1  # labels need not be 0 .. C - 1
    got = retrieval_metrics(x, labels, metric=metric, ks=ks, chunk=chunk, per_class=True)
    want = _reference_retrieval(x, labels, metric, ks)
    by_class = _reference_by_class(x, labels, metric)
    assert [r["class"] for r in got["by_class"]] == [r["class"] for r in by_class]
    for g, w in zip(got["by_class"], by_class):
        assert g["queries"] == w["queries"] and g["confused_with"] == w["confused_with"]
        for name in ("precision_at_1", "r_precision", "map_at_r", "confused_share"):
            assert g[name] == pytest.approx(w[name], rel=0, abs=1e-9, nan_ok=True)
    assert "by_class" not in retrieval_metrics(x, labels, metric=metric, ks=ks)
    assert list(got["recall_at_k"]) == [str(k) for k in ks]
    if want is None:  # every class a singleton: no query counts
        assert got["queries"] == 0
        assert math.isnan(got["precision_at_1"]) and math.isnan(got["map_at_r"])
        return
    assert got["queries"] == want["queries"]
    for name in ("precision_at_1", "r_precision", "map_at_r"):
        assert got[name] == pytest.approx(want[name], rel=0, abs=1e-9)
    for block in ("recall_at_k", "precision_at_k", "map_at_k"):
        for k, v in want[block].items():
            assert got[block][k] == pytest.approx(v, rel=0, abs=1e-9), (block, k)


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 10),
    m=st.integers(1, 12),
    n_classes=st.integers(1, 4),
    d=st.integers(1, 3),
    metric=st.sampled_from(METRICS),
    ks=st.lists(st.integers(1, 16), min_size=1, max_size=3, unique=True),
    chunk=st.integers(1, 4),
)
def test_queries_against_a_gallery_match_brute_force(seed, n, m, n_classes, d, metric, ks, chunk):
    """In-Shop's protocol: every query ranks the gallery only (no item is left out), relevant
    = the gallery items of its class; per-class rows over the queries' classes."""
    x = _points(seed, n + m, d, metric)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, n_classes, (n + m,), generator=g) * 2 + 5
    q, q_y, ref, ref_y = x[:n], labels[:n], x[n:], labels[n:]
    got = retrieval_metrics(
        q, q_y, metric=metric, ks=ks, chunk=chunk, ref_embeddings=ref, ref_labels=ref_y
    )
    want = _reference_retrieval(q, q_y, metric, ks, refs=ref, ref_labels=ref_y)
    if want is None:
        assert got["queries"] == 0 and math.isnan(got["precision_at_1"])
        return
    assert got["queries"] == want["queries"]
    for name in ("precision_at_1", "r_precision", "map_at_r"):
        assert got[name] == pytest.approx(want[name], rel=0, abs=1e-9)
    for block in ("recall_at_k", "precision_at_k", "map_at_k"):
        for k, v in want[block].items():
            assert got[block][k] == pytest.approx(v, rel=0, abs=1e-9), (block, k)
    rows = retrieval_metrics(
        q, q_y, metric=metric, ref_embeddings=ref, ref_labels=ref_y, per_class=True
    )["by_class"]
    assert sum(r["queries"] for r in rows) == want["queries"]


def test_a_gallery_in_multi_hot_labels_equals_the_same_in_a_relevance_mask():
    g = torch.Generator().manual_seed(3)
    q, ref = torch.randn(7, 4, generator=g), torch.randn(11, 4, generator=g)
    q_hot = (torch.rand(7, 3, generator=g) > 0.5).long()
    ref_hot = (torch.rand(11, 3, generator=g) > 0.5).long()
    by_hot = retrieval_metrics(q, q_hot, ref_embeddings=ref, ref_labels=ref_hot, ks=(1, 3))
    mask = (q_hot @ ref_hot.T) > 0
    by_mask = retrieval_metrics(q, mask, ref_embeddings=ref, ks=(1, 3))
    assert by_hot == by_mask
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ref_classes = torch.arange(11) % 3
    one_hot = torch.nn.functional.one_hot
    by_class = retrieval_metrics(q, classes, ref_embeddings=ref, ref_labels=ref_classes)
    by_one_hot = retrieval_metrics(
        q, one_hot(classes, 3), ref_embeddings=ref, ref_labels=one_hot(ref_classes, 3)
    )
    assert by_class == by_one_hot


def test_a_gallery_with_bad_input_is_one_line():
    q = torch.randn(3, 2)
    for call, words in (
        (
            lambda: retrieval_metrics(
                q, torch.arange(3), ref_embeddings=torch.randn(4, 5), ref_labels=torch.arange(4)
            ),
            "dimensions",
        ),
        (
            lambda: retrieval_metrics(q, torch.arange(3), ref_embeddings=torch.randn(4, 2)),
            "need ref_labels",
        ),
        (
            lambda: retrieval_metrics(q, torch.arange(3), ref_labels=torch.arange(4)),
            "without ref_embeddings",
        ),
        (
            lambda: retrieval_metrics(
                q,
                torch.arange(3),
                ref_embeddings=torch.zeros(0, 2),
                ref_labels=torch.zeros(0, dtype=torch.long),
            ),
            "M >= 1",
        ),
    ):
        with pytest.raises(ValueError, match=words):
            call()


def test_by_class_names_where_the_misses_go():
    # class 0 at 0, 1, 2; class 5 at 10, 11; class 9 at 2.5, 3.5: class 0's queries find 9s
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [2.5], [3.5]])
    rows = retrieval_metrics(x, torch.tensor([0, 0, 0, 5, 5, 9, 9]), per_class=True)["by_class"]
    assert [r["class"] for r in rows] == [0, 5, 9]
    assert rows[0]["confused_with"] == 9 and rows[1]["confused_with"] is None
    assert rows[1]["map_at_r"] == 1.0 and rows[1]["confused_share"] == 0.0
    # item 2's two slots: 2.5 (9), 1 (0) -> one of the six slots of class 0 is a 9
    assert rows[0]["confused_share"] == pytest.approx(1 / 6)


def test_map_at_r_worked_example():
    # R = 10; relevant (same class) at ranks 1, 3, 4 and 7 of the first 10, plus 11 and 12
    # (beyond R: ignored). P(1) = 1/1, P(3) = 2/3, P(4) = 3/4, P(7) = 4/7, so
    # MAP@R = (1/10)(1 + 2/3 + 3/4 + 4/7) = (1/10)(84 + 56 + 63 + 48)/84 = 251/840 ≈ 0.29881,
    # R-precision = 4/10, precision@1 = 1; recall@2 = 1 (rank 1).
    rel = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    scores = NB._query_scores(rel, torch.tensor([10]), (2,))
    assert scores["map_at_r"].item() == pytest.approx(251 / 840, rel=0, abs=1e-12)
    assert scores["r_precision"].item() == pytest.approx(0.4, rel=0, abs=1e-12)
    assert scores["precision_at_1"].item() == 1.0 and scores["recall@2"].item() == 1.0


def test_retrieval_hand_example():
    # 1-D points 0, 1, 3, 6 with classes a, a, b, a: item 2 (b) has R = 0 and is excluded.
    # item 0 ranks 1 (a), 2 (b), 3 (a): R = 2, R-prec 1/2, AP@R (1/2)(1) = 1/2, p@1 = 1
    # item 1 ranks 0 (a), 2 (b), 3 (a): the same
    # item 3 ranks 2 (b), 1 (a), 0 (a): R-prec 1/2, AP@R (1/2)(1/2) = 1/4, p@1 = 0
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    got = retrieval_metrics(x, torch.tensor([0, 0, 1, 0]), ks=(1, 2, 4))
    assert got["queries"] == 3
    assert got["precision_at_1"] == pytest.approx(2 / 3)
    assert got["r_precision"] == pytest.approx(1 / 2)
    assert got["map_at_r"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4) / 3)
    assert got["recall_at_k"] == pytest.approx({"1": 2 / 3, "2": 1.0, "4": 1.0})


def test_r_zero_queries_are_excluded():
    x = _points(5, 9, 2, "euclidean")
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5])  # four singletons
    got = retrieval_metrics(x, labels)
    want = _reference_retrieval(x, labels, "euclidean", (1, 2, 4, 8))
    assert got["queries"] == 5 == want["queries"]
    assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-9)
    none = retrieval_metrics(x, torch.arange(9))
    assert none["queries"] == 0 and math.isnan(none["r_precision"])


def test_retrieval_accepts_float32_and_autograd_inputs():
    x = _points(2, 40, 4, "cosine").float().requires_grad_(True)
    labels = torch.arange(40) % 3
    got = retrieval_metrics(x, labels, metric="cosine")
    want = retrieval_metrics(x.detach().double(), labels, metric="cosine")
    assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-6)


# ----------------------------------------------------------------------------- faiss path


@pytest.fixture
def real_faiss():
    """The real faiss (the dev extra installs faiss-cpu); the torch path is the reference."""
    faiss = pytest.importorskip("faiss")
    assert NB._faiss is faiss
    return faiss


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_faiss_path_agrees_with_torch(real_faiss, monkeypatch, metric, exclude_self):
    refs = _points(7, 40, 5, "cosine").float()
    queries = refs if exclude_self else _points(8, 13, 5, "cosine").float()
    got = nearest_neighbors(queries, refs, 6, metric=metric, exclude_self=exclude_self, chunk=5)
    monkeypatch.setattr(NB, "_faiss", None)
    want = nearest_neighbors(queries, refs, 6, metric=metric, exclude_self=exclude_self)
    assert got[1].tolist() == want[1].tolist()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)


def test_faiss_path_never_returns_self_among_duplicates(real_faiss):
    x = torch.zeros(6, 2)
    dist, idx = nearest_neighbors(x, x, 2, exclude_self=True)
    assert (dist == 0).all()
    assert all(i not in row for i, row in enumerate(idx.tolist()))
    assert all(row == sorted(row) for row in idx.tolist())


def test_float64_never_uses_faiss(monkeypatch):
    monkeypatch.setattr(NB, "_faiss", types.SimpleNamespace())  # any use would fail
    x = _points(1, 10, 2, "euclidean")
    assert nearest_neighbors(x, x, 2)[1].shape == (10, 2)


# ----------------------------------------------------------------------------- clustering


def test_nmi_hand_example():
    # contingency  [[2, 1, 0],   a = (3, 3), b = (2, 2, 2), N = 6
    #               [0, 1, 2]]
    # MI = 2 * (2/6) log(6*2 / (3*2)) + 2 * (1/6) log(6*1 / (3*2)) = (2/3) log 2
    # H(true) = log 2, H(pred) = log 3: NMI = (2/3) log 2 / ((log 2 + log 3) / 2)
    true, pred = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    expected = (4 / 3) * math.log(2) / math.log(6)  # 0.5158037...
    assert nmi(true, pred) == pytest.approx(expected, rel=0, abs=1e-12)
    assert nmi(pred, true) == pytest.approx(expected, rel=0, abs=1e-12)
    renamed_true, renamed_pred = [7, 7, 7, -3, -3, -3], np.array([5, 5, 0, 0, 9, 9])
    assert nmi(renamed_true, renamed_pred) == pytest.approx(expected, rel=0, abs=1e-12)
    assert nmi(torch.tensor(true), torch.tensor(pred)) == pytest.approx(expected, abs=1e-12)


@given(seed=st.integers(0, 2**31), n=st.integers(1, 30), k=st.integers(1, 6))
def test_nmi_identical_partitions_up_to_renaming(seed, n, k):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    renamed = rng.permutation(100)[labels] * 3 - 50
    assert nmi(labels, renamed) == 1.0
    other = rng.integers(0, k, n)
    assert nmi(labels, other) == pytest.approx(nmi(renamed, other), abs=1e-12)
    assert 0.0 <= nmi(labels, other) <= 1.0 + 1e-12


def test_nmi_special_cases():
    assert nmi([4, 4, 4], [1, 1, 1]) == 1.0  # both one cluster: identical
    assert nmi([0, 0, 1, 1], [5, 5, 5, 5]) == 0.0  # one side a single cluster
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0  # independent
    assert nmi([3], [8]) == 1.0


def _blobs(per: int = 30, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    centers = 20.0 * torch.eye(4, 6, dtype=dtype)
    labels = torch.arange(4).repeat_interleave(per)[torch.randperm(4 * per, generator=g)]
    x = centers[labels] + 0.5 * torch.randn(4 * per, 6, generator=g, dtype=dtype)
    return x, labels


def test_kmeans_recovers_blobs_deterministically():
    x, labels = _blobs()
    pred = kmeans(x, 4, seed=1)
    assert pred.dtype == torch.long and pred.shape == labels.shape
    assert nmi(labels, pred) == 1.0
    assert torch.equal(pred, kmeans(x, 4, seed=1))
    assert clustering_nmi(x, labels) == 1.0
    assert clustering_nmi(x.float(), labels + 10, seed=3) == 1.0


def test_kmeans_edge_cases():
    x, _ = _blobs(per=3)
    assert (kmeans(x, 1) == 0).all()
    assert sorted(kmeans(x, 12).tolist()) == list(range(12))  # k = N: one point each
    dup = torch.zeros(5, 2)  # fewer distinct points than clusters
    pred = kmeans(dup, 3, iters=5, n_init=2)
    assert pred.shape == (5,) and int(pred.min()) >= 0 and int(pred.max()) < 3


# ----------------------------------------------------------------------------- errors

_X = torch.randn(6, 3)
_L = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: retrieval_metrics(torch.randn(6), _L), "2-D"),
        (lambda: retrieval_metrics(_X, _L[:5]), "length 5 but there are"),
        (lambda: retrieval_metrics(_X, _L.float()), "integer"),
        (lambda: retrieval_metrics(_X, _L.view(2, 3)), "1-D"),
        (lambda: retrieval_metrics(torch.tensor([[0.0, math.nan]] * 6), _L), "NaN"),
        (lambda: retrieval_metrics(_X[:1], _L[:1]), "at least 2"),
        (lambda: retrieval_metrics(_X.long(), _L), "floating"),
        (lambda: retrieval_metrics(_X, _L, ks=()), "empty"),
        (lambda: retrieval_metrics(_X, _L, ks=(1, 0)), "ks"),
        (lambda: retrieval_metrics(_X, _L, metric="manhattan"), "metric"),
        (lambda: retrieval_metrics(_X, _L, chunk=0), "chunk"),
        (lambda: nearest_neighbors(_X, _X, 0), "k must"),
        (lambda: nearest_neighbors(_X, _X, 6, exclude_self=True), "only 5"),
        (lambda: nearest_neighbors(_X, _X, 7), "only 6"),
        (lambda: nearest_neighbors(_X[:3], _X, 1, exclude_self=True), "queries to be"),
        (lambda: nearest_neighbors(_X, torch.randn(4, 2), 1), "dimension"),
        (lambda: nearest_other(_X, _L[:3]), "length 3 but there are"),
        (lambda: kmeans(_X, 0), "k must"),
        (lambda: kmeans(_X, 7), "exceeds"),
        (lambda: kmeans(_X, 2, iters=0), "iters"),
        (lambda: clustering_nmi(_X[:1], _L[:1]), "at least 2"),
        (lambda: nmi([0, 1], [0, 1, 2]), "items"),
        (lambda: nmi([], []), "at least one"),
        (lambda: nmi([[0, 1]], [[0, 1]]), "1-D"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_raw_input_baseline_is_cosine_retrieval_on_the_pixels():
    """Brute force: each image's nearest other image by cosine similarity of its pixels."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(30, 1, 5, 4, generator=gen)
    y = torch.randint(0, 3, (30,), generator=gen)
    got = M.raw_input_baseline(x, y)
    flat = x.reshape(30, -1).double()
    hits = []
    for i in range(30):
        sims = [
            (float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())), -j)
            for j in range(30)
            if j != i
        ]
        nearest = -max(sims)[1]
        hits.append(int(y[nearest] == y[i]))
    assert got["precision_at_1"] == pytest.approx(sum(hits) / 30)
    # invariant to the scale of each image (L2-normalised first)
    scaled = M.raw_input_baseline(x * torch.rand(30, 1, 1, 1, generator=gen).add(0.5), y)
    assert scaled["map_at_r"] == pytest.approx(got["map_at_r"])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        M.raw_input_baseline(torch.rand(30), y)


def test_by_class_memory_does_not_grow_with_the_classes_squared():
    # 100,000 classes (a C x C count table would be 80 GB): only the pairs that meet are kept
    tally = NB._ClassTally(10**5, torch.device("cpu"))
    q, found = torch.tensor([3, 99_999]), torch.tensor([[3, 7, 5], [8, 99_999, 8]])
    scores = {name: torch.ones(2, dtype=torch.float64) for name in tally.SCORES}
    tally.add(q, found, torch.tensor([3, 3]), scores)
    tally.add(q[:1], found[:1], torch.tensor([2]), {k: v[:1] for k, v in scores.items()})
    assert tally.keys.numel() <= 3  # 3 -> 7, 3 -> 5, 99999 -> 8
    rows = tally.rows(list(range(10**5)))
    assert rows[3]["confused_with"] == 7 and rows[3]["confused_share"] == pytest.approx(2 / 5)
    assert rows[99_999]["confused_with"] == 8 and rows[99_999]["confused_share"] == 2 / 3
    assert rows[0]["queries"] == 0 and rows[0]["confused_with"] is None


def test_raw_vectors_are_the_flattened_normalised_inputs_read_in_chunks():
    from deepmetric.evaluate.metrics import raw_vectors

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 28, 28), generator=g, dtype=torch.uint8)
    want = torch.nn.functional.normalize(x.flatten(1).float(), dim=1)
    assert torch.allclose(raw_vectors(x, chunk=7), want, atol=1e-7)
    assert raw_vectors(x).shape == (50, 784)


def test_raw_vectors_of_large_images_are_area_averaged_to_64_pixels_a_side():
    """A 128 x 96 image whose 2 x 2 blocks are flat gives the vector of its 64 x 48 version:
    a 224 x 224 benchmark's baseline holds 64 x 64 x 3 numbers an image, not 224 x 224 x 3."""
    from deepmetric.evaluate.metrics import raw_vectors

    small = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    large = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    want = torch.nn.functional.normalize(small.flatten(1), dim=1)
    assert torch.allclose(raw_vectors(large), want, atol=1e-6)

    class Lazy:  # sliced into tensors, as lazy image files are
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: slice) -> torch.Tensor:
            return large[index]

    assert torch.allclose(raw_vectors(Lazy(), chunk=2), want, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        raw_vectors(torch.zeros(3))

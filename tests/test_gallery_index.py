"""Gallery indexes against brute force: a float64 numpy loop over the live entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepmetric.distances import METRICS
from deepmetric.gallery import index as gi
from deepmetric.gallery.index import (
    ExactIndex,
    FaissIndex,
    IndexFileError,
    identity_lookup,
    load_index,
    make_index,
    top_identities,
)

faiss_only = pytest.mark.skipif(not gi.faiss_available(), reason="faiss is not installed")
EXACT_KINDS = ["exact", pytest.param("flat", marks=faiss_only)]
ALL_KINDS = [*EXACT_KINDS, pytest.param("hnsw", marks=faiss_only)]
TOL = 1e-4


def _index(kind: str, dim: int, metric: str, **kw):
    if kind == "exact":
        return ExactIndex(dim=dim, metric=metric, **kw)
    return FaissIndex(dim=dim, metric=metric, kind=kind, **kw)


def _dist(u: np.ndarray, v: np.ndarray, metric: str) -> float:
    """One distance, written independently (float64 loop over coordinates)."""
    u, v = [float(a) for a in u], [float(b) for b in v]
    if metric == "cosine":
        nu = math.sqrt(sum(a * a for a in u))
        nv = math.sqrt(sum(b * b for b in v))
        if nu == 0 or nv == 0:
            return 1.0
        return 1.0 - sum(a * b for a, b in zip(u, v)) / (nu * nv)
    sq = sum((a - b) ** 2 for a, b in zip(u, v))
    return sq if metric == "squared_euclidean" else math.sqrt(sq)


def _brute(live: dict[int, np.ndarray], q: np.ndarray, metric: str) -> list[dict[int, float]]:
    return [{i: _dist(row, v, metric) for i, v in live.items()} for row in q]


def _check_exact(result, live, q, k, metric):
    """Rows sorted ascending; ids live, distinct; each distance is that id's true distance;
    the distances are the k smallest (ties may pick either id); padding where k > live."""
    ref = _brute(live, q, metric)
    assert result.distances.shape == result.ids.shape == (q.shape[0], k)
    assert result.distances.dtype == np.float32 and result.ids.dtype == np.int64
    kk = min(k, len(live))
    for row in range(q.shape[0]):
        d, ids = result.distances[row], result.ids[row]
        assert (ids[kk:] == -1).all() and np.isinf(d[kk:]).all()
        assert len(set(ids[:kk].tolist())) == kk
        expected = sorted(ref[row].values())[:kk]
        np.testing.assert_allclose(d[:kk], expected, rtol=TOL, atol=TOL)
        for j in range(kk):
            assert ids[j] in live
            assert abs(d[j] - ref[row][int(ids[j])]) <= TOL * (1 + abs(d[j]))


def _data(seed: int, n: int, dim: int, dup: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)  # ties, zeros, duplicates
    if dup and n > 1:
        x[n // 2 :] = x[: n - n // 2]
    return x


# --------------------------------------------------------------------------- brute force


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 25),
    dim=st.integers(1, 6),
    k=st.integers(1, 30),
    metric=st.sampled_from(METRICS),
    dup=st.booleans(),
    n_remove=st.integers(0, 25),
)
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_exact_kinds_match_brute_force(kind, seed, n, dim, k, metric, dup, n_remove):
    rng = np.random.default_rng(seed + 1)
    x = _data(seed, n, dim, dup)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    q = _data(seed + 2, 4, dim, False)
    index = _index(kind, dim, metric, rebuild_fraction=None)
    half = n // 2  # two adds: the incremental path
    index.add(x[:half], ids[:half])
    index.add(x[half:], ids[half:])
    live = dict(zip(ids.tolist(), x))
    _check_exact(index.search(q, k), live, q, k, metric)

    gone = rng.permutation(ids)[: min(n_remove, n)]
    index.remove(gone)
    for i in gone.tolist():
        del live[i]
    assert len(index) == len(live) and index.removed == gone.size
    before = index.search(q, k)
    _check_exact(before, live, q, k, metric)
    assert not np.isin(before.ids, gone).any()

    index.rebuild()
    after = index.search(q, k)
    assert index.removed == 0 and len(index) == len(live)
    np.testing.assert_allclose(after.distances, before.distances, rtol=1e-6, atol=1e-6)
    # the same ids wherever the distance is not tied (a rebuild may round ties differently)
    padded = np.pad(before.distances, ((0, 0), (1, 1)), constant_values=np.nan)
    with np.errstate(invalid="ignore"):  # inf - inf in the padding
        alone = ~(np.abs(np.diff(padded, axis=1)) <= 1e-5)
    untied = alone[:, :-1] & alone[:, 1:]
    np.testing.assert_array_equal(after.ids[untied], before.ids[untied])
    _check_exact(after, live, q, k, metric)

    if gone.size:  # a removed id may come back, with a new vector
        back = gone[:1]
        vec = _data(seed + 3, 1, dim, False)
        index.add(vec, back)
        live[int(back[0])] = vec[0]
        _check_exact(index.search(q, k), live, q, k, metric)


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 30),
    k=st.integers(1, 10),
    metric=st.sampled_from(METRICS),
)
@faiss_only
def test_hnsw_returns_true_distances_of_live_ids(seed, n, k, metric):
    """HNSW is approximate: what it returns must still be real, live, sorted, padded."""
    x = _data(seed, n, 4, False)
    ids = np.arange(n, dtype=np.int64) * 7
    index = _index("hnsw", 4, metric, rebuild_fraction=None)
    index.add(x, ids)
    index.remove(ids[::3])
    live = {int(i): v for i, v in zip(ids, x) if i not in set(ids[::3].tolist())}
    q = _data(seed + 1, 3, 4, False)
    res = index.search(q, k)
    ref = _brute(live, q, metric)
    for row in range(q.shape[0]):
        found = res.ids[row][res.ids[row] >= 0]
        assert len(set(found.tolist())) == found.size <= min(k, len(live))
        assert np.all(np.diff(res.distances[row][: found.size]) >= -TOL)
        assert np.isinf(res.distances[row][found.size :]).all()
        for j, i in enumerate(found.tolist()):
            assert i in live
            assert abs(res.distances[row, j] - ref[row][i]) <= TOL * (1 + ref[row][i])


def _recall_setup(n: int = 3000, dim: int = 32, n_q: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    probes = x[rng.choice(n, n_q, replace=False)] + 0.5 * rng.standard_normal((n_q, dim)) / np.sqrt(
        dim
    )
    strangers = rng.standard_normal((n_q, dim))
    return x, np.vstack([probes, strangers]).astype(np.float32)


@faiss_only
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_hnsw_recall_at_1(metric):
    x, q = _recall_setup()
    ids = np.arange(x.shape[0], dtype=np.int64) + 1000
    exact, hnsw = _index("flat", 32, metric), _index("hnsw", 32, metric, rebuild_fraction=None)
    for index in (exact, hnsw):
        index.add(x, ids)
    truth = exact.search(q, 1).ids[:, 0]
    recall = float(np.mean(hnsw.search(q, 1).ids[:, 0] == truth))
    assert recall >= 0.95, recall
    # with a fifth of the entries removed (tombstones, no rebuild): still good, never removed
    gone = ids[::5]
    exact.remove(gone)
    hnsw.remove(gone)
    found = hnsw.search(q, 5).ids
    assert not np.isin(found, gone).any() and (found >= 0).all()
    recall = float(np.mean(found[:, 0] == exact.search(q, 1).ids[:, 0]))
    assert recall >= 0.95, recall
    hnsw.rebuild()
    assert hnsw.removed == 0 and len(hnsw) == len(exact)
    assert float(np.mean(hnsw.search(q, 1).ids[:, 0] == exact.search(q, 1).ids[:, 0])) >= 0.95


# --------------------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_automatic_rebuild_past_the_fraction(kind):
    x = _data(0, 40, 3, False)
    index = _index(kind, 3, "euclidean", rebuild_fraction=0.25)
    index.add(x, np.arange(40))
    index.remove(np.arange(10))  # 10 / 40: not above a quarter
    assert index.removed == 10 and len(index) == 30
    index.remove([10])  # 11 / 40: rebuilt
    assert index.removed == 0 and len(index) == 29
    assert sorted(index.ids.tolist()) == list(range(11, 40))
    assert not np.isin(index.search(x, 29).ids, np.arange(11)).any()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bad_input_is_refused_and_changes_nothing(kind):
    index = _index(kind, 3, "cosine")
    x = _data(1, 5, 3, False)
    index.add(x, [1, 2, 3, 4, 5])
    bad = x.copy()
    bad[2, 1] = np.nan
    cases = [
        (bad, [6, 7, 8, 9, 10], "NaN"),
        (x[:, :2], [6, 7, 8, 9, 10], "dimension 3"),
        (x[0], [6], "2-D"),
        (x.astype(np.int64), [6, 7, 8, 9, 10], "floating"),
        (x, [6, 7, 8, 9, 9], "duplicates"),
        (x, [6, 7, 8, 9, -1], ">= 0"),
        (x, [6, 7, 8, 9], "4 ids for 5"),
        (x, [5, 6, 7, 8, 9], "already in the index: \\[5\\]"),
        (np.full((5, 3), 1e39), [6, 7, 8, 9, 10], "inf"),
    ]
    for emb, ids, message in cases:
        with pytest.raises(ValueError, match=message):
            index.add(emb, ids)
    with pytest.raises(KeyError, match="not in the index: \\[99\\]"):
        index.remove([1, 99])
    assert len(index) == 5 and index.removed == 0
    with pytest.raises(ValueError, match="k must be"):
        index.search(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad, 1)
    res = index.search(np.zeros((0, 3), np.float32), 2)
    assert res.ids.shape == (0, 2)


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown metric"):
        ExactIndex(dim=3, metric="manhattan")
    with pytest.raises(ValueError, match="dim"):
        ExactIndex(dim=0)
    with pytest.raises(ValueError, match="rebuild_fraction"):
        ExactIndex(dim=3, rebuild_fraction=0.0)
    with pytest.raises(TypeError):
        ExactIndex(3)  # keyword-only
    if gi.faiss_available():
        with pytest.raises(ValueError, match="kind"):
            FaissIndex(dim=3, kind="ivf")
        with pytest.raises(ValueError, match="ef_search"):
            FaissIndex(dim=3, kind="hnsw", ef_search=0)


def test_exact_index_grows_by_doubling():
    index = ExactIndex(dim=4)
    rng = np.random.default_rng(0)
    buffers = set()
    for i in range(3000):
        index.add(rng.standard_normal((1, 4)).astype(np.float32), [i])
        buffers.add(index._vectors.data_ptr())
    assert len(index) == 3000
    assert len(buffers) <= 6  # 256, 512, ..., 4096: not one copy per add
    assert index._vectors.shape[0] < 2 * 3000


def test_empty_index_pads_everything():
    index = ExactIndex(dim=2)
    res = index.search(np.ones((3, 2), np.float32), 4)
    assert (res.ids == -1).all() and np.isinf(res.distances).all()


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_save_load_round_trip(kind, metric, tmp_path):
    x = _data(3, 60, 5, False) + 0.1
    index = _index(kind, 5, metric, rebuild_fraction=None)
    index.add(x, np.arange(60) * 3)
    index.remove([0, 3, 9])
    index.generation = 17
    q = _data(4, 7, 5, False)
    before = index.search(q, 6)
    index.save(tmp_path / "ix")
    index.save(tmp_path / "ix")  # replacing a saved index is fine
    loaded = load_index(tmp_path / "ix")
    assert type(loaded) is type(index) and loaded.kind == index.kind
    assert (loaded.dim, loaded.metric, loaded.generation) == (5, metric, 17)
    assert len(loaded) == 57 and loaded.removed == 3
    after = loaded.search(q, 6)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.distances, before.distances)
    assert type(type(index).load(tmp_path / "ix")) is type(index)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_save_and_load_refuse_what_is_not_an_index(tmp_path):
    index = ExactIndex(dim=2)
    index.add(np.ones((2, 2), np.float32), [1, 2])
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a saved index"):
        index.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.png").exists()
    with pytest.raises(IndexFileError, match="no saved index"):
        load_index(tmp_path / "nothing")
    index.save(tmp_path / "ix")
    np.save(tmp_path / "ix" / "ids.npy", np.arange(3))
    with pytest.raises(IndexFileError, match=r"ids\.npy holds"):
        load_index(tmp_path / "ix")
    (tmp_path / "ix" / "header.json").write_text('{"format": "something else"}')
    with pytest.raises(IndexFileError, match="not a saved deepmetric index"):
        load_index(tmp_path / "ix")
    if gi.faiss_available():
        index.save(tmp_path / "ix2")
        with pytest.raises(IndexFileError, match="not a FaissIndex"):
            FaissIndex.load(tmp_path / "ix2")


def test_make_index_picks_by_size():
    assert type(make_index(dim=8, metric="cosine", size_hint=0)) is ExactIndex
    assert type(make_index(dim=8, metric="cosine", size_hint=gi.EXACT_MAX)) is ExactIndex
    if gi.faiss_available():
        flat = make_index(dim=8, metric="cosine", size_hint=gi.EXACT_MAX + 1)
        hnsw = make_index(dim=8, metric="euclidean", size_hint=gi.FLAT_MAX + 1)
        assert (flat.kind, flat.metric) == ("flat", "cosine")
        assert (hnsw.kind, hnsw.metric) == ("hnsw", "euclidean")
        # the search list grows with the gallery (recall falls as the graph grows)
        sizes = [gi.FLAT_MAX + 1, 200_000, 200_001, 500_000, 500_001, 10_000_000]
        efs = [make_index(dim=8, metric="cosine", size_hint=n).ef_search for n in sizes]
        assert efs == [gi.HNSW_EF_SEARCH, gi.HNSW_EF_SEARCH, 128, 128, 192, 192]
    with pytest.raises(ValueError, match="size_hint"):
        make_index(dim=8, metric="cosine", size_hint=-1)


# --------------------------------------------------------------------------- identities


def _brute_identities(x, owners, q, k, metric):
    out = []
    for row in q:
        best: dict[str, float] = {}
        for v, who in zip(x, owners):
            d = _dist(row, v, metric)
            best[who] = min(best.get(who, math.inf), d)
        out.append(sorted(best.items(), key=lambda t: t[1])[:k])
    return out


def _check_identities(matches, expected, k, ids, x, owners, q, metric):
    for row, exp in enumerate(expected):
        got = matches.identities[row]
        assert len(got) == len(exp) and len(set(got)) == len(got)
        np.testing.assert_allclose(
            matches.distances[row, : len(exp)], [d for _, d in exp], rtol=TOL, atol=TOL
        )
        assert np.isinf(matches.distances[row, len(exp) :]).all()
        assert (matches.example_ids[row, len(exp) :] == -1).all()
        for j, who in enumerate(got):
            example = int(matches.example_ids[row, j])
            pos = int(np.flatnonzero(ids == example)[0])
            assert owners[pos] == who  # the example belongs to the identity ...
            d = _dist(q[row], x[pos], metric)  # ... and is its nearest one
            assert abs(d - dict(exp)[who]) <= TOL * (1 + d)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_top_identities_when_one_identity_crowds_the_hits(kind):
    rng = np.random.default_rng(0)
    dim = 8
    q = rng.standard_normal((2, dim)).astype(np.float32)
    crowd = q[0] + 0.01 * rng.standard_normal((60, dim)).astype(np.float32)  # 60 nearest
    others = rng.standard_normal((20, dim)).astype(np.float32) * 3
    x = np.vstack([crowd, others])
    owners = ["crowd"] * 60 + [f"p{i // 2}" for i in range(20)]  # 10 identities of 2
    ids = np.arange(x.shape[0], dtype=np.int64) * 10 + 5
    index = _index(kind, dim, "euclidean")
    index.add(x, ids)
    lookup = identity_lookup(ids, owners)
    for k in (1, 3, 11, 20):  # 11 identities exist: 20 exhausts the index
        matches = top_identities(index, q, k, lookup, fetch=4)
        expected = _brute_identities(x, owners, q, k, "euclidean")
        assert matches.identities[0][0] == "crowd"
        _check_identities(matches, expected, k, ids, x, owners, q, "euclidean")
    assert len(top_identities(index, q, 20, lookup).identities[0]) == 11


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 30),
    n_people=st.integers(1, 6),
    k=st.integers(1, 8),
    fetch=st.one_of(st.none(), st.integers(1, 5)),
    metric=st.sampled_from(["euclidean", "cosine"]),
)
def test_top_identities_match_brute_force(seed, n, n_people, k, fetch, metric):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    owners = [f"id{int(i)}" for i in rng.integers(0, n_people, size=n)]
    ids = np.arange(n, dtype=np.int64)
    q = rng.standard_normal((3, 3)).astype(np.float32)
    index = ExactIndex(dim=3, metric=metric)
    index.add(x, ids)
    matches = top_identities(index, q, k, identity_lookup(ids, owners), fetch=fetch)
    expected = _brute_identities(x, owners, q, k, metric)
    _check_identities(matches, expected, k, ids, x, owners, q, metric)


def test_identity_lookup_names_an_unknown_id():
    lookup = identity_lookup([1, 2], ["a", "b"])
    assert lookup(np.array([2, 1, 2])) == ["b", "a", "b"]
    with pytest.raises(KeyError, match="example id 7"):
        lookup(np.array([7]))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
def test_a_stored_vector_is_at_distance_0_from_itself_at_any_norm(kind, metric):
    """The search's |q|^2 + |x|^2 - 2 q.x cancels near 0 (norm 300: a float32 ulp of |x|^2 is
    8e-3); the hits' distances are recomputed from q - x, so an enrolled vector found again is
    at 0, and near neighbours are in the order of their true distances."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x *= 300 / np.linalg.norm(x, axis=1, keepdims=True)
    index = _index(kind, 16, metric)
    index.add(x, np.arange(50))
    found = index.search(x[:10], 3)
    assert (found.distances[:, 0] == 0).all() and (found.ids[:, 0] == np.arange(10)).all()
    for q, (d, ids) in enumerate(zip(found.distances, found.ids)):
        want = [_dist(x[q], x[i], metric) for i in ids]
        np.testing.assert_allclose(d, want, rtol=1e-5)
        assert list(d) == sorted(d)

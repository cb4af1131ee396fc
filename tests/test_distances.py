import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric.distances import METRICS, paired, paired_at, pairwise


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    d=st.integers(1, 5),
    metric=st.sampled_from(METRICS),
    with_ref=st.booleans(),
)
def test_pairwise_matches_loops(seed, n, m, d, metric, with_ref):
    x = _rand(seed, n, d)
    y = _rand(seed + 1, m, d) if with_ref else None
    expected = torch.stack([torch.stack(row) for row in reference.matrix(x, y, metric)])
    torch.testing.assert_close(pairwise(x, y, metric), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
def test_paired_is_the_diagonal_of_pairwise(metric):
    x, y = _rand(0, 7, 4), _rand(1, 7, 4)
    torch.testing.assert_close(paired(x, y, metric), pairwise(x, y, metric).diagonal())


def test_euclidean_gradient_is_finite_where_embeddings_coincide():
    x = _rand(0, 5, 3)
    x[3] = x[1]  # two identical embeddings, besides the diagonal
    x.requires_grad_(True)
    for y in (None, x.detach().clone()):
        d = pairwise(x, y)
        assert d[1, 3] == 0 and d.diagonal().abs().max() < 1e-7
        (grad,) = torch.autograd.grad(d.sum(), x)
        assert torch.isfinite(grad).all()
    (grad,) = torch.autograd.grad(paired(x, x.detach().clone()).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0


@pytest.mark.parametrize("metric", METRICS)
def test_pairwise_gradcheck(metric):
    x = _rand(3, 6, 3).requires_grad_(True)
    y = _rand(4, 4, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise(a, b, metric), (x, y))
    assert torch.autograd.gradcheck(lambda a: pairwise(a, metric=metric), (x,))


def test_cosine_of_a_zero_vector_is_one():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert pairwise(x, metric="cosine")[0, 1] == 1.0


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(3), "2-D"),
        (torch.zeros(2, 3, dtype=torch.long), "floating-point"),
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), "inf"),
    ],
)
def test_bad_input_is_named(x, message):
    with pytest.raises(ValueError, match=message):
        pairwise(x)


def test_bad_metric_and_shapes():
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        pairwise(torch.zeros(2, 2), metric="manhattan")
    with pytest.raises(ValueError, match="same dimension"):
        pairwise(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same shape"):
        paired(torch.zeros(2, 2), torch.zeros(3, 2))


@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 6),
    k=st.integers(0, 9),
    d=st.integers(1, 5),
    chunk=st.integers(1, 12),
    metric=st.sampled_from(METRICS),
)
def test_paired_at_matches_loops_and_paired_in_any_chunks(seed, n, k, d, chunk, metric):
    x = _rand(seed, n, d)
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(n, (k,), generator=g), torch.randint(n, (k,), generator=g)
    got = paired_at(x, i, j, metric, chunk=chunk)
    expected = [reference.dist(x[a], x[b], metric) for a, b in zip(i.tolist(), j.tolist())]
    assert got.shape == (k,) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64).reshape(k))
    if k:  # the same numbers as gathering first, bit for bit
        assert torch.equal(got, paired(x[i], x[j], metric))


def test_paired_at_float32_gradient_and_bad_input():
    x = _rand(0, 5, 3).float().requires_grad_(True)
    i, j = torch.tensor([0, 1, 4, 2]), torch.tensor([3, 1, 0, 2])
    d = paired_at(x, i, j, chunk=3)  # one pair per chunk
    assert d.dtype == torch.float32
    (got,) = torch.autograd.grad(d.sum(), x)
    (want,) = torch.autograd.grad(paired(x[i], x[j]).sum(), x)
    assert torch.equal(got, want) and torch.isfinite(got).all()  # (1, 1) and (2, 2): d = 0
    with pytest.raises(ValueError, match="one shape"):
        paired_at(x, i, j[:2])
    with pytest.raises(ValueError, match="NaN"):
        paired_at(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown metric"):
        paired_at(x, i, j, "manhattan")
    with pytest.raises(ValueError, match="chunk"):
        paired_at(x, i, j, chunk=0)

import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st

from deepmetric.distances import METRICS
from deepmetric.losses import (
    MINING,
    ContrastiveLoss,
    LiftedStructuredLoss,
    TripletLoss,
    triplet_margin_loss,
)

REFERENCE = {
    "batch_all": reference.batch_all,
    "batch_hard": reference.batch_hard,
    "semi_hard": reference.semi_hard,
}


def _batch(seed: int, b: int, classes: int, d: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (b,), generator=g)


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:  # the reference returns a constant when nothing is active
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _assert_same_value_and_gradient(ours, ref, inputs):
    """Values to 1e-9 and gradients to 1e-8 in float64 (the issue asks for 1e-5)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    a, b = ours(*inputs), ref(*inputs)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-7, atol=1e-9)
    for ga, gb in zip(_grads(a, inputs), _grads(b, inputs)):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 9),
    classes=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.2, 1.0, 3.0]),
    mining=st.sampled_from(MINING),
    metric=st.sampled_from(METRICS),
    soft=st.booleans(),
    method=st.sampled_from(["sort", "direct"]),
)
def test_triplet_loss_matches_brute_force(seed, b, classes, margin, mining, metric, soft, method):
    x, labels = _batch(seed, b, classes)
    loss = TripletLoss(margin=margin, mining=mining, metric=metric, soft=soft, method=method)
    _assert_same_value_and_gradient(
        lambda e: loss(e, labels),
        lambda e: REFERENCE[mining](e, labels, margin, metric, soft),
        [x],
    )


@given(
    seed=st.integers(0, 2**31),
    classes=st.integers(1, 4),
    mining=st.sampled_from(MINING),
    soft=st.booleans(),
)
def test_triplet_loss_with_a_reference_set_matches_brute_force(seed, classes, mining, soft):
    x, labels = _batch(seed, 5, classes)
    ref_x, ref_labels = _batch(seed + 1, 7, classes)
    loss = TripletLoss(margin=0.5, mining=mining, soft=soft)
    _assert_same_value_and_gradient(
        lambda e, r: loss(e, labels, r, ref_labels),
        lambda e, r: REFERENCE[mining](e, labels, 0.5, "euclidean", soft, r, ref_labels),
        [x, ref_x],
    )


@pytest.mark.parametrize("mining", MINING)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_loss_gradcheck(mining, soft):
    x, labels = _batch(11, 9, 3)
    loss = TripletLoss(margin=1.0, mining=mining, soft=soft)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x.requires_grad_(True),))


@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 9),
    classes=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.5, 2.0]),
    metric=st.sampled_from(METRICS),
)
def test_contrastive_and_lifted_match_brute_force(seed, b, classes, margin, metric):
    x, labels = _batch(seed, b, classes)
    contrastive = ContrastiveLoss(margin=margin, metric=metric)
    _assert_same_value_and_gradient(
        lambda e: contrastive(e, labels),
        lambda e: reference.contrastive_batch(e, labels, margin, metric),
        [x],
    )
    lifted = LiftedStructuredLoss(margin=margin, metric=metric)
    _assert_same_value_and_gradient(
        lambda e: lifted(e, labels),
        lambda e: reference.lifted(e, labels, margin, metric),
        [x],
    )


@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), metric=st.sampled_from(METRICS))
def test_explicit_pairs_and_triplets_match_brute_force(seed, n, metric):
    (a, p, q), g = (_batch(seed + i, n, 2)[0] for i in range(3)), torch.Generator()
    same = torch.randint(0, 2, (n,), generator=g.manual_seed(seed))
    _assert_same_value_and_gradient(
        lambda x1, x2: ContrastiveLoss(margin=1.5, metric=metric)(x1, x2, same),
        lambda x1, x2: reference.contrastive_pairs(x1, x2, same, 1.5, metric),
        [a, p],
    )
    for soft in (False, True):
        _assert_same_value_and_gradient(
            lambda x1, x2, x3, soft=soft: triplet_margin_loss(
                x1, x2, x3, margin=0.3, metric=metric, soft=soft
            ),
            lambda x1, x2, x3, soft=soft: reference.triplet_margin(x1, x2, x3, 0.3, metric, soft),
            [a, p, q],
        )


def test_contrastive_and_lifted_gradcheck():
    x, labels = _batch(5, 8, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: ContrastiveLoss(margin=2.0)(e, labels), (x,))
    assert torch.autograd.gradcheck(lambda e: LiftedStructuredLoss()(e, labels), (x,))
    y = _batch(6, 8, 3)[0].requires_grad_(True)
    same = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda u, v: ContrastiveLoss()(u, v, same), (x, y))


ALL_LOSSES = [TripletLoss(mining=m, soft=s) for m in MINING for s in (False, True)] + [
    ContrastiveLoss(),
    LiftedStructuredLoss(),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize(
    ("case", "x", "labels"),
    [
        ("no positive pair", torch.randn(5, 4), torch.arange(5)),
        ("single class", torch.randn(5, 4), torch.zeros(5, dtype=torch.long)),
        ("K = 1", torch.randn(3, 4), torch.tensor([7, 3, 5])),
        ("identical embeddings", torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])),
        ("B = 1", torch.randn(1, 4), torch.tensor([0])),
    ],
)
def test_corner_cases_give_numbers_not_nan(loss, case, x, labels):
    x = x.clone().requires_grad_(True)
    value = loss(x, labels)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value), case
    assert torch.isfinite(x.grad).all(), case
    has_pos = bool((labels[:, None] == labels[None, :]).sum() > len(labels))
    has_neg = bool((labels[:, None] != labels[None, :]).any())
    if isinstance(loss, TripletLoss) and not (has_pos and has_neg):
        assert value == 0 and x.grad.abs().max() == 0, case


def test_identical_embeddings_give_the_margin():
    x = torch.ones(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for mining in MINING:
        assert TripletLoss(margin=0.3, mining=mining)(x, labels).item() == pytest.approx(0.3)
    assert ContrastiveLoss(margin=2.0)(x, labels).item() == pytest.approx(0.5 * 4 * 12 / 15)


def test_float32_batch_all_agrees_with_float64_on_a_large_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1024, 32, generator=g, dtype=torch.float64))
    labels = torch.arange(256).repeat_interleave(4)
    for method in ("sort", "direct"):
        loss = TripletLoss(margin=0.2, method=method)
        exact = loss(x, labels)
        approx = loss(x.float(), labels)
        assert abs(approx.item() - exact.item()) < 1e-5 * exact.item()


@pytest.mark.parametrize("mining", MINING)
def test_a_batch_of_4096_runs_without_a_cubic_tensor(mining):
    # A dense B^3 float32 tensor would need 256 GiB here; O(B^2) work takes a few seconds.
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(4096, 64, generator=g)).requires_grad_(True)
    labels = torch.arange(1024).repeat_interleave(4)
    loss = TripletLoss(margin=0.2, mining=mining)(x, labels)
    loss.backward()
    assert loss > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TripletLoss()(torch.randn(4), torch.arange(4)), "2-D"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.arange(3)), "labels has length 3"),
        (lambda: TripletLoss()(torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long)), "1-D"),
        (lambda: TripletLoss()(torch.full((2, 2), float("nan")), torch.arange(2)), "NaN"),
        (lambda: TripletLoss()(torch.full((2, 2), float("inf")), torch.arange(2)), "inf"),
        (lambda: TripletLoss()(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), "empty"),
        (lambda: TripletLoss(mining="hardest"), "unknown mining 'hardest'"),
        (lambda: TripletLoss(metric="l1"), "unknown metric 'l1'"),
        (lambda: TripletLoss(margin=-0.1), "margin"),
        (lambda: TripletLoss()(torch.randn(2, 2), torch.arange(2), torch.randn(2, 2)), "together"),
        (
            lambda: TripletLoss()(
                torch.randn(2, 2), torch.arange(2), torch.randn(3, 5), torch.arange(3)
            ),
            "dimension",
        ),
        (
            lambda: ContrastiveLoss()(
                torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 2, 1])
            ),
            "0 and 1",
        ),
        (
            lambda: ContrastiveLoss()(torch.randn(3, 2), torch.randn(3, 2), torch.ones(2)),
            "same must be",
        ),
        (
            lambda: LiftedStructuredLoss()(torch.randn(3, 2), torch.tensor([0.5, 1.0, 0.5])),
            "integer",
        ),
        (
            lambda: triplet_margin_loss(torch.randn(3, 2), torch.randn(3, 2), torch.randn(2, 2)),
            "same shape",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()

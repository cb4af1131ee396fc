"""MultiSimilarityLoss, ProxyAnchorLoss, MarginSoftmaxLoss (ArcFace / CosFace) and NTXentLoss:
values and gradients against the plain-loop references of tests/reference.py, properties, corner
cases, errors, bfloat16 autocast, and the learnable proxies."""

import math

import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import deepmetric.losses
from deepmetric.losses import (
    MarginSoftmaxLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    ProxyAnchorLoss,
)

FEW = settings(max_examples=15)  # the references are Python loops; 2 slow cores


def _x(seed: int, b: int, d: int = 3) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(seed: int, b: int, values) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    values = torch.as_tensor(list(values))
    return values[torch.randint(0, len(values), (b,), generator=g)]


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]


def _assert_same_value_and_gradient(ours, ref, inputs):
    """Values to 1e-9 and gradients to 1e-8, in float64."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    a, b = ours(*inputs), ref(*inputs)
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-7, atol=1e-9)
    for ga, gb in zip(_grads(a, inputs), _grads(b, inputs)):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


def _with(module: torch.nn.Module, name: str):
    """Call ``module(e, labels)`` with its parameter ``name`` replaced by an input tensor."""
    return lambda e, p, labels: functional_call(module, {name: p}, (e, labels))


# ----------------------------------------------------------------------------- brute force


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 8),
    classes=st.integers(1, 4),
    alpha=st.sampled_from([0.5, 2.0]),
    beta=st.sampled_from([5.0, 50.0]),
    base=st.sampled_from([0.0, 0.5, 1.0]),
    epsilon=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
)
def test_multi_similarity_matches_brute_force(seed, b, classes, alpha, beta, base, epsilon):
    x, labels = _x(seed, b), _labels(seed, b, range(classes))
    loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, epsilon=epsilon)
    _assert_same_value_and_gradient(
        lambda e: loss(e, labels),
        lambda e: reference.multi_similarity(e, labels, alpha, beta, base, epsilon),
        [x],
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 5),
    r=st.integers(1, 7),
    classes=st.integers(1, 4),
    epsilon=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_multi_similarity_with_a_reference_set_matches_brute_force(seed, b, r, classes, epsilon):
    x, labels = _x(seed, b), _labels(seed, b, range(classes))
    ref_x, ref_labels = _x(seed + 1, r), _labels(seed + 1, r, range(classes))
    loss = MultiSimilarityLoss(epsilon=epsilon)
    _assert_same_value_and_gradient(
        lambda e, f: loss(e, labels, f, ref_labels),
        lambda e, f: reference.multi_similarity(e, labels, 2.0, 50.0, 0.5, epsilon, f, ref_labels),
        [x, ref_x],
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 8),
    alpha=st.sampled_from([1.0, 8.0, 32.0]),
    delta=st.sampled_from([0.0, 0.1, 0.5]),
    unknown=st.booleans(),
)
def test_proxy_anchor_matches_brute_force(seed, b, alpha, delta, unknown):
    classes = [0, 3, 5, 1]  # not 0..C-1, not sorted
    labels = _labels(seed, b, classes + ([9, -2] if unknown else []))
    x, proxies = _x(seed, b), _x(seed + 1, len(classes))
    loss = ProxyAnchorLoss(classes=classes, dim=3, alpha=alpha, delta=delta, ignore_unknown=True)
    _assert_same_value_and_gradient(
        lambda e, p: _with(loss, "proxies")(e, p, labels),
        lambda e, p: reference.proxy_anchor(e, labels, p, classes, alpha, delta),
        [x, proxies],
    )


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 8),
    kind=st.sampled_from(["arcface", "cosface"]),
    scale=st.sampled_from([1.0, 16.0, 64.0]),
    margin=st.sampled_from([0.0, 0.35, 0.5, 2.0]),  # 2.0: arcface's theta + m > pi branch
    unknown=st.booleans(),
)
def test_margin_softmax_matches_brute_force(seed, b, kind, scale, margin, unknown):
    classes = [4, 2, 7]
    labels = _labels(seed, b, classes + ([0] if unknown else []))
    x, weight = _x(seed, b), _x(seed + 1, len(classes))
    loss = MarginSoftmaxLoss(
        classes=classes, dim=3, kind=kind, scale=scale, margin=margin, ignore_unknown=True
    )
    _assert_same_value_and_gradient(
        lambda e, w: _with(loss, "weight")(e, w, labels),
        lambda e, w: reference.margin_softmax(e, labels, w, classes, kind, scale, margin),
        [x, weight],
    )


def test_arcface_fallback_branch_is_exercised():
    """For the test above to cover theta + m > pi with margin 2: such targets exist."""
    x, w = _x(0, 8), _x(1, 3)
    cos = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).T
    assert (torch.acos(cos) + 2.0 > math.pi).any() and (torch.acos(cos) + 2.0 < math.pi).any()


@FEW
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 6),
    temperature=st.sampled_from([0.1, 0.5, 1.0]),
    classes=st.sampled_from([None, 1, 2, 3]),
)
def test_ntxent_matches_brute_force(seed, b, temperature, classes):
    z1, z2 = _x(seed, b), _x(seed + 1, b)
    labels = None if classes is None else _labels(seed, b, range(classes))
    loss = NTXentLoss(temperature=temperature)
    _assert_same_value_and_gradient(
        lambda u, v: loss(u, v, labels),
        lambda u, v: reference.ntxent(u, v, temperature, labels),
        [z1, z2],
    )


def test_gradcheck():
    x, labels = _x(3, 8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: MultiSimilarityLoss(beta=10.0)(e, labels), (x,))
    assert torch.autograd.gradcheck(
        lambda e, f: NTXentLoss()(e, f), (x, _x(4, 8, 4).requires_grad_(True))
    )
    torch.manual_seed(0)
    for module, name in [
        (ProxyAnchorLoss(classes=range(4), dim=4, alpha=4.0), "proxies"),
        (MarginSoftmaxLoss(classes=range(4), dim=4), "weight"),
        (MarginSoftmaxLoss(classes=range(4), dim=4, kind="cosface"), "weight"),
    ]:
        p = getattr(module, name).detach().double().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda e, q, m=module, n=name: _with(m, n)(e, q, labels), (x, p)
        )


# ----------------------------------------------------------------------------- properties


def _labelled_losses():
    torch.manual_seed(0)
    return {
        "multi_similarity": MultiSimilarityLoss(),
        "proxy_anchor": ProxyAnchorLoss(classes=range(4), dim=5).double(),
        "arcface": MarginSoftmaxLoss(classes=range(4), dim=5).double(),
        "cosface": MarginSoftmaxLoss(classes=range(4), dim=5, kind="cosface").double(),
    }


LABELLED = _labelled_losses()


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 10),
    classes=st.integers(1, 4),
    name=st.sampled_from(sorted(LABELLED)),
)
def test_labelled_losses_are_finite_nonnegative_and_permutation_invariant(seed, b, classes, name):
    loss = LABELLED[name]
    x, labels = _x(seed, b, 5), _labels(seed, b, range(classes))
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    value = loss(x, labels)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and value >= 0 and torch.isfinite(grad).all()
    permuted = loss(x[perm], labels[perm])
    torch.testing.assert_close(permuted, value, rtol=1e-10, atol=1e-12)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 6), r=st.integers(1, 8))
def test_multi_similarity_with_refs_is_permutation_invariant(seed, b, r):
    x, labels = _x(seed, b, 5), _labels(seed, b, range(3))
    ref_x, ref_labels = _x(seed + 1, r, 5), _labels(seed + 1, r, range(3))
    loss = MultiSimilarityLoss()
    value = loss(x, labels, ref_x, ref_labels)
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randperm(b, generator=g), torch.randperm(r, generator=g)
    assert torch.isfinite(value) and value >= 0
    torch.testing.assert_close(
        loss(x[p], labels[p], ref_x[q], ref_labels[q]), value, rtol=1e-10, atol=1e-12
    )


@settings(max_examples=20)
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 10),
    classes=st.sampled_from([None, 1, 3]),
    temperature=st.sampled_from([0.05, 0.1, 1.0]),
)
def test_ntxent_is_finite_nonnegative_symmetric_and_permutation_invariant(
    seed, b, classes, temperature
):
    z1, z2 = _x(seed, b, 5), _x(seed + 1, b, 5)
    labels = None if classes is None else _labels(seed, b, range(classes))
    loss = NTXentLoss(temperature=temperature)
    value = loss(z1, z2, labels)
    assert torch.isfinite(value) and value >= 0
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    permuted_labels = None if labels is None else labels[perm]
    torch.testing.assert_close(loss(z2, z1, labels), value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        loss(z1[perm], z2[perm], permuted_labels), value, rtol=1e-10, atol=1e-12
    )


def test_ntxent_with_distinct_labels_is_the_self_supervised_loss():
    z1, z2 = _x(0, 6), _x(1, 6)
    loss = NTXentLoss()
    torch.testing.assert_close(loss(z1, z2, torch.arange(6) * 3), loss(z1, z2))


def test_margin_softmax_with_no_margin_is_the_normalised_softmax():
    torch.manual_seed(0)
    x, labels = _x(0, 7, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    arc = MarginSoftmaxLoss(classes=range(4), dim=5, margin=0.0, scale=10.0).double()
    cos_ = MarginSoftmaxLoss(classes=range(4), dim=5, kind="cosface", margin=0.0, scale=10.0)
    cos_ = cos_.double()
    with torch.no_grad():
        cos_.weight.copy_(arc.weight)
    w = torch.nn.functional.normalize(arc.weight.detach())
    logits = 10.0 * torch.nn.functional.normalize(x) @ w.T
    expected = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(arc(x, labels), expected)
    torch.testing.assert_close(cos_(x, labels), expected)


def test_margins_make_the_loss_larger():
    torch.manual_seed(0)
    x, labels = _x(0, 7, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    for kind in ("arcface", "cosface"):
        values = []
        for margin in (0.0, 0.2, 0.4):
            torch.manual_seed(1)
            values.append(
                MarginSoftmaxLoss(classes=range(4), dim=5, kind=kind, margin=margin)
                .double()(x, labels)
                .item()
            )
        assert values[0] < values[1] < values[2], kind


def test_multi_similarity_averages_over_all_anchors():
    """Two anchors have pairs, two (a class of one) have none: the sum is divided by 4."""
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    loss = MultiSimilarityLoss(epsilon=1.0)
    expected = reference.multi_similarity(x, labels, 2.0, 50.0, 0.5, 1.0)
    torch.testing.assert_close(loss(x, labels), expected)
    both = loss(x[:2], labels[:2])  # the same class only: nothing is mined
    assert both.item() == 0.0


def test_multi_similarity_runs_on_a_large_batch_in_quadratic_memory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g).requires_grad_(True)
    labels = torch.arange(512).repeat_interleave(4)
    value = MultiSimilarityLoss()(x, labels)
    value.backward()
    assert value > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- corner cases


def _proxy_anchor(ignore=False):
    return ProxyAnchorLoss(classes=[0, 1, 2], dim=4, ignore_unknown=ignore)


def _arcface(ignore=False):
    return MarginSoftmaxLoss(classes=[0, 1, 2], dim=4, ignore_unknown=ignore)


def _cosface(ignore=False):
    return MarginSoftmaxLoss(classes=[0, 1, 2], dim=4, kind="cosface", ignore_unknown=ignore)


@pytest.mark.parametrize(
    ("case", "x", "labels"),
    [
        ("no positive pair", torch.randn(5, 4), torch.arange(5)),
        ("single class", torch.randn(5, 4), torch.zeros(5, dtype=torch.long)),
        ("B = 1", torch.randn(1, 4), torch.tensor([0])),
        ("identical, one pair each", torch.ones(4, 4), torch.tensor([0, 0, 1, 1])),
    ],
)
def test_multi_similarity_corner_cases(case, x, labels):
    x = x.clone().requires_grad_(True)
    value = MultiSimilarityLoss()(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all(), case
    if case != "identical, one pair each":
        assert value.item() == 0 and x.grad.abs().max() == 0, case
    else:  # every S = 1, all pairs kept: (1/2) log(1 + e^-1) + (1/50) log(1 + 2 e^25) per anchor
        expected = 0.5 * math.log1p(math.exp(-1.0)) + math.log1p(2 * math.exp(25.0)) / 50
        assert value.item() == pytest.approx(expected, rel=1e-5), case


def test_multi_similarity_with_an_empty_or_useless_reference_set_is_zero():
    x = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    loss = MultiSimilarityLoss()
    for ref_x, ref_labels in [
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        (torch.randn(4, 4), torch.tensor([5, 6, 7, 8])),  # no positive for any anchor
        (torch.randn(2, 4), torch.tensor([0, 0])),
    ]:
        value = loss(x, labels, ref_x, ref_labels)
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("make", [_proxy_anchor, _arcface, _cosface], ids=lambda f: f.__name__)
def test_proxy_losses_corner_cases(make):
    torch.manual_seed(0)
    loss = make(ignore=True)
    params = list(loss.parameters())
    for case, x, labels in [
        ("B = 1", torch.randn(1, 4), torch.tensor([2])),
        ("single class", torch.randn(5, 4), torch.zeros(5, dtype=torch.long)),
        ("identical embeddings", torch.ones(4, 4), torch.tensor([0, 0, 1, 2])),
        ("zero embeddings", torch.zeros(3, 4), torch.tensor([0, 1, 2])),
        ("some unknown", torch.randn(4, 4), torch.tensor([0, 9, 1, -1])),
    ]:
        x = x.clone().requires_grad_(True)
        value = loss(x, labels)
        grads = torch.autograd.grad(value, [x, *params])
        assert torch.isfinite(value) and value > 0, case
        assert all(torch.isfinite(g).all() for g in grads), case
    x = torch.randn(3, 4, requires_grad=True)
    value = loss(x, torch.tensor([7, 8, 9]))  # all unknown, left out: 0
    grads = torch.autograd.grad(value, [x, *params])
    assert value.item() == 0 and all(g.abs().max() == 0 for g in grads)


@pytest.mark.parametrize(
    ("case", "b", "labels"),
    [("B = 1", 1, None), ("B = 1 labelled", 1, [4]), ("single class", 5, [2] * 5)],
)
def test_ntxent_without_negatives_is_zero(case, b, labels):
    z1, z2 = torch.randn(b, 4, requires_grad=True), torch.randn(b, 4, requires_grad=True)
    value = NTXentLoss()(z1, z2, None if labels is None else torch.tensor(labels))
    g1, g2 = torch.autograd.grad(value, [z1, z2])
    assert value.item() == 0 and g1.abs().max() == 0 and g2.abs().max() == 0, case


def test_ntxent_identical_embeddings_give_log_2b_minus_1():
    z = torch.ones(5, 4, requires_grad=True)
    value = NTXentLoss()(z, z)
    value.backward()
    assert value.item() == pytest.approx(math.log(9)) and torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- errors


def _x2(b=3, d=4):
    return torch.randn(b, d)


NAN = torch.full((3, 4), float("nan"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: MultiSimilarityLoss()(torch.randn(4), torch.arange(4)), "2-D"),
        (lambda: MultiSimilarityLoss()(_x2(), torch.arange(4)), "labels has length 4"),
        (lambda: MultiSimilarityLoss()(NAN, torch.arange(3)), "NaN"),
        (lambda: MultiSimilarityLoss()(_x2(), torch.arange(3), _x2()), "together"),
        (
            lambda: MultiSimilarityLoss()(_x2(), torch.arange(3), _x2(2, 5), torch.arange(2)),
            "dimension",
        ),
        (lambda: MultiSimilarityLoss(alpha=0), "alpha must be a finite number > 0"),
        (lambda: MultiSimilarityLoss(beta=-1), "beta must be"),
        (lambda: MultiSimilarityLoss(base=float("nan")), "base must be a finite number"),
        (lambda: MultiSimilarityLoss(epsilon=-0.1), "epsilon must be a finite number >= 0"),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=4)(_x2(), torch.tensor([0, 7, 9])), "7, 9"),
        (
            lambda: ProxyAnchorLoss(classes=[0, 1], dim=4)(_x2(), torch.tensor([0, 7, 1])),
            "ignore_unknown=True",
        ),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=5)(_x2(), torch.arange(3)), "dim=5"),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=4)(NAN, torch.arange(3)), "NaN"),
        (
            lambda: ProxyAnchorLoss(classes=[0, 1], dim=4)(_x2(), torch.tensor([0.0, 1.0, 0.0])),
            "integer",
        ),
        (lambda: ProxyAnchorLoss(classes=[], dim=4), "classes is empty"),
        (lambda: ProxyAnchorLoss(classes=[1, 2, 1], dim=4), "repeated values: \\[1\\]"),
        (lambda: ProxyAnchorLoss(classes=[0.5, 1], dim=4), "integers"),
        (lambda: ProxyAnchorLoss(classes=3, dim=4), "sequence of integers"),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=0), "dim must be"),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=4, alpha=0), "alpha"),
        (lambda: ProxyAnchorLoss(classes=[0, 1], dim=4, delta=-0.1), "delta"),
        (
            lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4)(_x2(), torch.tensor([0, 5, 1])),
            "labels not in classes: 5",
        ),
        (lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4, kind="sphere"), "unknown kind"),
        (lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4, scale=0), "scale must be"),
        (lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4, scale=-3), "scale must be"),
        (lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4, margin=-0.1), "margin"),
        (lambda: MarginSoftmaxLoss(classes=[0, 1], dim=4, margin=3.2), "pi"),
        (lambda: NTXentLoss(temperature=0), "temperature must be a finite number > 0"),
        (lambda: NTXentLoss(temperature=-0.5), "temperature"),
        (lambda: NTXentLoss(temperature=float("inf")), "temperature"),
        (lambda: NTXentLoss()(_x2(3), _x2(4)), "same shape"),
        (lambda: NTXentLoss()(torch.randn(3), torch.randn(3)), "2-D"),
        (lambda: NTXentLoss()(torch.zeros(0, 4), torch.zeros(0, 4)), "empty"),
        (lambda: NTXentLoss()(NAN, _x2()), "z1 contains NaN"),
        (lambda: NTXentLoss()(_x2(), _x2(), torch.arange(4)), "labels has length 4"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- bfloat16 autocast

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # loose: only the float32 accuracy is claimed


def _amp_cases():
    torch.manual_seed(0)
    labels = torch.arange(12) % 4
    return {
        "multi_similarity": (MultiSimilarityLoss(), lambda m, x: m(x, labels)),
        "multi_similarity-refs": (
            MultiSimilarityLoss(),
            lambda m, x: m(x[:6], labels[:6], x[6:], labels[6:]),
        ),
        "proxy_anchor": (ProxyAnchorLoss(classes=range(4), dim=8), lambda m, x: m(x, labels)),
        "arcface": (MarginSoftmaxLoss(classes=range(4), dim=8), lambda m, x: m(x, labels)),
        "cosface": (
            MarginSoftmaxLoss(classes=range(4), dim=8, kind="cosface"),
            lambda m, x: m(x, labels),
        ),
        "ntxent": (NTXentLoss(), lambda m, x: m(x[:6], x[6:])),
        "ntxent-labels": (NTXentLoss(), lambda m, x: m(x[:6], x[6:], labels[:6] % 2)),
    }


AMP_CASES = _amp_cases()


def _value_and_grads(module, call, x, autocast):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = call(module, x)
    value.backward()
    params = [p.grad.clone() for p in module.parameters()]
    return value.detach(), x.grad, params


@pytest.mark.parametrize("name", AMP_CASES)
def test_bfloat16_autocast_matches_float32(name):
    module, call = AMP_CASES[name]
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    value, grad, params = _value_and_grads(module, call, x, autocast=False)
    assert value > 0 and grad.abs().max() > 0
    amp_value, amp_grad, amp_params = _value_and_grads(module, call, x, autocast=True)
    assert amp_value.dtype == amp_grad.dtype == torch.float32
    torch.testing.assert_close(amp_value, value, **TOLERANCE)
    torch.testing.assert_close(amp_grad, grad, **TOLERANCE)
    for got, expected in zip(amp_params, params):
        torch.testing.assert_close(got, expected, **TOLERANCE)


@pytest.mark.parametrize("name", AMP_CASES)
def test_bfloat16_embeddings_give_the_float32_loss_of_their_values(name):
    """A low-precision layer's output: the loss is that of the same values in float32."""
    module, call = AMP_CASES[name]
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    xb = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = call(module, xb)
    value.backward()
    assert value.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert torch.isfinite(xb.grad).all()
    torch.testing.assert_close(value.detach(), call(module, x.float()).detach(), **TOLERANCE)


# ----------------------------------------------------------------------------- learnable proxies


def _toy(seed: int = 0, per_class: int = 8, classes=(3, 5, 8, 11)):
    """Separable clusters in 6-D: class k around a random centre, small noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(len(classes), 6, generator=g)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    x = centres.repeat_interleave(per_class, dim=0) + 0.3 * torch.randn(len(labels), 6, generator=g)
    return x, labels


@pytest.mark.parametrize("kind", ["proxy_anchor", "arcface", "cosface"])
def test_proxies_learn_on_separable_toy_data(kind):
    torch.manual_seed(0)
    x, labels = _toy()
    classes = [3, 5, 8, 11]
    if kind == "proxy_anchor":
        loss_fn = ProxyAnchorLoss(classes=classes, dim=4)
    else:
        loss_fn = MarginSoftmaxLoss(classes=classes, dim=4, kind=kind)
    model = torch.nn.Linear(6, 4)
    params = [*model.parameters(), *loss_fn.parameters()]
    values = []
    for step in range(30):  # plain SGD written out: torch.optim's first step imports dynamo (2 s)
        value = loss_fn(model(x), labels)
        grads = torch.autograd.grad(value, params)
        if step == 0:
            proxy_grad = grads[-1]
            assert torch.isfinite(proxy_grad).all() and proxy_grad.abs().max() > 0
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.05 * g
        values.append(value.item())
    assert values[-1] < 0.5 * values[0], values


def test_proxies_are_seeded_by_the_global_rng_and_are_the_whole_state_dict():
    for make in (_proxy_anchor, _arcface):
        torch.manual_seed(5)
        a = make()
        torch.manual_seed(5)
        b = make()
        (pa,), (pb,) = a.parameters(), b.parameters()
        assert torch.equal(pa, pb)
        assert list(a.state_dict()) == [name for name, _ in a.named_parameters()]
        torch.manual_seed(6)
        c = make()
        c.load_state_dict(a.state_dict())
        assert torch.equal(next(c.parameters()), pa)


def test_classes_accept_any_integer_sequence():
    loss = ProxyAnchorLoss(classes=torch.tensor([10, 2, 5]), dim=4)
    assert loss.classes == (10, 2, 5)
    labels = torch.tensor([10, 5, 2], dtype=torch.int32)
    assert torch.isfinite(loss(torch.randn(3, 4), labels))


def test_exported():
    for name in ("MultiSimilarityLoss", "ProxyAnchorLoss", "MarginSoftmaxLoss", "NTXentLoss"):
        assert name in deepmetric.losses.__all__ and hasattr(deepmetric.losses, name)

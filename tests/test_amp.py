"""Mixed precision: under ``torch.autocast`` the distances, losses and miners must not crash and
must give the values and gradients of a plain float32 run (distances are float32 whatever the
autocast state; see deepmetric.distances)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining
from deepmetric.distances import METRICS, paired, pairwise
from deepmetric.losses import (
    ContrastiveLoss,
    LiftedStructuredLoss,
    TripletLoss,
    triplet_margin_loss,
)

# (device, low-precision dtype) of each autocast flavour; CUDA only where there is one.
AMP = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-fp16",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
    ),
]

B, DIM, CLASSES = 12, 8, 4


def _batch(device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, DIM, generator=g, dtype=dtype)
    labels = torch.arange(B) % CLASSES  # P x K: 4 classes x 3
    return x.to(device), labels.to(device)


def _triplet_margin(metric, soft=False):
    def loss(e, labels):
        return triplet_margin_loss(e[0:4], e[4:8], e[8:12], margin=0.5, metric=metric, soft=soft)

    return loss


def _contrastive_pairs(metric):
    def loss(e, labels):
        same = torch.tensor([1, 0, 1, 0, 0, 1], device=e.device)
        return ContrastiveLoss(margin=1.0, metric=metric)(e[:6], e[6:], same)

    return loss


def _with_labels(module):
    return lambda e, labels: module(e, labels)


LOSSES = {
    **{
        f"triplet-{mining_}{'-soft' if soft else ''}": (
            lambda metric, m=mining_, s=soft: _with_labels(
                TripletLoss(margin=0.5, mining=m, metric=metric, soft=s)
            )
        )
        for mining_ in ("batch_all", "batch_hard", "semi_hard")
        for soft in (False, True)
    },
    "triplet_margin_loss": lambda metric: _triplet_margin(metric),
    "triplet_margin_loss-soft": lambda metric: _triplet_margin(metric, soft=True),
    "contrastive-pairs": _contrastive_pairs,
    "contrastive-batch": lambda metric: _with_labels(ContrastiveLoss(margin=1.0, metric=metric)),
    "lifted": lambda metric: _with_labels(LiftedStructuredLoss(margin=1.0, metric=metric)),
}

VALUE = {"rtol": 1e-5, "atol": 1e-6}


def _value_and_grad(loss_fn, x, labels, autocast=None):
    """The loss and d loss / d x, the forward under autocast when given (device, dtype); the
    backward outside the region, as PyTorch recommends."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(*autocast) if autocast else torch.autocast(x.device.type, enabled=False):
        value = loss_fn(x, labels)
    value.backward()
    return value.detach(), x.grad


# ----------------------------------------------------------------------------- distances


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_pairwise_is_float32_and_exact_under_autocast(device, low, metric, with_ref):
    x, _ = _batch(device)
    y = _batch(device, seed=1)[0][:5] if with_ref else None
    expected = pairwise(x, y, metric)
    with torch.autocast(device, dtype=low):
        got = pairwise(x, y, metric)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **VALUE)


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
def test_paired_is_float32_and_exact_under_autocast(device, low, metric):
    x, _ = _batch(device)
    expected = paired(x[:6], x[6:], metric)
    with torch.autocast(device, dtype=low):
        got = paired(x[:6], x[6:], metric)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **VALUE)


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
def test_float64_stays_float64_under_autocast(device, low, metric):
    x, _ = _batch(device, torch.float64)
    x.requires_grad_(True)
    with torch.autocast(device, dtype=low):
        d, p = pairwise(x, metric=metric), paired(x[:6], x[6:], metric)
    assert d.dtype == p.dtype == torch.float64
    torch.testing.assert_close(d, pairwise(x.detach(), metric=metric), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(d.sum() + p.sum(), x)
    assert grad.dtype == torch.float64


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_inputs_give_float32_distances_and_own_dtype_gradients(device, low, metric):
    """Half / bfloat16 embeddings (a layer's output under autocast) are cast up: the distances
    are those of the same values in float32, the gradient comes back in the input's dtype."""
    x32, _ = _batch(device)
    x = x32.to(low).requires_grad_(True)
    with torch.autocast(device, dtype=low):
        d, p = pairwise(x, metric=metric), paired(x[:6], x[6:], metric)
    assert d.dtype == p.dtype == torch.float32
    torch.testing.assert_close(d, pairwise(x.detach().float(), metric=metric), **VALUE)
    torch.testing.assert_close(p, paired(x[:6].detach().float(), x[6:].float(), metric), **VALUE)
    (grad,) = torch.autograd.grad(d.sum() + p.sum(), x)
    assert grad.dtype == low and torch.isfinite(grad).all()


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_euclidean_backward_called_inside_autocast_stays_float32(device, low, metric, with_ref):
    """The hand-written backward turns autocast off too: a backward called inside the region
    (not recommended, but common) must not lower its matrix products."""
    x, _ = _batch(device)
    y = _batch(device, seed=1)[0][:5]
    w = torch.rand(B, 5 if with_ref else B, generator=torch.Generator().manual_seed(3))
    inputs = [x.requires_grad_(True)] + ([y.requires_grad_(True)] if with_ref else [])

    def grads():
        d = pairwise(x, y if with_ref else None, metric)
        return torch.autograd.grad((d * w.to(device)).sum(), inputs)

    expected = grads()
    with torch.autocast(device, dtype=low):
        got = grads()
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, **VALUE)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_on_float32_embeddings_matches_float32(device, low, metric, name):
    loss_fn = LOSSES[name](metric)
    x, labels = _batch(device)
    value, grad = _value_and_grad(loss_fn, x, labels)
    assert value > 0 and grad.abs().max() > 0  # something to compare
    amp_value, amp_grad = _value_and_grad(loss_fn, x, labels, (device, low))
    assert amp_value.dtype == amp_grad.dtype == torch.float32
    torch.testing.assert_close(amp_value, value, **VALUE)
    torch.testing.assert_close(amp_grad, grad, **VALUE)


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_after_a_low_precision_layer_matches_float32_on_its_output(device, low, metric, name):
    """The standard pattern: a Linear inside the autocast region (it runs in low precision),
    the loss on its (low-precision) output. Reference: the same Linear run by hand in low
    precision outside autocast. The loss must be the float32 loss of those embeddings (to
    float32 accuracy: a loss computed in low precision is not), and the weight gradients those of
    the same computation outside autocast."""
    loss_fn = LOSSES[name](metric)
    inputs, labels = _batch(device, seed=2)
    torch.manual_seed(0)  # the layer's initial weights: not whatever ran before this test
    layer = nn.Linear(DIM, DIM).to(device)

    with torch.autocast(device, dtype=low):
        emb = layer(inputs)
        assert emb.dtype == low  # the region really holds a low-precision layer
        value = loss_fn(emb, labels)
    value.backward()
    grads = [p.grad for p in layer.parameters()]

    weight, bias = (p.detach().clone().requires_grad_(True) for p in layer.parameters())
    emb_ref = F.linear(inputs.to(low), weight.to(low), bias.to(low))
    torch.testing.assert_close(emb, emb_ref, rtol=0, atol=0)
    value_ref = loss_fn(emb_ref, labels)
    value_ref.backward()
    assert value_ref > 0 and weight.grad.abs().max() > 0

    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss_fn(emb_ref.detach().float(), labels), **VALUE)
    torch.testing.assert_close(value, value_ref, **VALUE)
    for got, ref in zip(grads, (weight.grad, bias.grad)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, **VALUE)


# ----------------------------------------------------------------------------- miners


@pytest.mark.parametrize(("device", "low"), AMP)
@pytest.mark.parametrize("metric", METRICS)
def test_miners_on_distances_under_autocast_match_float32(device, low, metric):
    x, labels = _batch(device)
    dist = pairwise(x, metric=metric)
    expected = [
        mining.batch_all(dist, labels, margin=0.5),
        mining.batch_hard(dist, labels),
        mining.semi_hard(dist, labels),
        mining.triplet_categories(dist, labels, margin=0.5),
    ]
    assert len(expected[0].anchor) > 0 and expected[3].total > 0
    with torch.autocast(device, dtype=low):
        amp_dist = pairwise(x, metric=metric)
        got = [
            mining.batch_all(amp_dist, labels, margin=0.5),
            mining.batch_hard(amp_dist, labels),
            mining.semi_hard(amp_dist, labels),
            mining.triplet_categories(amp_dist, labels, margin=0.5),
        ]
    assert amp_dist.dtype == torch.float32
    torch.testing.assert_close(amp_dist, dist, **VALUE)
    for a, b in zip(got[:3], expected[:3]):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
    assert got[3] == expected[3]

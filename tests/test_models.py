"""Tests for deepmetric.models: backbones, EmbeddingNet and Siamese / triplet / joint wrappers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.models import (
    BACKBONES,
    MLP,
    ClassifierHead,
    EmbeddingNet,
    JointNet,
    ResNetSmall,
    SiameseNet,
    SmallCNN,
    TripletNet,
    VGGSmall,
    build_backbone,
)

MODES = ("train", "eval")


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models gain nothing from more, and on a shared,
    oversubscribed CPU OpenMP barriers with 2 threads can make them 10-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _set_mode(module: nn.Module, mode: str) -> nn.Module:
    return module.train() if mode == "train" else module.eval()


def _small_embedding(dim: int = 16, normalize: bool = True) -> EmbeddingNet:
    return EmbeddingNet(SmallCNN(), dim=dim, normalize=normalize)


# (factory, input shape without batch, expected out_features)
BACKBONE_CASES: list[tuple[Callable[[], nn.Module], tuple[int, ...], int]] = [
    (lambda: SmallCNN(), (1, 28, 28), 256),
    (lambda: SmallCNN(batch_norm=True), (1, 28, 28), 256),
    (lambda: SmallCNN(padding=1), (1, 28, 28), 256),
    (lambda: SmallCNN(padding=1), (1, 50, 37), 256),
    (lambda: SmallCNN(in_channels=3), (3, 40, 40), 256),
    (lambda: SmallCNN(), (1, 64, 64), 256),
    (lambda: SmallCNN(), (1, 28, 45), 256),
    (lambda: ResNetSmall(), (3, 32, 32), 128),
    (lambda: ResNetSmall(in_channels=1, widths=(8, 16)), (1, 17, 23), 16),
    (lambda: ResNetSmall(widths=(8, 8, 16), blocks_per_stage=2), (3, 24, 24), 16),
    (lambda: MLP(20), (20,), 256),
    (lambda: MLP(20, hidden=(32,)), (20,), 32),
    (lambda: MLP(5, hidden=()), (5,), 5),
]
CASE_IDS = [
    "cnn28",
    "cnn28-bn",
    "cnn28-pad",
    "cnn50x37-pad",
    "cnn-rgb40",
    "cnn64",
    "cnn28x45",
    "resnet32",
    "resnet-2stage",
    "resnet-2blocks",
    "mlp",
    "mlp-1hidden",
    "mlp-identity",
]


# ------------------------------------------------------------------ backbones


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("factory", "shape", "out_features"), BACKBONE_CASES, ids=CASE_IDS)
def test_backbone_output_shape(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], out_features: int, mode: str
) -> None:
    net = _set_mode(factory(), mode)
    assert net.out_features == out_features
    assert net.input_ndim == len(shape) + 1
    y = net(torch.randn(3, *shape))
    assert y.shape == (3, out_features)
    assert torch.isfinite(y).all()


def test_backbone_declared_input() -> None:
    assert (SmallCNN(in_channels=3).in_channels, SmallCNN().input_ndim) == (3, 4)
    assert (ResNetSmall().in_channels, ResNetSmall().input_ndim) == (3, 4)
    assert (MLP(7).in_features, MLP(7).input_ndim) == (7, 2)


@pytest.mark.parametrize(("padding", "side"), [(0, 5), (1, 7)])
def test_small_cnn_matches_classic_layer_order(padding: int, side: int) -> None:
    """Pool-before-ReLU and channels_last are only optimisations: same function as the
    classic conv -> ReLU -> maxpool stack in NCHW (28 -> 5 unpadded, 28 -> 7 padded)."""
    net = SmallCNN(padding=padding).eval()
    x = torch.randn(4, 1, 28, 28)
    c1, c2, fc = net.conv1[0], net.conv2[0], net.fc[0]
    h = F.max_pool2d(F.relu(F.conv2d(x, c1.weight.contiguous(), c1.bias, padding=padding)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight.contiguous(), c2.bias, padding=padding)), 2)
    assert h.shape == (4, 64, side, side)
    ref = F.relu(F.linear(h.reshape(4, -1), fc.weight, fc.bias))
    torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)


def test_vgg_small_matches_plain_layer_order() -> None:
    """VGGSmall is conv -> BN -> ReLU twice per stage, then max-pool (stages 1, 2), then
    Linear -> ReLU, in NCHW; pooling before the last ReLU and channels_last change nothing.
    Inputs larger than 28x28 are average-pooled to 7 x 7."""
    net = VGGSmall(in_channels=2).eval()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # eval-mode statistics that are not the identity
        bn.running_var.uniform_(0.5, 2.0)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 64, 64]
    for size in (28, 36):
        x = torch.randn(3, 2, size, size)
        h = x
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            h = F.conv2d(h, conv.weight.contiguous(), padding=1)
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias)
            h = F.relu(h)
            if i in (1, 3):
                h = F.max_pool2d(h, 2)
        h = F.adaptive_avg_pool2d(h, 7)
        fc = net.fc[0]
        ref = F.relu(F.linear(h.reshape(3, -1), fc.weight, fc.bias))
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-5)


def test_small_cnn_large_input_is_pooled_to_5x5() -> None:
    net = SmallCNN().eval()
    x = torch.randn(2, 1, 60, 60)
    feats = net.conv2(net.conv1(x))
    assert feats.shape[-2:] != (5, 5)
    assert net.pool(feats).shape == (2, 64, 5, 5)
    assert net(x).shape == (2, 256)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SmallCNN(in_channels=0),
        lambda: SmallCNN(padding=2),
        lambda: VGGSmall(in_channels=0),
        lambda: VGGSmall(widths=(16, 32)),
        lambda: VGGSmall(widths=(16, 0, 64)),
        lambda: ResNetSmall(widths=()),
        lambda: ResNetSmall(widths=(8, 0)),
        lambda: MLP(0),
        lambda: MLP(4, hidden=(8, -1)),
        lambda: EmbeddingNet(MLP(4), dim=0),
        lambda: ClassifierHead(8, 0),
    ],
)
def test_invalid_constructor_arguments(factory: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError):
        factory()


# ------------------------------------------------------------------ registry


def test_registry_names_and_build() -> None:
    assert set(BACKBONES) == {"small_cnn", "vgg_small", "resnet_small", "mlp"}
    assert isinstance(build_backbone("vgg_small", in_channels=3), VGGSmall)
    assert isinstance(build_backbone("small_cnn"), SmallCNN)
    res = build_backbone("resnet_small", in_channels=1, widths=(8, 16))
    assert isinstance(res, ResNetSmall)
    assert res.out_features == 16
    mlp = build_backbone("mlp", in_features=12, hidden=(10,))
    assert isinstance(mlp, MLP)
    assert mlp.out_features == 10


@pytest.mark.parametrize("name", ["resnet18", "SmallCNN", "", "forward"])
def test_registry_unknown_name_lists_valid_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown backbone") as info:
        build_backbone(name)
    for valid in BACKBONES:
        assert valid in str(info.value)


# ------------------------------------------------------------------ EmbeddingNet


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("factory", "shape", "out_features"), BACKBONE_CASES, ids=CASE_IDS)
def test_embedding_net_shapes_and_norms(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], out_features: int, mode: str
) -> None:
    x = torch.randn(4, *shape)
    net = _set_mode(EmbeddingNet(factory(), dim=24), mode)
    assert net.dim == 24
    e = net(x)
    assert e.shape == (4, 24)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))

    raw = _set_mode(EmbeddingNet(factory(), dim=24, normalize=False), mode)
    r = raw(x)
    assert r.shape == (4, 24)
    assert not torch.allclose(r.norm(dim=1), torch.ones(4), atol=1e-2)


def test_embedding_net_gradients_reach_every_parameter() -> None:
    for factory, shape, _ in BACKBONE_CASES[::3]:
        net = EmbeddingNet(factory(), dim=8).train()
        net(torch.randn(3, *shape)).pow(3).sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name


def test_embedding_net_accepts_backbone_without_declared_input() -> None:
    class Flat(nn.Module):
        out_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], -1)

    net = EmbeddingNet(Flat(), dim=4)
    assert net(torch.randn(5, 3, 2, 2)).shape == (5, 4)


def test_embedding_net_requires_out_features() -> None:
    with pytest.raises(TypeError, match="out_features"):
        EmbeddingNet(nn.Identity(), dim=4)


@pytest.mark.parametrize(
    ("backbone", "bad_shape", "expected"),
    [
        (lambda: SmallCNN(), (1, 28, 28), "(B, 1, H, W)"),
        (lambda: SmallCNN(), (2, 3, 28, 28), "(B, 1, H, W)"),
        (lambda: SmallCNN(), (2, 784), "(B, 1, H, W)"),
        (lambda: ResNetSmall(widths=(8,)), (2, 1, 16, 16), "(B, 3, H, W)"),
        (lambda: ResNetSmall(widths=(8,)), (2, 3, 1, 16, 16), "(B, 3, H, W)"),
        (lambda: MLP(5, hidden=(8,)), (2, 7), "(B, 5)"),
        (lambda: MLP(5, hidden=(8,)), (2, 1, 5), "(B, 5)"),
        (lambda: MLP(5, hidden=(8,)), (5,), "(B, 5)"),
    ],
)
def test_wrong_input_shape_message(
    backbone: Callable[[], nn.Module], bad_shape: tuple[int, ...], expected: str
) -> None:
    net = EmbeddingNet(backbone(), dim=4)
    with pytest.raises(ValueError) as info:
        net(torch.randn(*bad_shape))
    msg = str(info.value)
    assert expected in msg
    assert str(tuple(bad_shape)) in msg
    # Wrappers surface the same error.
    with pytest.raises(ValueError, match="expects input of shape"):
        SiameseNet(net)(torch.randn(*bad_shape), torch.randn(*bad_shape))


# ------------------------------------------------------------------ Siamese / triplet


def _same_objects(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x is y for x, y in zip(pa, pb, strict=True))


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_siamese_and_triplet_share_one_set_of_weights() -> None:
    emb = _small_embedding()
    for wrapper in (SiameseNet(emb), TripletNet(emb), TripletNet(emb, concat=True)):
        assert wrapper.embedding_net is emb
        assert _same_objects(wrapper, emb)
        assert _n_params(wrapper) == _n_params(emb)
        assert wrapper.dim == emb.dim
    joint = JointNet(emb, num_classes=3)
    assert _n_params(joint) == _n_params(emb) + _n_params(joint.head)


@pytest.mark.parametrize("mode", MODES)
def test_siamese_forward(mode: str) -> None:
    emb = _small_embedding()
    net = _set_mode(SiameseNet(emb), mode)
    x1, x2 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    e1, e2 = net(x1, x2)
    assert e1.shape == e2.shape == (4, 16)
    if mode == "eval":
        torch.testing.assert_close(e1, emb(x1))
        torch.testing.assert_close(e2, net.get_embedding(x2))
        a, b = net(x1, x1)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_triplet_forward_and_concat(mode: str) -> None:
    emb = _small_embedding()
    a, p, n = (torch.randn(5, 1, 28, 28) for _ in range(3))
    out = _set_mode(TripletNet(emb), mode)(a, p, n)
    assert isinstance(out, tuple)
    assert [t.shape for t in out] == [(5, 16)] * 3
    cat = _set_mode(TripletNet(emb, concat=True), mode)(a, p, n)
    assert isinstance(cat, torch.Tensor)
    assert cat.shape == (5, 48)
    if mode == "eval":
        torch.testing.assert_close(cat, torch.cat(out, dim=1))
        torch.testing.assert_close(cat[:, 16:32], emb(p))


@pytest.mark.parametrize("wrapper_cls", [SiameseNet, TripletNet])
def test_gradient_step_through_one_branch_updates_all_branches(wrapper_cls: type) -> None:
    emb = EmbeddingNet(SmallCNN(batch_norm=True), dim=8)
    net = wrapper_cls(emb).eval()
    n_branches = 2 if wrapper_cls is SiameseNet else 3
    x = torch.randn(4, 1, 28, 28)
    other = [torch.randn(4, 1, 28, 28) for _ in range(n_branches - 1)]
    with torch.no_grad():
        before = emb(x).clone()

    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    outs = net(x, *other)
    # Loss through the first branch only.
    outs[0][:, 0].sum().backward()
    opt.step()

    with torch.no_grad():
        after = net(*([x] * n_branches))
    assert not torch.allclose(after[0], before)
    # Equal to float32 rounding, not bit for bit: the branches are rows 0-3, 4-7 and 8-11 of
    # one batch of 12, and the CPU's convolution kernels may treat a tail of the batch (and a
    # batch of 4) otherwise (2.2e-8 apart on another machine's CPU). A branch that had not
    # taken the step would be off by the step itself, orders of magnitude more.
    for e in after[1:]:
        torch.testing.assert_close(e, after[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[0], emb(x).detach(), rtol=1e-5, atol=1e-6)
    assert (after[0] - before).abs().max() > 1e-3


# ------------------------------------------------------------------ JointNet


@pytest.mark.parametrize("mode", MODES)
def test_joint_net_shapes(mode: str) -> None:
    emb = EmbeddingNet(MLP(10, hidden=(32,)), dim=8)
    net = _set_mode(JointNet(emb, num_classes=5), mode)
    assert net.dim == 8
    assert isinstance(net.head, ClassifierHead)
    assert net.head.num_classes == 5
    e, logits = net(torch.randn(6, 10))
    assert e.shape == (6, 8)
    assert logits.shape == (6, 5)
    torch.testing.assert_close(logits, net.head(e))
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))


def test_tiny_optimisation_lowers_loss() -> None:
    """20 Adam steps of cross-entropy on two well-separated noise-image classes."""
    centers = torch.randn(2, 1, 28, 28)
    labels = torch.arange(32) % 2
    x = centers[labels] + 0.5 * torch.randn(32, 1, 28, 28)
    net = JointNet(_small_embedding(dim=16), num_classes=2).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, logits = net(x)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    net.eval()
    with torch.no_grad():
        _, logits = net(x)
    assert (logits.argmax(dim=1) == labels).float().mean() > 0.9


def test_siamese_and_triplet_branches_share_one_forward_pass():
    """With BatchNorm in training mode, every branch must see the statistics of the whole
    batch (one concatenated forward), as the same network run on the same inputs would."""
    from deepmetric.models import EmbeddingNet, SiameseNet, SmallCNN, TripletNet

    torch.manual_seed(0)
    net = EmbeddingNet(SmallCNN(batch_norm=True), dim=8).train()
    a, b, c = (torch.randn(4, 1, 28, 28) + shift for shift in (0.0, 1.0, 2.0))
    e1, e2 = SiameseNet(net)(a, b)
    assert torch.allclose(torch.cat([e1, e2]), net(torch.cat([a, b])), atol=1e-6)
    assert not torch.allclose(e1, net(a), atol=1e-3)  # separate passes would differ
    ea, ep, en = TripletNet(net)(a, b, c)
    assert torch.allclose(torch.cat([ea, ep, en]), net(torch.cat([a, b, c])), atol=1e-6)


# ------------------------------------------------------------------ mirror averaging


def test_mirror_averages_an_image_with_its_mirror_image_in_eval_mode_only() -> None:
    torch.manual_seed(0)
    plain = EmbeddingNet(VGGSmall(), dim=8)
    mirror = EmbeddingNet(VGGSmall(), dim=8, mirror=True)
    mirror.load_state_dict(plain.state_dict())  # no parameters of its own
    plain.eval(), mirror.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        by_hand = F.normalize(
            plain.fc(plain.backbone(x)) + plain.fc(plain.backbone(x.flip(-1))), dim=1
        )
        got = mirror(x)
        torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-6)
        torch.testing.assert_close(mirror(x.flip(-1)), got, rtol=0, atol=1e-6)  # mirror-invariant
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)  # the net alone is not
    plain.train(), mirror.train()
    torch.manual_seed(1)
    a = plain(x)
    torch.manual_seed(1)
    torch.testing.assert_close(mirror(x), a, rtol=0, atol=0)  # training: each image once


def test_mirror_needs_images() -> None:
    with pytest.raises(ValueError, match="needs images"):
        EmbeddingNet(MLP(in_features=12), dim=4, mirror=True)

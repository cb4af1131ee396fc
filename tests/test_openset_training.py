"""The open-set levers of configs/openset.yaml: dihedral pseudo-classes (``train.dihedral_classes``)
and the projection head (``model.projection_head``), against plain loops, in training, resume,
evaluation and export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from synthetic import train_tiny_run, write_learnable_idx

from deepmetric.checkpoints import latest_checkpoint, load_checkpoint
from deepmetric.components import load_checked_config
from deepmetric.config import ConfigError
from deepmetric.data import DIHEDRAL, ArrayDataset, PKSampler, dihedral, load_dataset
from deepmetric.inference import Embedder, export_onnx
from deepmetric.models import MLP, EmbeddingNet, SmallCNN, VGGSmall, projections
from deepmetric.training import load_trained, resume_config, train
from deepmetric.training.source import DihedralSource, Source


def _loop_dihedral(image: np.ndarray, t: int) -> np.ndarray:
    """Symmetry t of one (S, S) image by index arithmetic: rows flipped when t >= 4, then
    (t mod 4) quarter turns, each ``out[i][j] = z[j][S - 1 - i]``."""
    s = image.shape[0]
    z = image[::-1].copy() if t >= 4 else image.copy()
    for _ in range(t % 4):
        turned = np.empty_like(z)
        for i in range(s):
            for j in range(s):
                turned[i, j] = z[j, s - 1 - i]
        z = turned
    return z


def test_dihedral_equals_index_loops_per_item():
    x = torch.rand(9, 2, 5, 5)
    t = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3])
    got = dihedral(x, t)
    for b in range(len(x)):
        for c in range(2):
            want = _loop_dihedral(x[b, c].numpy(), int(t[b]))
            assert np.array_equal(got[b, c].numpy(), want)
    assert torch.equal(dihedral(x, 0), x)
    assert torch.equal(
        dihedral(x, 5), torch.stack([dihedral(x[i : i + 1], 5)[0] for i in range(9)])
    )


def test_the_eight_symmetries_are_distinct_and_a_group():
    x = torch.rand(1, 1, 6, 6)
    images = [dihedral(x, t)[0].flatten() for t in range(DIHEDRAL)]
    for a in range(DIHEDRAL):
        for b in range(a + 1, DIHEDRAL):
            assert not torch.equal(images[a], images[b])
        for b in range(DIHEDRAL):  # closed under composition: t_b after t_a is one of the 8
            twice = dihedral(dihedral(x, a), b)[0].flatten()
            assert sum(torch.equal(twice, img) for img in images) == 1


@pytest.mark.parametrize(
    "x,t,match",
    [
        (torch.rand(2, 1, 4, 5), 0, "square"),
        (torch.rand(2, 16), 0, "square"),
        (torch.rand(2, 1, 4, 4), 8, "0..7"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, -1]), "0..7"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, 1, 2]), r"\(2,\)"),
    ],
)
def test_dihedral_rejects_what_it_cannot_turn(x, t, match):
    with pytest.raises(ValueError, match=match):
        dihedral(x, t)


def test_dihedral_source_has_eight_classes_per_class():
    x = torch.rand(5, 1, 4, 4)
    y = torch.tensor([3, 0, 3, 1, 0])
    source = DihedralSource(Source(ArrayDataset(x, y)))
    assert len(source) == 40
    for j in range(40):
        i, t = j // 8, j % 8
        assert int(source.labels[j]) == 8 * int(y[i]) + t
        assert torch.equal(source.fetch(torch.tensor([j]))[0], dihedral(x[i : i + 1], t)[0])
    assert sorted(torch.unique(source.labels).tolist()) == sorted(
        {8 * c + t for c in (0, 1, 3) for t in range(8)}
    )
    # P x K batches over it: each chunk of K is one image class under one symmetry
    for idx in PKSampler(source.labels, p=4, k=2, seed=0):
        labels = source.labels[torch.tensor(idx)]
        assert len(torch.unique(labels)) == 4


def test_dihedral_source_needs_square_images():
    with pytest.raises(ValueError, match=r"train\.dihedral_classes needs square images"):
        DihedralSource(Source(ArrayDataset(torch.rand(4, 1, 4, 6), torch.tensor([0, 0, 1, 1]))))
    with pytest.raises(ValueError, match="square images"):
        DihedralSource(Source(ArrayDataset(torch.rand(4, 7), torch.tensor([0, 0, 1, 1]))))


def test_projection_head_trains_on_the_head_and_embeds_before_it():
    torch.manual_seed(0)
    backbone = SmallCNN(padding=1)
    net = EmbeddingNet(backbone, dim=16, projection_head=True)
    x = torch.rand(6, 1, 28, 28)
    assert (net.dim, net.projection_dim) == (256, 16)
    net.train()
    assert torch.allclose(net(x), F.normalize(net.fc(backbone(x)), dim=1))
    net.eval()
    with torch.no_grad():
        features = backbone(x)
        assert torch.allclose(net(x), F.normalize(features, dim=1))
        with projections(net):
            assert torch.allclose(net(x), F.normalize(net.fc(features), dim=1))
        assert net(x).shape == (6, 256)  # outside the context: the features again
        net.mirror = True
        both = (features + backbone(x.flip(-1))) / 2
        assert torch.allclose(net(x), F.normalize(both, dim=1), atol=1e-6)
        assert torch.allclose(net(x.flip(-1)), net(x), atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("openset") / "toy", n_train=24)


LEVERS = ("train.dihedral_classes=true", "model.projection_head=true", "mode=batch")
READOUT = "model.conv_readout=true"
#: a schedule that does not depend on the number of epochs, so that 1 + 1 epochs == 2
STEP = "train.schedule=step"


@pytest.mark.parametrize("readout,dim", [((), 256), ((READOUT,), 256 + 64 * 7 * 7)])
def test_a_run_with_both_levers_resumes_bit_for_bit_and_embeds_its_features(
    data, tmp_path, readout, dim
):
    levers = (*LEVERS, *readout, STEP, "train.augment=true")
    full = train_tiny_run(data, tmp_path / "full", *levers, "epochs=2")
    part = train_tiny_run(data, tmp_path / "part", *levers, "epochs=1")
    train(resume_config(part, ["epochs=2"]), resume=True, stream=None)
    (a, _), (b, _) = (load_checkpoint(latest_checkpoint(r)) for r in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    config, net = load_trained(full)
    assert config.train.dihedral_classes and config.model.projection_head
    assert isinstance(net, EmbeddingNet) and net.projection_head and net.dim == dim
    assert net.conv_readout == bool(readout) == config.model.conv_readout
    epochs = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r.get("kind") == "epoch"]
    assert len(epochs) == 2  # the validation loss is the loss on the head's outputs
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in epochs)
    embedder = Embedder.from_run(full, device="cpu")  # onnxruntime's CPU result to 1e-5
    images = load_dataset(f"idx:{data}", "test").x
    emb = embedder.embed(images[:5])
    assert emb.shape == (5, dim)
    path = export_onnx(full, tmp_path / "model.onnx", progress=lambda _: None)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"input": images[:5].numpy()})[0]
    assert np.abs(got - np.asarray(emb)).max() <= 1e-5


def test_dihedral_classes_make_eight_times_the_steps(data, tmp_path):
    plain = train(
        load_checked_config(None, _tiny(data, tmp_path / "plain")), stream=None
    )  # one epoch of P x K batches over the 6 classes
    turned = train(
        load_checked_config(None, _tiny(data, tmp_path / "turned", LEVERS[0])), stream=None
    )
    assert turned["steps"] == 8 * plain["steps"]


def _tiny(data: Path, out: Path, *overrides: str) -> list[str]:
    base = [f"data=idx:{data}", f"out={out}", "model.dim=16", "train.p=4", "train.k=4"]
    return [*base, "epochs=1", "model.backbone=small_cnn", "mode=batch", *overrides]


@pytest.mark.parametrize("mode", ["joint", "siamese"])
def test_the_projection_head_needs_batch_mode(mode):
    with pytest.raises(ConfigError, match=r"projection_head.*mode=batch"):
        load_checked_config(None, [f"mode={mode}", "model.projection_head=true"])


@pytest.mark.parametrize("backbone", [SmallCNN(padding=1), SmallCNN(padding=0), VGGSmall()])
def test_conv_readout_concatenates_the_normalised_map_and_features(backbone):
    torch.manual_seed(0)
    net = EmbeddingNet(backbone, dim=16, projection_head=True, conv_readout=True).eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        conv_map, features = backbone.forward_with_map(x)
        assert torch.equal(features, backbone(x))
        assert conv_map.shape == (5, backbone.map_features)
        want = torch.cat([F.normalize(features, dim=1), F.normalize(conv_map, dim=1)], 1)
        got = net(x)
        assert got.shape == (5, 256 + backbone.map_features) == (5, net.dim)
        assert torch.allclose(got, want / 2**0.5, atol=1e-6)
        with projections(net):
            assert torch.allclose(net(x), F.normalize(net.fc(features), dim=1))
        net.mirror = True
        assert torch.allclose(net(x), net(x.flip(-1)), atol=1e-6)
    net.train()
    assert net(x).shape == (5, 16)  # training sees the head alone


def test_conv_readout_needs_the_head_and_a_map():
    with pytest.raises(ValueError, match="needs projection_head"):
        EmbeddingNet(SmallCNN(), 8, conv_readout=True)
    with pytest.raises(ValueError, match="forward_with_map"):
        EmbeddingNet(MLP(12), 8, projection_head=True, conv_readout=True)
    for overrides in (
        ["model.conv_readout=true"],
        ["model.conv_readout=true", "model.projection_head=true", "model.backbone=resnet_small"],
        ["model.projection_head=true", "model.builder=mine"],
    ):
        with pytest.raises(ConfigError, match=r"conv_readout|builder"):
            load_checked_config(None, ["mode=batch", *overrides])

"""Tests for deepmetric.fit (the loop over Python objects), the learning-rate plan, P adapting
to the data, the validation loss and the built-in defaults."""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import write_learnable_idx
from torch import nn
from torch.utils.data import Dataset

from deepmetric.config import Config, ConfigError, load_config
from deepmetric.data import ArrayDataset, load_dataset
from deepmetric.losses import ContrastiveLoss, TripletLoss, triplet_margin_loss
from deepmetric.models import EmbeddingNet, JointNet, SmallCNN, embed, register_model
from deepmetric.neighbors import nearest_other, retrieval_metrics
from deepmetric.training import fit, load_data, load_trained, resume_config, train
from deepmetric.training.fit import Source, _epoch_record
from deepmetric.training.modes import VAL_ITEMS, JointMode, pk_chunks, stratified_indices
from deepmetric.training.schedule import LRPlan
from deepmetric.training.state import Position

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    return write_learnable_idx(tmp_path_factory.mktemp("data") / "toy", n_classes=4)


class PlainImages(Dataset):
    """A plain map-style Dataset (not an ArrayDataset): numpy images and int labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.numpy(), y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], self.y[i]


class TinyNet(nn.Module):
    """A user's own network: flatten -> linear -> L2 normalisation."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc(x.flatten(1)), dim=1)


register_model("tests.tiny_net")(TinyNet)


def _p_at_1(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(nearest_other(embed(net, x), y)[1].float().mean())


def test_fit_trains_a_users_module_on_a_plain_dataset(idx_dir):
    train_set, test_set = load_dataset(f"idx:{idx_dir}", "train"), load_dataset(f"idx:{idx_dir}")
    torch.manual_seed(0)
    net = TinyNet()
    before = _p_at_1(net, test_set.x, test_set.y)
    stream = io.StringIO()
    out = fit(
        net,
        PlainImages(train_set.x, train_set.y),
        loss=TripletLoss(margin=0.2),
        epochs=3,
        p=4,
        k=8,
        val_data=PlainImages(test_set.x, test_set.y),
        stream=stream,
    )
    assert out is net
    assert _p_at_1(net, test_set.x, test_set.y) > before + 0.05  # it learned (0.76 -> 0.88)
    assert "val precision@1" in stream.getvalue()


def test_fit_writes_a_run_folder_that_load_trained_rebuilds(idx_dir, tmp_path):
    data = load_dataset(f"idx:{idx_dir}", "train")
    net = fit(
        TinyNet(dim=6),
        data,
        loss=TripletLoss(margin=0.3, metric="cosine"),
        epochs=1,
        p=4,
        k=8,
        out=tmp_path / "run",
        builder="tests.tiny_net",
        builder_args={"dim": 6},
        device="cpu",  # where load_trained rebuilds it: equal bit for bit
        stream=None,
    )
    config, loaded = load_trained(tmp_path / "run")
    assert config.loss.metric == "cosine" and config.loss.margin == 0.3
    assert torch.equal(embed(loaded, data.x[:16]), embed(net, data.x[:16]))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]

    fit(TinyNet(), data, loss=TripletLoss(), epochs=1, p=4, k=8, out=tmp_path / "x", stream=None)
    with pytest.raises(ConfigError, match="no builder"):
        load_trained(tmp_path / "x")


@pytest.mark.parametrize(
    ("mode", "loss"),
    [
        ("siamese", ContrastiveLoss(margin=1.0)),
        ("triplet", functools.partial(triplet_margin_loss, margin=0.2)),
    ],
)
def test_fit_pair_and_triplet_modes(idx_dir, mode, loss):
    data = load_dataset(f"idx:{idx_dir}", "train")
    net = fit(TinyNet(), data, loss=loss, epochs=1, mode=mode, batch_size=16, stream=None)
    assert torch.isfinite(embed(net, data.x[:4])).all()


def test_fit_rejects_unknown_options(idx_dir):
    data = load_dataset(f"idx:{idx_dir}", "train")
    with pytest.raises(ConfigError, match=r"unknown option.*lrr"):
        fit(TinyNet(), data, loss=TripletLoss(), epochs=1, lrr=0.1)
    with pytest.raises(ValueError, match="labels must be"):
        fit(TinyNet(), data, loss=TripletLoss(), epochs=1, labels=[0, 1])


def test_p_adapts_to_the_classes_present_and_says_so_once(idx_dir, tmp_path):
    config = load_config(
        None,
        [f"data=idx:{idx_dir}", f"out={tmp_path / 'run'}", "epochs=2", "model.dim=8", "train.k=4"],
    )
    assert config.train.p == 10  # the default, more than the 4 classes of the data
    stream = io.StringIO()
    summary = train(config, stream=stream)
    assert summary["steps"] > 0
    assert stream.getvalue().count("using P=4 classes per batch") == 1


def test_defaults_are_the_recommended_fashion_mnist_config():
    defaults = load_config(None)
    recommended = load_config(REPO / "configs" / "fashion_mnist.yaml")
    defaults.name = recommended.name
    assert defaults == recommended
    assert defaults.data == "fashion-mnist"


@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_lr_plan_values(schedule):
    plan = LRPlan(schedule=schedule, total=100, per_epoch=10, step_size=2, gamma=0.5)
    f = [plan.factor(s) for s in range(101)]
    assert f[0] == 1.0
    if schedule == "cosine":
        assert f[50] == pytest.approx(0.5) and f[100] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in itertools.pairwise(f))
    elif schedule == "step":
        assert f[19] == 1.0 and f[20] == 0.5 and f[40] == 0.25
    else:
        assert set(f) == {1.0}
    warm = LRPlan(schedule=schedule, total=100, per_epoch=10, warmup=4)
    assert [warm.factor(s) / plan.factor(s) for s in range(4)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8]
    )


def test_resume_with_more_epochs_replans_instead_of_rewarming(idx_dir, tmp_path):
    base = [f"data=idx:{idx_dir}", f"out={tmp_path / 'run'}", "model.dim=8", "train.p=4"]
    train(load_config(None, [*base, "epochs=2", "train.k=8", "train.lr=0.001"]), stream=None)
    train(resume_config(tmp_path / "run", ["epochs=4"]), resume=True, stream=None)
    steps = [
        r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").open()) if r["kind"] == "step"
    ]
    per_epoch = max(r["step"] for r in steps) // 4
    total = 4 * per_epoch
    after = [r for r in steps if r["step"] > 2 * per_epoch]
    assert after, "the resumed run logged no step"
    for r in after:  # the new plan at that step: never back to the peak
        expected = 0.001 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / total))
        assert r["lr"] == pytest.approx(expected)
        assert r["lr"] <= 0.001 * 0.5 + 1e-9
    assert all(a["lr"] >= b["lr"] for a, b in itertools.pairwise(after))


def test_stratified_validation_batch_covers_every_class():
    labels = torch.arange(10).repeat_interleave(1000)  # sorted by class, as a folder loads
    idx = stratified_indices(labels, 4096, seed=0)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) <= 4096 and counts.min() == counts.max() == 409
    assert torch.equal(stratified_indices(labels, 4096, seed=0), idx)


def test_validation_loss_is_the_trained_loss(idx_dir):
    data = load_dataset(f"idx:{idx_dir}", "train")
    torch.manual_seed(0)
    model = JointNet(EmbeddingNet(SmallCNN(), dim=8), num_classes=4)
    metric_loss = TripletLoss(margin=0.2)
    mode = JointMode(data.y, metric_loss, p=4, k=8, seed=0, classes=torch.arange(4))
    record = _epoch_record(Config(), model, mode, Source(data), Position(), torch.device("cpu"))
    batches = mode.val_batches(data.y)
    assert len(batches) > 1 and all(len(b) == 4 * 8 for b in batches)  # the training batch shape
    model.eval()
    expected, metric_only = [], []
    with torch.no_grad():
        for idx in batches:
            emb, logits = model(data.x[idx])
            ce = nn.functional.cross_entropy(logits, data.y[idx])
            expected.append(float(metric_loss(emb, data.y[idx]) + ce))
            metric_only.append(float(metric_loss(emb, data.y[idx])))
    assert record["val_loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert record["val_loss"] > np.mean(metric_only)  # the CE term is in it


def test_class_disjoint_validation(idx_dir):
    config = load_config(
        None, [f"data=idx:{idx_dir}", "train.classes=[0,1,2,3]", "train.val_classes=[2,3]"]
    )
    from deepmetric.training import load_data

    train_set, val_set = load_data(config)
    assert set(train_set.y.tolist()) == {0, 1} and set(val_set.y.tolist()) == {2, 3}
    assert len(val_set) == int(torch.isin(load_dataset(f"idx:{idx_dir}", "train").y, 2).sum()) * 2
    with pytest.raises(ConfigError, match=r"must be among train\.classes"):
        load_config(None, ["train.classes=[0,1,2,3]", "train.val_classes=[3,4]"])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        load_config(None, ["train.val_classes=[3]"])
    with pytest.raises(ConfigError, match="leaves fewer than 2"):
        load_config(None, ["train.classes=[0,1,2]", "train.val_classes=[1,2]"])


_USER_MODULE = """
from torch import nn
from deepmetric.models import register_model


@register_model("usernets.flat")
class Flat(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(28 * 28, dim)

    def forward(self, x):
        return nn.functional.normalize(self.fc(x.flatten(1)), dim=1)
"""


def test_cli_import_registers_the_builder_of_a_fit_run(idx_dir, tmp_path, monkeypatch):
    """`deepmetric evaluate RUN --import MODULE`: the module registering a fit run's builder is
    imported first (from the current folder); without it, one clear line and exit 2."""
    (tmp_path / "usernets.py").write_text(_USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernets  # the user's own module, registering "usernets.flat"

    data = load_dataset(f"idx:{idx_dir}", "train")
    fit(
        usernets.Flat(dim=6),
        data,
        loss=TripletLoss(),
        epochs=1,
        p=4,
        k=8,
        out=tmp_path / "run",
        builder="usernets.flat",
        builder_args={"dim": 6},
        stream=None,
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "deepmetric",
            "evaluate",
            "run",
            "--data",
            f"idx:{idx_dir}",
            "--no-map",
            "--out",
            "ev",
            *args,
        ]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    missing = cli()
    assert missing.returncode == 2
    assert "'usernets.flat' is not registered" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli("--import", "no_such_module")
    assert bad.returncode == 2 and "--import no_such_module" in bad.stderr
    done = cli("--import", "usernets")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["data"]["items"] == len(load_dataset(f"idx:{idx_dir}", "test"))


def test_joint_training_with_class_disjoint_validation(idx_dir, tmp_path):
    """The classifier head knows only the training classes: the validation batch (other
    classes) gets the metric term alone, finite, never an index error."""
    overrides = [
        f"data=idx:{idx_dir}",
        f"out={tmp_path / 'run'}",
        "mode=joint",
        "epochs=1",
        "model.dim=8",
        "train.k=4",
        "train.val_classes=[2,3]",
        "train.augment=false",
        "train.device=cpu",  # the epoch's MAP@R is recomputed on the CPU below, to 1e-6
    ]
    summary = train(load_config(None, overrides), stream=None)
    epoch = next(
        r
        for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
        if r["kind"] == "epoch"
    )
    assert math.isfinite(epoch["val_loss"]) and 0 <= summary["val_precision_at_1"] <= 1
    # MAP@R of the validation classes, each epoch: that of the saved weights on the fixed
    # stratified sample, recomputed here from scratch
    config, net = load_trained(tmp_path / "run")
    _, val_set = load_data(config)
    sample = stratified_indices(val_set.y, VAL_ITEMS, config.seed)
    want = retrieval_metrics(embed(net, val_set.inputs[sample]), val_set.y[sample])["map_at_r"]
    assert 0 < want < 1 and epoch["val_map_at_r"] == pytest.approx(want, abs=1e-6)
    assert summary["val_map_at_r"] == epoch["val_map_at_r"]
    mode = JointMode(
        torch.tensor([0, 0, 1, 1]), TripletLoss(), p=2, k=2, seed=0, classes=torch.tensor([0, 1])
    )
    model = JointNet(EmbeddingNet(SmallCNN(), dim=4), num_classes=2)
    x = torch.rand(4, 1, 28, 28)
    unknown = mode.loss(model, x, torch.tensor([2, 2, 3, 3]))
    metric_only = TripletLoss()(unknown.embeddings, torch.tensor([2, 2, 3, 3]))
    assert float(unknown.loss.detach()) == pytest.approx(float(metric_only.detach()))
    known = mode.loss(model, x, torch.tensor([0, 0, 1, 1]))
    metric = TripletLoss()(known.embeddings, torch.tensor([0, 0, 1, 1]))
    assert float(known.loss.detach()) > float(metric.detach())


def test_uint8_pixels_train_exactly_as_their_float32_values(idx_dir):
    """The loaders keep pixels as uint8 and convert each batch: the same run on the same values
    stored as float32 gives bit for bit the same weights (augmentation on)."""
    pixels = load_dataset(f"idx:{idx_dir}", "train")
    floats = ArrayDataset(pixels.x.clone(), pixels.y)
    assert pixels.data.dtype == torch.uint8 and floats.data.dtype == torch.float32
    nets = []
    for data in (pixels, floats):
        torch.manual_seed(0)
        opts = {"epochs": 1, "p": 4, "k": 8, "augment": True, "seed": 3, "stream": None}
        opts["device"] = "cpu"  # bit for bit: one device's kernels
        nets.append(fit(TinyNet(), data, loss=TripletLoss(), **opts))
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("counts", "p", "k"), [((9, 9, 9, 9, 9), 2, 4), ((40, 8, 3), 4, 4), ((3, 3), 2, 4)]
)
def test_pk_chunks_are_batches_of_the_training_shape(counts, p, k):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    chunks = pk_chunks(labels, idx, p, k)
    if max(counts) < k:
        assert len(chunks) == 1 and torch.equal(chunks[0], idx)  # too small: one batch
        return
    seen = torch.cat(chunks)
    assert len(seen) == len(set(seen.tolist()))  # each item at most once
    for chunk in chunks:
        per_class = torch.bincount(labels[chunk], minlength=len(counts))
        present = per_class[per_class > 0]
        assert (present == k).all() and 2 <= len(present) <= p + 1
    # a class gives its first k items per round that 2+ classes fill, in idx's order
    for c, n in enumerate(counts):
        rounds = sum(1 for r in range(n // k) if sum(m >= (r + 1) * k for m in counts) >= 2)
        used = sorted(i for i in seen.tolist() if labels[i] == c)
        assert used == sorted(idx[labels[idx] == c][: rounds * k].tolist())

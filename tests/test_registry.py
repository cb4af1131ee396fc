"""Components by name: the loss table (deepmetric.losses.LOSSES), the backbone table
(deepmetric.models.BACKBONES) with its contract, the mining rules (deepmetric.mining.MINING_RULES)
and the Mode protocol; each checked against the if-chains they replaced."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from deepmetric import mining
from deepmetric.components import load_checked_config
from deepmetric.config import (
    Config,
    ConfigError,
    LossConfig,
    ModelConfig,
    config_from_dict,
    to_dict,
)
from deepmetric.losses import (
    LOSSES,
    MINING,
    SHARED_OPTIONS,
    ContrastiveLoss,
    CrossBatchMemory,
    LiftedStructuredLoss,
    MarginSoftmaxLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    TripletLoss,
    name_loss,
    register_loss,
    triplet_margin_loss,
)
from deepmetric.models import (
    BACKBONES,
    Backbone,
    EmbeddingNet,
    MapReadout,
    build_backbone,
    declared_input,
    register_backbone,
)
from deepmetric.runs import FIRST_LAYER, Run, embedding_network
from deepmetric.training import fit
from deepmetric.training.builders import build_loss, build_mode
from deepmetric.training.fit import _loss_config
from deepmetric.training.modes import Mode

# ----------------------------------------------------------------------------- the old code

NAMES = (
    "triplet",
    "contrastive",
    "lifted",
    "multi_similarity",
    "proxy_anchor",
    "arcface",
    "cosface",
)


def _old_build_loss(config: Config, classes: list[int]):
    """build_loss as it was: an if-chain over loss.name (reference)."""
    c = config.loss
    if config.mode in ("triplet", "offline"):
        return functools.partial(triplet_margin_loss, margin=c.margin, metric=c.metric, soft=c.soft)
    if c.name == "triplet":
        loss = TripletLoss(margin=c.margin, mining=c.mining, metric=c.metric, soft=c.soft)
    elif c.name == "multi_similarity":
        loss = MultiSimilarityLoss()
    elif c.name == "proxy_anchor":
        loss = ProxyAnchorLoss(classes=list(classes), dim=config.model.dim, ignore_unknown=True)
    elif c.name in ("arcface", "cosface"):
        loss = MarginSoftmaxLoss(
            classes=list(classes),
            dim=config.model.dim,
            kind=c.name,
            scale=c.scale,
            margin=c.margin,
            ignore_unknown=True,
        )
    elif c.name == "contrastive":
        loss = ContrastiveLoss(margin=c.margin, metric=c.metric)
    else:
        loss = LiftedStructuredLoss(margin=c.margin, metric=c.metric)
    if c.memory:
        return CrossBatchMemory(loss, size=c.memory, start=c.memory_start)
    return loss


def _old_loss_name(loss) -> str:
    """fit's name of a loss object as it was: by class name, anything else "triplet"."""
    names = {
        "ContrastiveLoss": "contrastive",
        "LiftedStructuredLoss": "lifted",
        "MultiSimilarityLoss": "multi_similarity",
        "ProxyAnchorLoss": "proxy_anchor",
        "MarginSoftmaxLoss": getattr(loss, "kind", "arcface"),
    }
    return names.get(type(loss).__name__, "triplet")


#: runs.FIRST_LAYER as it was
OLD_FIRST_LAYER = {
    "small_cnn": "backbone.conv1.0.weight",
    "vgg_small": "backbone.features.0.weight",
    "resnet_small": "backbone.stem.0.weight",
    "mlp": "backbone.net.0.weight",
}

# ----------------------------------------------------------------------------- losses

#: every loss name with options other than the defaults where it takes some
LOSS_CASES = [
    ["loss.name=triplet"],
    ["loss.name=triplet", "loss.mining=semi_hard", "loss.margin=0.5", "loss.metric=cosine"],
    ["loss.name=triplet", "loss.mining=batch_hard", "loss.soft=true"],
    ["loss.name=triplet", "loss.memory=16", "loss.memory_start=2"],
    ["loss.name=contrastive", "loss.margin=1.0", "loss.metric=squared_euclidean"],
    ["loss.name=lifted", "loss.margin=0.7"],
    ["loss.name=multi_similarity"],
    ["loss.name=multi_similarity", "loss.memory=8"],
    ["loss.name=proxy_anchor", "loss.proxy_lr_factor=100"],
    ["loss.name=arcface", "loss.margin=0.3", "loss.scale=30"],
    ["loss.name=cosface", "loss.margin=0.25"],
]


def _same(a: object, b: object) -> bool:
    """Equal state dicts (tensors, and a memory's extra state)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _batch(dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    emb = nn.functional.normalize(torch.randn(16, dim, generator=g), dim=1)
    return emb, torch.arange(4).repeat_interleave(4)


def test_the_table_holds_every_loss_name_in_the_configs_order():
    assert tuple(LOSSES) == NAMES
    for name, entry in LOSSES.items():
        assert entry.name == name and callable(entry.loss)
        assert all(isinstance(doc, str) and doc for doc in entry.options.values())
        assert set(entry.options) <= {f.name for f in dataclasses.fields(LossConfig)}


def test_loss_margin_says_what_it_means_for_each_loss():
    meanings = {name: entry.options.get("margin") for name, entry in LOSSES.items()}
    assert "distance" in meanings["triplet"] and "distance" in meanings["lifted"]
    assert "angular" in meanings["arcface"] and "cosine" in meanings["cosface"]
    assert meanings["multi_similarity"] is None and meanings["proxy_anchor"] is None


@pytest.mark.parametrize("overrides", LOSS_CASES, ids=lambda o: " ".join(o)[10:])
def test_every_loss_name_builds_what_the_if_chain_built(overrides):
    config = load_checked_config(None, ["mode=batch", "model.dim=8", *overrides])
    classes = [0, 1, 2, 3]
    torch.manual_seed(0)
    new = build_loss(config, classes)
    torch.manual_seed(0)
    old = _old_build_loss(config, classes)
    assert type(new) is type(old) and repr(new) == repr(old)  # the options in extra_repr
    assert _same(new.state_dict(), old.state_dict())
    emb, labels = _batch()
    assert torch.equal(new(emb, labels), old(emb, labels))


@pytest.mark.parametrize("mode", ["triplet", "offline"])
def test_the_triplet_modes_still_take_the_triplet_function(mode):
    config = load_checked_config(None, [f"mode={mode}", "loss.margin=1.0", "loss.soft=true"])
    new, old = build_loss(config), _old_build_loss(config, [])
    assert (new.func, new.keywords) == (old.func, old.keywords)


LOSS_OBJECTS = [
    TripletLoss(),
    TripletLoss(margin=0.4, mining="semi_hard", metric="cosine", soft=True),
    ContrastiveLoss(margin=0.8, metric="squared_euclidean"),
    LiftedStructuredLoss(margin=0.6),
    MultiSimilarityLoss(),
    ProxyAnchorLoss(classes=[0, 1, 2], dim=8),
    MarginSoftmaxLoss(classes=[0, 1], dim=8, kind="arcface", margin=0.4),
    MarginSoftmaxLoss(classes=[0, 1], dim=8, kind="cosface", scale=30.0),
]


@pytest.mark.parametrize("loss", LOSS_OBJECTS, ids=repr)
def test_fit_records_every_loss_as_it_did(loss):
    c = _loss_config(loss, recorded=True)
    assert c.name == _old_loss_name(loss)
    for key in ("margin", "mining", "metric", "soft"):  # what fit read back before
        if hasattr(loss, key):
            assert getattr(c, key) == getattr(loss, key)
    if isinstance(loss, MarginSoftmaxLoss):
        assert c.scale == loss.scale  # read back now too (it was left at the default)
    if LOSSES[c.name].takes_memory:  # a memory as before: its loss, its size and start
        memory = _loss_config(CrossBatchMemory(loss, size=32, start=5), recorded=True)
        assert (memory.name, memory.memory, memory.memory_start) == (c.name, 32, 5)


def test_a_partial_of_the_triplet_function_counts_as_triplet_with_its_keywords():
    loss = functools.partial(triplet_margin_loss, margin=1.0, metric="cosine", soft=True)
    assert name_loss(loss) == ("triplet", {"margin": 1.0, "metric": "cosine", "soft": True})
    assert name_loss(triplet_margin_loss) == ("triplet", {})
    assert name_loss(functools.partial(max, 1)) is None


def test_a_built_loss_reads_back_to_its_config():
    """build, then read: the options come back (every name, the table's two halves agree)."""
    for overrides in LOSS_CASES:
        config = load_checked_config(None, ["mode=batch", "model.dim=8", *overrides])
        loss = build_loss(config, [0, 1, 2, 3])
        recorded = _loss_config(loss, recorded=True)
        for key in ("name", "margin", "mining", "metric", "soft", "scale", "memory"):
            if key == "name" or key in LOSSES[config.loss.name].options or key == "memory":
                assert getattr(recorded, key) == getattr(config.loss, key), (overrides, key)


# ----------------------------------------------------------------------------- config checks


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_an_unknown_loss_name_lists_the_choices():
    with pytest.raises(ConfigError) as error:
        load_checked_config(None, ["loss.name=sphereface"])
    expected = " | ".join(repr(n) for n in NAMES)
    assert _one_line(error) == f"loss.name: expected one of {expected}, got 'sphereface'"


def test_unknown_backbones_and_mining_rules_list_the_choices(tmp_path):
    with pytest.raises(
        ConfigError, match=re.escape("model.backbone: expected one of 'small_cnn' | ")
    ):
        load_checked_config(None, ["model.backbone=vit"])
    with pytest.raises(ConfigError) as error:
        load_checked_config(None, ["loss.mining=hardest"])
    assert _one_line(error) == (
        "loss.mining: expected one of 'batch_all' | 'batch_hard' | 'semi_hard', got 'hardest'"
    )
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  name: sphereface\n")
    with pytest.raises(ConfigError, match=re.escape("loss.name: expected one of 'triplet' |")):
        load_checked_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss.name=multi_similarity", "loss.margin=0.5"],
            "loss.margin=0.5: loss.name=multi_similarity takes no margin; it has none (with any "
            "loss: metric, softmax_weight, memory, memory_start, ntxent_weight, temperature)",
        ),
        (
            ["loss.name=triplet", "loss.scale=30"],
            "loss.scale=30.0: loss.name=triplet takes no scale; its options: margin, mining, "
            "metric, soft (with any loss:",
        ),
        (
            ["loss.name=arcface", "loss.mining=semi_hard"],
            "loss.mining='semi_hard': loss.name=arcface takes no mining; its options: margin, "
            "scale, proxy_lr_factor (with any loss:",
        ),
        (
            ["loss.name=contrastive", "loss.proxy_lr_factor=10"],
            "loss.name=contrastive takes no proxy_lr_factor; its options: margin, metric (",
        ),
    ],
)
def test_an_option_the_loss_does_not_take_is_refused_naming_its_options(
    tmp_path, overrides, message
):
    with pytest.raises(ConfigError) as error:
        load_checked_config(None, overrides)
    assert message in _one_line(error)
    tree: dict = {"loss": {}}
    for text in overrides:
        key, _, value = text.partition("=")
        tree["loss"][key.split(".")[1]] = yaml.safe_load(value)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as error:
        load_checked_config(path)
    assert message in _one_line(error)


def test_the_shared_options_go_with_any_loss():
    shared = ["loss.metric=cosine", "loss.softmax_weight=0.5", "loss.temperature=0.2"]
    for name in NAMES:
        config = load_checked_config(None, ["mode=batch", f"loss.name={name}", *shared])
        assert config.loss.metric == "cosine"
    assert set(SHARED_OPTIONS) == {
        "metric",
        "softmax_weight",
        "memory",
        "memory_start",
        "ntxent_weight",
        "temperature",
    }


def test_defaults_are_not_foreign_options(tmp_path):
    """A resolved config holds every key: a run's config.yaml loads as a config file, and a
    config file's default values leave the loss free to change."""
    config = load_checked_config(None, ["mode=batch", "loss.name=multi_similarity"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_checked_config(path).loss.name == "multi_similarity"
    # configs/fashion_mnist.yaml writes margin, mining and metric, all at their defaults
    repo_config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"
    assert load_checked_config(repo_config, ["loss.name=proxy_anchor"]).loss.name == "proxy_anchor"


def test_old_run_folders_with_foreign_options_still_load(tmp_path):
    """Before the table, loss.margin=0.5 with multi_similarity was taken (and ignored): such a
    run folder's config.yaml loads as it is."""
    values = to_dict(Config())
    values["mode"] = "batch"
    values["loss"].update(name="multi_similarity", margin=0.5)
    assert config_from_dict(values).loss.margin == 0.5
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(values))
    assert Run.open(run).config.loss.name == "multi_similarity"


# ----------------------------------------------------------------------------- your own loss


class DoubledTriplet(nn.Module):
    """A user's own loss: twice the batch-all triplet loss."""

    def __init__(self, *, margin: float = 0.2, metric: str = "euclidean") -> None:
        super().__init__()
        self.margin, self.metric = margin, metric
        self.inner = TripletLoss(margin=margin, metric=metric)

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None) -> torch.Tensor:
        return 2 * self.inner(embeddings, labels, ref_embeddings, ref_labels)


class Vectors(Dataset):
    """4 classes of 8 vectors each, around 4 random centres."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(4).repeat_interleave(8)
        self.x = torch.randn(4, 6, generator=g)[self.y] + 0.1 * torch.randn(32, 6, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


@pytest.fixture
def doubled():
    entry = register_loss(
        "tests_doubled",
        DoubledTriplet,
        options={"margin": "the triplet hinge's margin, a distance", "metric": "its distance"},
        takes_memory=False,
    )
    yield entry
    LOSSES.pop(entry.name)


def _fit(loss, out):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4))
    common = {"epochs": 1, "p": 4, "k": 4, "device": "cpu", "amp": False, "stream": None}
    return fit(net, Vectors(), loss=loss, out=out, **common)


def test_a_registered_loss_round_trips_through_fit_and_config_yaml(doubled, tmp_path):
    _fit(DoubledTriplet(margin=0.5, metric="cosine"), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss"]
    assert (saved["name"], saved["margin"], saved["metric"]) == ("tests_doubled", 0.5, "cosine")
    config = Run.open(tmp_path / "run").config
    assert (config.loss.name, config.loss.margin) == ("tests_doubled", 0.5)
    again = load_checked_config(tmp_path / "run" / "config.yaml", ["out=" + str(tmp_path / "b")])
    loss = build_loss(dataclasses.replace(again, mode="batch"), [0, 1, 2, 3])
    assert type(loss) is DoubledTriplet and (loss.margin, loss.metric) == (0.5, "cosine")
    with pytest.raises(
        ConfigError, match="tests_doubled takes no scale; its options: margin, metric"
    ):
        load_checked_config(None, ["mode=batch", "loss.name=tests_doubled", "loss.scale=3"])


def test_a_run_of_a_loss_registered_elsewhere_still_opens(doubled, tmp_path):
    """Evaluating a run needs no loss: its folder opens where the loss is not registered;
    training it again (build_loss) says what to import, in one line."""
    _fit(DoubledTriplet(), tmp_path / "run")
    LOSSES.pop("tests_doubled")
    try:
        config = Run.open(tmp_path / "run").config
        assert config.loss.name == "tests_doubled"
        with pytest.raises(ConfigError) as error:
            build_loss(dataclasses.replace(config, mode="batch"), [0, 1])
        assert "loss.name=tests_doubled is not registered" in _one_line(error)
        assert "--import MODULE" in str(error.value)
        with pytest.raises(ConfigError, match=r"loss.name: expected one of 'triplet' \|"):
            load_checked_config(tmp_path / "run" / "config.yaml")
    finally:
        LOSSES["tests_doubled"] = doubled


def test_an_unregistered_loss_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError) as error:
        _fit(DoubledTriplet(), tmp_path / "run")
    text = _one_line(error)
    assert "DoubledTriplet" in text and "register_loss" in text
    with pytest.raises(ConfigError, match="DoubledTriplet"):  # inside a memory too
        _fit(CrossBatchMemory(DoubledTriplet(), size=8), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_without_a_run_folder_an_unregistered_loss_trains():
    net = _fit(DoubledTriplet(metric="cosine"), None)
    assert isinstance(net, nn.Module)
    c = _loss_config(DoubledTriplet(margin=0.4, metric="cosine"), recorded=False)
    assert (c.name, c.metric, c.margin) == ("triplet", "cosine", 0.4)  # as before


def test_register_loss_refuses_a_taken_name_and_bad_options():
    with pytest.raises(ValueError, match="registered already"):
        register_loss("triplet", TripletLoss)
    with pytest.raises(ValueError, match="a loss name is a word"):
        register_loss("my loss", TripletLoss)
    with pytest.raises(ValueError, match="read="):
        register_loss("tests_function", triplet_margin_loss)
    assert tuple(LOSSES) == NAMES


def test_a_registered_loss_with_an_option_that_is_no_config_key_is_refused():
    register_loss("tests_bad", DoubledTriplet, options={"gamma": "not a loss.* key"})
    try:
        with pytest.raises(
            ConfigError, match=r"tests_bad declares option\(s\) gamma, which are no"
        ):
            load_checked_config(None, ["mode=batch", "loss.name=tests_bad"])
    finally:
        LOSSES.pop("tests_bad")


# ----------------------------------------------------------------------------- mining rules


def test_the_mining_rules_are_the_table_behind_mining():
    assert MINING == tuple(mining.MINING_RULES) == ("batch_all", "batch_hard", "semi_hard")
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 4, generator=g)
    labels = torch.arange(3).repeat(4)
    dist = torch.cdist(emb, emb)
    masks = mining.pair_masks(labels)
    assert mining.MINING_RULES["batch_all"].tile is None  # counted, never listed
    for name, whole in (("batch_hard", mining.batch_hard), ("semi_hard", mining.semi_hard)):
        tile = mining.MINING_RULES[name].tile(dist, masks, method="auto")
        expected = whole(dist, labels)
        assert all(torch.equal(a, b) for a, b in zip(tile, expected)), name
    with pytest.raises(ValueError, match="unknown mining 'hardest'; expected one of batch_all"):
        TripletLoss(mining="hardest")


# ----------------------------------------------------------------------------- backbones


def _options(name: str) -> dict:
    return {key: getattr(ModelConfig(), key) for key in BACKBONES[name].options}


def _sample(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if BACKBONES[name].input_ndim == 4:
        return torch.rand(2, 3, 28, 28, generator=g)
    return torch.rand(2, 12, generator=g)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_registered_backbone_keeps_the_contract(name):
    entry = BACKBONES[name]
    x = _sample(name)
    torch.manual_seed(0)
    backbone = entry.build(x.shape[1], **_options(name))
    assert isinstance(backbone, Backbone)
    assert backbone.input_ndim == entry.input_ndim == x.dim()
    assert declared_input(backbone) == (x.dim(), x.shape[1])
    assert isinstance(backbone, MapReadout) == entry.map_readout
    out = backbone.eval()(x)
    assert out.shape == (2, backbone.out_features)
    net = EmbeddingNet(backbone, dim=5).eval()  # EmbeddingNet accepts it
    assert net(x).shape == (2, 5)
    with pytest.raises(ValueError, match="expects input of shape"):
        net(x[:, :1] if x.dim() == 2 else x[:, :1, :, :])
    state = net.state_dict()
    first = FIRST_LAYER[name]
    assert first in state and state[first].shape[1] == x.shape[1]  # the first layer's name
    torch.manual_seed(1)
    again = EmbeddingNet(entry.build(x.shape[1], **_options(name)), dim=5).eval()
    again.load_state_dict(state)  # state dict round trip
    assert torch.equal(again(x), net(x))
    if entry.map_readout:
        conv_map, features = backbone.forward_with_map(x)
        assert conv_map.shape == (2, backbone.map_features) and torch.equal(features, out)


def test_first_layer_is_the_table_the_dict_was():
    assert dict(FIRST_LAYER) == OLD_FIRST_LAYER
    assert list(BACKBONES) == ["small_cnn", "vgg_small", "resnet_small", "mlp"]
    assert dict(BACKBONES["small_cnn"].options).keys() == {"batch_norm", "padding"}


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.backbone=small_cnn", "model.batch_norm=true", "model.padding=0"],
        ["model.backbone=small_cnn"],
        ["model.backbone=vgg_small"],
        ["model.backbone=resnet_small"],
        ["model.backbone=mlp", "train.augment=false"],
    ],
)
def test_embedding_network_builds_what_the_per_name_code_built(overrides):
    config = load_checked_config(None, ["model.dim=6", *overrides])
    name, m = config.model.backbone, config.model
    x = _sample(name)
    torch.manual_seed(0)
    new = embedding_network(config, x).backbone
    torch.manual_seed(0)
    if name == "mlp":
        old = build_backbone(name, in_features=math.prod(x.shape[1:]))
    else:
        extra = {"batch_norm": m.batch_norm, "padding": m.padding} if name == "small_cnn" else {}
        old = build_backbone(name, in_channels=x.shape[1], **extra)
    assert repr(new) == repr(old)
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in new.state_dict().items())


class Wide(nn.Module):
    """A backbone of one's own: flatten and a linear layer."""

    input_ndim = 2

    def __init__(self, in_features: int, width: int = 7) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, width
        self.fc = nn.Linear(in_features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_adding_a_backbone_is_one_entry():
    register_backbone("tests_wide", Wide, input_ndim=2, first_layer="fc.weight")
    try:
        # (mirror_of in runs.py still tells vectors by the name mlp: no flips, no mirror)
        config = load_checked_config(
            None, ["model.backbone=tests_wide", "model.dim=3", "train.augment=false"]
        )
        net = embedding_network(config, torch.zeros(2, 12))
        assert net(torch.zeros(4, 12)).shape == (4, 3)
        assert FIRST_LAYER["tests_wide"] == "backbone.fc.weight" in net.state_dict()
        test_every_registered_backbone_keeps_the_contract("tests_wide")
        with pytest.raises(ValueError, match="registered already"):
            register_backbone("tests_wide", Wide, input_ndim=2, first_layer="fc.weight")
    finally:
        BACKBONES.pop("tests_wide")
    assert "tests_wide" not in FIRST_LAYER


# ----------------------------------------------------------------------------- modes

PROTOCOL = ("name", "loss_fn", "steps_per_epoch", "resumable_mid_epoch", "n_views")


@pytest.mark.parametrize(
    ("overrides", "views", "resumable"),
    [
        (["mode=batch"], 1, True),
        (["mode=batch", "loss.ntxent_weight=0.5", "train.augment=true"], 2, True),
        (["mode=joint"], 1, True),
        (["mode=siamese", "loss.name=contrastive"], 1, True),
        (["mode=triplet"], 1, True),
        (["mode=offline"], 1, False),
    ],
)
def test_every_mode_declares_what_the_loop_uses(overrides, views, resumable):
    config = load_checked_config(None, ["train.p=2", "train.k=2", "train.batch_size=4", *overrides])
    labels = torch.arange(4).repeat_interleave(4)
    mode: Mode = build_mode(
        config,
        labels,
        build_loss(config, [0, 1, 2, 3]),
        fetch=lambda idx: torch.zeros(len(idx), 2),
        embed_net=nn.Identity(),
        device=torch.device("cpu"),
        stream=None,
    )
    for member in (*PROTOCOL, "batches", "loss", "loss_of", "val_batches"):
        assert hasattr(mode, member), member
    assert mode.name == config.mode and mode.steps_per_epoch >= 1
    assert (mode.n_views, mode.resumable_mid_epoch) == (views, resumable)


def test_the_mode_protocol_declares_what_the_loop_uses():
    members = set(Mode.__annotations__) | {n for n in vars(Mode) if not n.startswith("_")}
    assert members == {*PROTOCOL, "batches", "loss", "loss_of", "val_batches"}


def test_every_mode_of_the_config_has_a_table_entry_that_builds_it():
    """config.mode's choices and the MODES table agree; each entry builds a Mode of that
    name over a small labelled set."""
    import typing

    from deepmetric.config import Config
    from deepmetric.training.builders import MODES, build_loss, build_mode

    hints = typing.get_type_hints(Config)
    assert set(typing.get_args(hints["mode"])) == set(MODES)
    labels = torch.arange(8).repeat_interleave(4)
    for name in MODES:
        overrides = [f"mode={name}", "train.p=4", "train.k=4", "train.batch_size=8"]
        if name in ("triplet", "offline"):
            overrides.append("loss.name=triplet")
        if name == "siamese":
            overrides.append("loss.name=contrastive")
        config = load_checked_config(None, overrides)
        net = torch.nn.Linear(2, 2)
        mode = build_mode(
            config,
            labels,
            build_loss(config, list(range(8))),
            fetch=lambda idx: torch.zeros(len(idx), 2),
            embed_net=net,
            device=torch.device("cpu"),
            stream=None,
        )
        assert mode.name == name, (mode.name, name)
        assert mode.steps_per_epoch >= 1

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from deepmetric.cli import main as cli_main
from deepmetric.components import check_components, load_checked_config
from deepmetric.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
    to_dict,
    valid_keys,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("epochs: 7\ntrain:\n  lr: 1e-3\n  p: 8\nloss:\n  margin: 1\n")
    config = load_checked_config(path, ["train.p=4", "data=idx:/some/dir", "train.classes=[0,1,2]"])
    assert config.name == "exp"  # from the file name
    assert config.epochs == 7 and config.train.lr == 0.001 and config.train.p == 4
    assert config.loss.margin == 1.0 and isinstance(config.loss.margin, float)
    assert config.data == "idx:/some/dir" and config.train.classes == [0, 1, 2]
    assert config.run_dir == Path("runs/exp")
    assert load_checked_config(None, ["out=/tmp/x"]).run_dir == Path("/tmp/x")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_checked_config(path, ["epochs=1"])
    assert config.epochs == 1


def test_the_shipped_configs_are_the_ones_the_issue_asks_for():
    classic = load_checked_config(Path(CONFIGS[0]).with_name("mnist_triplet_classic.yaml"))
    assert (classic.mode, classic.model.dim, classic.loss.margin) == ("triplet", 128, 1.0)
    assert (classic.train.batch_size, classic.epochs) == (32, 2)
    default = load_checked_config(Path(CONFIGS[0]).with_name("fashion_mnist.yaml"))
    assert default.data == "fashion-mnist" and default.mode in ("batch", "joint")  # P x K
    openset = load_checked_config(
        Path(CONFIGS[0]).with_name("openset.yaml")
    )  # the open-set protocol
    trained = set(openset.train.classes) - set(openset.train.val_classes)
    assert set(openset.train.val_classes) < set(openset.train.classes)  # class-disjoint val
    assert trained.isdisjoint({6, 7, 8, 9}) and set(openset.train.classes) == set(range(6))


def test_a_typo_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'") as error:
        load_checked_config(None, ["train.lrr=0.1"])
    assert "train.lr" in str(error.value) and "train.batch_size" in str(error.value)
    with pytest.raises(ConfigError, match="unknown key 'epoch'; valid keys: name, data"):
        load_checked_config(None, ["epoch=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=three", "epochs: expected an integer, got 'three'"),
        ("epochs=2.5", "expected an integer"),
        ("model.normalize=maybe", "expected true or false"),
        ("loss.mining=hardest", "expected one of 'batch_all' | 'batch_hard' | 'semi_hard'"),
        ("train.classes=[a]", "expected a list of int or null"),
        ("model=3", "model: expected a mapping"),
        ("epochs=0", "epochs must be >= 1"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_wrong_values_get_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_checked_config(None, [override])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_checked_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_checked_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{typo}: unknown key 'trian'")):
        load_checked_config(typo)


def test_round_trip_through_yaml(tmp_path):
    config = load_checked_config(None, ["train.classes=[1,3]", "loss.soft=true", "name=x"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_checked_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)
    assert config_from_dict(to_dict(config)) == config


def test_parse_override_keeps_data_specs_as_typed():
    assert parse_override("data=npz:1e3.npz") == {"data": "npz:1e3.npz"}
    assert parse_override("train.lr=0.5") == {"train": {"lr": 0.5}}
    assert "train.k" in valid_keys(Config)


# ------------------------------------------------------------------------------ validation
# One case per impossible setting: (overrides, the message, which names the key and the
# problem). Each is checked from Python (load_checked_config with overrides, and the same values
# as a YAML file) and from the command line (one line on stderr, exit code 2).
INVALID = {
    "unknown key": (["train.lrr=0.1"], "unknown key 'train.lrr'; valid keys: train.p,"),
    "unknown section": (["trian.lr=0.1"], "unknown key 'trian'; valid keys: name, data,"),
    "wrong type: int": (["epochs=three"], "epochs: expected an integer, got 'three'"),
    "wrong type: float": (["loss.margin=[1]"], "loss.margin: expected float, got [1]"),
    "wrong type: bool": (["train.augment=often"], "train.augment: expected true or false"),
    "wrong type: list": (["train.classes=3"], "train.classes: expected a list of int or null"),
    "wrong type: section": (["train=fast"], "train: expected a mapping, got 'fast'"),
    "negative margin": (["loss.margin=-0.1"], "loss.margin must be >= 0, got -0.1"),
    "K = 0": (["train.k=0"], "train.k must be >= 1, got 0"),
    "K = 1 in a P x K mode": (["train.k=1"], "train.k must be >= 2: a P x K batch needs positive"),
    "P = 0": (["train.p=0"], "train.p must be >= 1, got 0"),
    "P = 1 in a P x K mode": (["mode=batch", "train.p=1"], "train.p must be >= 2: a P x K batch"),
    # P larger than the classes present adapts (P = the classes present, with a note: see
    # test_p_larger_than_the_classes_adapts); it cannot when the config names < 2 classes
    "P cannot adapt: one class": (
        ["train.classes=[3]", "train.p=4"],
        "train.classes needs at least 2 classes (metric learning compares classes), got [3]",
    ),
    "P cannot adapt: val classes take all": (
        ["train.classes=[0,1,2]", "train.val_classes=[1,2]"],
        "train.classes minus train.val_classes leaves fewer than 2 classes",
    ),
    "class ids < 0": (["train.classes=[-1,2]"], "train.classes must hold class ids >= 0"),
    # batch = P x K in the P x K modes, never smaller than K; batch_size counts the pairs or
    # triplets of the other modes, and the offline miner's P x K batch needs 2 x 2
    "batch_size = 0": (["mode=triplet", "train.batch_size=0"], "train.batch_size must be >= 1"),
    "offline K = 1": (
        ["mode=offline", "train.offline_k=1"],
        "train.offline_p and train.offline_k must be >= 2 (mining needs positive pairs",
    ),
    "offline P = 0": (["train.offline_p=0"], "train.offline_p must be >= 1, got 0"),
    "epochs = 0": (["epochs=0"], "epochs must be >= 1, got 0"),
    "epochs < 0": (["epochs=-2"], "epochs must be >= 1, got -2"),
    "lr = 0": (["train.lr=0"], "train.lr must be > 0, got 0.0"),
    "lr < 0": (["train.lr=-1e-3"], "train.lr must be > 0, got -0.001"),
    "lr = NaN": (["train.lr=nan"], "train.lr must be a finite number, got nan"),
    "lr = inf": (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    "margin = NaN": (["loss.margin=.nan"], "loss.margin must be a finite number, got nan"),
    "float overflow": ([f"train.lr=1{'0' * 400}"], "train.lr: 1000"),
    "gamma = 0": (["train.gamma=0"], "train.gamma must be > 0"),
    "step_size = 0": (["train.step_size=0"], "train.step_size must be >= 1, got 0"),
    "weight_decay < 0": (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
    "momentum < 0": (["train.momentum=-0.5"], "train.momentum must be >= 0, got -0.5"),
    "grad_clip < 0": (["train.grad_clip=-1"], "train.grad_clip must be >= 0, got -1.0"),
    "softmax_weight < 0": (["loss.softmax_weight=-1"], "loss.softmax_weight must be >= 0"),
    "val_fraction = 1": (["train.val_fraction=1"], "train.val_fraction must be in [0, 1)"),
    "label_smoothing = 1": (["train.label_smoothing=1"], "train.label_smoothing must be in"),
    "warmup < 0": (["train.warmup_epochs=-1"], "train.warmup_epochs must be >= 0, got -1.0"),
    "seed < 0": (["seed=-1"], "seed must be >= 0, got -1"),
    "dim = 0": (["model.dim=0"], "model.dim must be >= 1, got 0"),
    "padding < 0": (["model.padding=-1"], "model.padding must be >= 0, got -1"),
    "image_size = 0": (["image_size=0"], "image_size must be >= 1, got 0"),
    "unknown mode": (["mode=hybrid"], "mode: expected one of 'batch' | 'siamese' | 'triplet'"),
    "unknown loss": (["loss.name=sphereface"], "loss.name: expected one of 'triplet' |"),
    "unknown mining": (["loss.mining=hardest"], "loss.mining: expected one of 'batch_all' |"),
    "unknown metric": (["loss.metric=l1"], "loss.metric: expected one of 'euclidean' |"),
    "unknown optimizer": (["train.optimizer=lbfgs"], "train.optimizer: expected one of 'adam'"),
    "unknown schedule": (["train.schedule=linear"], "train.schedule: expected one of 'none'"),
    "unknown backbone": (["model.backbone=vit"], "model.backbone: expected one of 'small_cnn'"),
    "unknown device": (["train.device=gpu"], "train.device must be auto, cpu, cuda, cuda:N or"),
}


def _as_yaml(overrides: list[str]) -> str:
    """The overrides as one YAML file (``a.b=v`` -> ``a: {b: v}``)."""
    tree: dict = {}
    for text in overrides:
        node, value = tree, parse_override(text)
        while isinstance(value, dict) and len(value) == 1:
            ((key, value),) = value.items()
            if not isinstance(value, dict) or key not in node:
                node[key] = value
                break
            node = node[key]
    return yaml.safe_dump(tree)


@pytest.mark.parametrize(("overrides", "message"), INVALID.values(), ids=INVALID.keys())
def test_impossible_settings_are_refused_naming_the_key(tmp_path, capsys, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_checked_config(None, overrides)
    path = tmp_path / "bad.yaml"
    path.write_text(_as_yaml(overrides))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_checked_config(path)
    assert cli_main(["train", str(path), f"out={tmp_path / 'run'}"]) == 2
    assert cli_main(["train", *overrides, f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("deepmetric: error: ") for line in err), err
    assert message in err[1] and message in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_impossible_settings_are_refused_by_fit_too():
    from deepmetric.training import fit

    for options, message in [
        ({"lr": float("nan")}, "train.lr must be a finite number"),
        ({"momentum": -1.0}, "train.momentum must be >= 0"),
        ({"p": 1}, "train.p must be >= 2"),
        ({"epochs": 0}, "epochs must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            fit(torch.nn.Linear(2, 2), [], loss=None, **{"epochs": 1, **options})


def test_p_larger_than_the_classes_adapts():
    """Not an error: P becomes the number of classes present (the trainer says so once, see
    tests/test_fit.py::test_p_adapts_to_the_classes_present_and_says_so_once)."""
    config = load_checked_config(None, ["train.p=50", "train.classes=[0,1,2]"])
    assert config.train.p == 50


def test_the_command_line_exits_2_with_one_line():
    """The real process: exit status 2 and a single line on stderr, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "train.lr=nan", "loss.margin=-1"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "deepmetric: error: train.lr must be a finite number, got nan\n"


@pytest.mark.parametrize(
    "override, message, saved_ok",
    [
        ("loss.name=sphereface", "loss.name: expected one of 'triplet'", True),
        ("model.backbone=vit", "model.backbone: expected one of 'small_cnn'", True),
        ("loss.scale=3", "loss.name=triplet takes no scale", True),
        ("loss.mining=hardest", "loss.mining: expected one of 'batch_all'", False),
    ],
)
def test_config_checks_types_and_components_check_the_tables(override, message, saved_ok):
    """config.py sits below losses, mining and models: load_config checks types and values;
    the names and what each entry allows are deepmetric.components' (load_checked_config).
    A saved run's config skips the names and the loss options (its loss may be registered by
    code not imported here), never the rest."""
    config = load_config(None, [override])  # well typed: accepted here
    if saved_ok:
        check_components(config)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_components(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_components(config, written=True)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_checked_config(None, [override])

import re
from pathlib import Path

import pytest

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
    config = load_config(path, ["train.p=4", "data=idx:/some/dir", "train.classes=[0,1,2]"])
    assert config.name == "exp"  # from the file name
    assert config.epochs == 7 and config.train.lr == 0.001 and config.train.p == 4
    assert config.loss.margin == 1.0 and isinstance(config.loss.margin, float)
    assert config.data == "idx:/some/dir" and config.train.classes == [0, 1, 2]
    assert config.run_dir == Path("runs/exp")
    assert load_config(None, ["out=/tmp/x"]).run_dir == Path("/tmp/x")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path, ["epochs=1"])
    assert config.epochs == 1


def test_the_shipped_configs_are_the_ones_the_issue_asks_for():
    classic = load_config(Path(CONFIGS[0]).with_name("mnist_triplet_classic.yaml"))
    assert (classic.mode, classic.model.dim, classic.loss.margin) == ("triplet", 128, 1.0)
    assert (classic.train.batch_size, classic.epochs) == (32, 2)
    default = load_config(Path(CONFIGS[0]).with_name("fashion_mnist.yaml"))
    assert default.data == "fashion-mnist" and default.mode in ("batch", "joint")  # P x K
    openset = load_config(Path(CONFIGS[0]).with_name("openset.yaml"))  # the open-set protocol
    trained = set(openset.train.classes) - set(openset.train.val_classes)
    assert set(openset.train.val_classes) < set(openset.train.classes)  # class-disjoint val
    assert trained.isdisjoint({6, 7, 8, 9}) and set(openset.train.classes) == set(range(6))


def test_a_typo_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'") as error:
        load_config(None, ["train.lrr=0.1"])
    assert "train.lr" in str(error.value) and "train.batch_size" in str(error.value)
    with pytest.raises(ConfigError, match="unknown key 'epoch'; valid keys: name, data"):
        load_config(None, ["epoch=3"])


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
        load_config(None, [override])


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{typo}: unknown key 'trian'")):
        load_config(typo)


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["train.classes=[1,3]", "loss.soft=true", "name=x"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(config)
    assert config_from_dict(to_dict(config)) == config


def test_parse_override_keeps_data_specs_as_typed():
    assert parse_override("data=npz:1e3.npz") == {"data": "npz:1e3.npz"}
    assert parse_override("train.lr=0.5") == {"train": {"lr": 0.5}}
    assert "train.k" in valid_keys(Config)

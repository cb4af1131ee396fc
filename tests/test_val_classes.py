"""``train.val_classes`` as a list of ids, a count or a fraction of the training classes:
the draw (``draw_val_classes``), the config checks, and one resolution shared by training's
validation split and evaluation's threshold, tags and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.config import ConfigError, load_config
from deepmetric.data import class_split, load_dataset
from deepmetric.data.datasets import draw_val_classes, val_class_count
from deepmetric.evaluate import evaluate_run
from deepmetric.evaluate import run as evaluate_module
from deepmetric.evaluate.roc import choose_threshold
from deepmetric.models import embed
from deepmetric.training import load_trained, train
from deepmetric.training.builders import load_data, load_training_data, resolve_val_classes

CLASSES = 12


def write_many_class_npz(file: Path, n_train: int = 10, n_test: int = 6, seed: int = 0) -> Path:
    """``x``/``y`` and ``x_test``/``y_test``: each of ``CLASSES`` classes a fixed random
    256-vector template, each item that template plus noise (uint8 vectors, for an MLP)."""
    rng = np.random.default_rng(seed)
    templates = rng.random((CLASSES, 256)) > 0.7
    arrays = {}
    for key, per_class in (("", n_train), ("_test", n_test)):
        y = np.repeat(np.arange(CLASSES), per_class)
        x = templates[y] * 180.0 + rng.normal(30.0, 15.0, size=(len(y), 256))
        arrays[f"x{key}"] = np.clip(x, 0, 255).astype(np.uint8)
        arrays[f"y{key}"] = y.astype(np.int64)
    np.savez(file, **arrays)
    return file


# ------------------------------------------------------------------------------ the draw


def test_draw_is_deterministic_sorted_and_among_the_classes():
    ids = [3, 9, 4, 20, 7, 11, 5, 30, 2, 8]
    first = draw_val_classes(ids, 4, seed=1)
    assert first == draw_val_classes(ids, 4, seed=1)
    assert first == draw_val_classes(list(reversed(ids)) + ids, 4, seed=1)  # a set of ids
    assert first == sorted(first) and len(set(first)) == 4 and set(first) <= set(ids)
    draws = {tuple(draw_val_classes(range(50), 5, seed=s)) for s in range(10)}
    assert len(draws) > 5  # the seed matters
    nested = [set(draw_val_classes(range(50), n, seed=3)) for n in (2, 5, 20)]
    assert nested[0] < nested[1] < nested[2]  # a larger count holds out a superset


@pytest.mark.parametrize(
    ("n_classes", "spec", "count"),
    [(10, 2, 2), (10, 8, 8), (964, 300, 300), (10, 0.3, 3), (1000, 0.1, 100), (10, 0.25, 3),
     (30, 0.1, 3), (20, 0.15, 3), (7, 0.5, 4), (4, 0.5, 2)],
)  # fmt: skip
def test_count_and_fraction_arithmetic(n_classes, spec, count):
    assert val_class_count(n_classes, spec) == count  # fractions round halves up
    assert len(draw_val_classes(range(n_classes), spec, seed=0)) == count


def test_a_list_keeps_its_meaning():
    assert draw_val_classes(range(10), [4, 2, 4], seed=5) == [2, 4]
    assert draw_val_classes(range(10), [1], seed=0) == [1]  # the list [1], not a count


@pytest.mark.parametrize(
    ("n_classes", "spec", "message"),
    [
        (10, 1, "at least 2 validation classes"),
        (10, 9, "leaves 1 to train on"),
        (10, 10, "leaves 0 to train on"),
        (10, 0.1, "0.1 of 10 training classes is 1"),
        (10, 0.9, "leaves 1 to train on"),
        (10, 1.0, "must be in (0, 1)"),
        (10, 0.0, "must be in (0, 1)"),
        (10, float("nan"), "must be in (0, 1)"),
        (10, True, "a count or a fraction"),
    ],
)
def test_bad_counts_and_fractions(n_classes, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        draw_val_classes(range(n_classes), spec, seed=0)


# ---------------------------------------------------------------------------- the config


def test_config_reads_ints_as_counts_floats_as_fractions_lists_as_ids():
    assert load_config(None, ["train.val_classes=300"]).train.val_classes == 300
    assert load_config(None, ["train.val_classes=0.1"]).train.val_classes == 0.1
    assert load_config(None, ["train.val_classes=1e-1"]).train.val_classes == 0.1
    assert load_config(None, ["train.val_classes=[1,2]"]).train.val_classes == [1, 2]
    assert load_config(None, ["train.val_classes=null"]).train.val_classes is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.val_classes=1"],
            "train.val_classes=1: a count of validation classes must be >= 2",
        ),
        (["train.val_classes=0"], "train.val_classes=0: a count"),
        (["train.val_classes=-3"], "train.val_classes=-3: a count"),
        (["train.val_classes=1.0"], "train.val_classes=1.0: a fraction"),
        (["train.val_classes=1.5"], "train.val_classes=1.5: a fraction"),
        (["train.val_classes=-0.2"], "train.val_classes=-0.2: a fraction"),
        (["train.val_classes=true"], "train.val_classes: expected"),
        (["train.val_classes=abc"], "train.val_classes: expected"),
        (["train.val_classes=nan"], "train.val_classes must be a finite number"),
        (["train.classes=[0,1,2,3]", "train.val_classes=3"], "train.val_classes=3: of the 4"),
        (["train.val_classes=[3]"], "train.val_classes needs at least 2 classes"),
    ],
)
def test_bad_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_count_the_data_cannot_give_names_key_and_value(tmp_path):
    data = write_many_class_npz(tmp_path / "many.npz")
    config = load_config(None, [f"data=npz:{data}", "train.val_classes=11"])
    with pytest.raises(ConfigError) as info:
        load_data(config)
    message = str(info.value)
    assert message.startswith("train.val_classes=11 on npz:") and "leaves 1 to train on" in message
    fraction = load_config(None, [f"data=npz:{data}", "train.val_classes=0.05"])
    with pytest.raises(ConfigError, match=r"train.val_classes=0.05 .* is 1"):
        load_data(fraction)


# ------------------------------------------------------------------- one resolution


def test_training_split_is_class_disjoint_and_uses_the_drawn_classes(tmp_path):
    data = write_many_class_npz(tmp_path / "many.npz")
    for spec, count in (("3", 3), ("0.25", 3), ("0.5", 6)):
        config = load_config(None, [f"data=npz:{data}", f"train.val_classes={spec}", "seed=7"])
        drawn = draw_val_classes(range(CLASSES), config.train.val_classes, seed=7)
        split = load_training_data(config)
        assert split.val_classes == drawn == resolve_val_classes(config) and len(drawn) == count
        assert sorted(torch.unique(split.val.y).tolist()) == drawn
        assert not set(split.train.y.tolist()) & set(drawn)  # disjoint from training
        assert len(split.train) + len(split.val) == CLASSES * 10
    other_seed = load_config(None, [f"data=npz:{data}", "train.val_classes=3", "seed=8"])
    assert resolve_val_classes(other_seed) == draw_val_classes(range(CLASSES), 3, seed=8)
    # with train.classes, the count is drawn among those classes (no data needed)
    within = load_config(None, ["train.classes=[1,3,5,7,9,11]", "train.val_classes=0.5"])
    assert resolve_val_classes(within) == draw_val_classes([1, 3, 5, 7, 9, 11], 3, seed=0)
    assert load_training_data(load_config(None, [f"data=npz:{data}"])).val_classes is None


def test_train_and_evaluate_with_three_drawn_validation_classes(tmp_path):
    data = write_many_class_npz(tmp_path / "many.npz")
    run_dir = tmp_path / "run"
    overrides = [
        f"data=npz:{data}",
        f"out={run_dir}",
        "mode=batch",
        "loss.name=multi_similarity",
        "model.backbone=mlp",
        "model.dim=8",
        "epochs=1",
        "seed=3",
        "train.p=4",
        "train.k=4",
        "train.val_classes=3",
        "train.augment=false",
        "train.amp=false",
        "train.device=cpu",
    ]
    config = load_config(None, overrides)
    drawn = draw_val_classes(range(CLASSES), 3, seed=3)
    train(config, stream=None)
    assert load_config(run_dir / "config.yaml").train.val_classes == 3  # the user's spec kept

    metrics = evaluate_run(
        run_dir, device="cpu", embedding_map=False, progress=lambda _: None
    )  # the test split; the threshold from the validation classes
    assert metrics["data"]["val_classes"] == {"spec": 3, "count": 3, "ids": drawn}
    assert metrics["verification"]["threshold_source"] == "validation"
    saved = json.loads((run_dir / "threshold.json").read_text())
    assert saved["validation_items"] == 3 * 10  # every train item of those classes, no other
    # the same threshold, recomputed from exactly those classes' train items
    _, net = load_trained(run_dir)
    val_items, _ = class_split(load_dataset(f"npz:{data}", "train"), drawn)
    val_x, val_y = val_items.inputs[:], val_items.y
    val_emb = embed(net, val_x, torch.device("cpu"))
    _, _, dist, same = evaluate_module._pairs(val_emb, val_y, config.loss.metric, config.seed)
    assert saved["threshold"] == pytest.approx(choose_threshold(dist, same), abs=1e-6)

    # the train split: those classes are left out of the scored items, and tagged
    on_train = evaluate_run(
        run_dir,
        split="train",
        out=tmp_path / "ev_train",
        device="cpu",
        embedding_map=False,
        progress=lambda _: None,
    )
    assert on_train["data"]["excluded_validation_items"] == 30
    assert on_train["data"]["val_classes"]["ids"] == drawn
    assert on_train["data"]["items"] == (CLASSES - 3) * 10
    saved_config, _ = load_trained(run_dir)
    ds = load_training_data(saved_config).val
    assert evaluate_module._class_tags(saved_config, ds) == dict.fromkeys(drawn, "validation")

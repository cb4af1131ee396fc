"""``deepmetric evaluate`` on many-class, class-disjoint data: the few-shot episodes, the
threshold chosen on validation classes measured on the test classes, open-set identification,
and the statement of how many scored classes training saw. A small glyph set of the ``latin``
preset (fonts CI installs with ``make fonts GLYPH_PRESET=latin``)."""

import json
from pathlib import Path

import pytest
import torch

from deepmetric.cli import main as cli_main
from deepmetric.config import load_config
from deepmetric.data import glyphs, load_dataset
from deepmetric.distances import paired_at
from deepmetric.evaluate.fewshot import few_shot, raw_pixels
from deepmetric.evaluate.pairs import verification_pairs
from deepmetric.evaluate.roc import threshold_at_far
from deepmetric.models import embed
from deepmetric.training import load_trained, train
from deepmetric.training.builders import load_training_data

FLAGS = ["--ways", "5,all", "--shots", "1,3", "--episodes", "40", "--far", "0.1,0.05"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oneshot")
    quiet = {"progress": lambda _: None}
    glyphs.make_glyph_set(root / "set", preset="latin", classes=40, faces=6, folder=False, **quiet)
    overrides = [
        f"data=npz:{root / 'set' / 'glyphs.npz'}",
        f"out={root / 'run'}",
        "model.dim=16",
        "train.p=8",
        "train.k=3",
        "epochs=1",
        "train.val_classes=8",  # a count of the training classes, drawn with the seed
        "train.augment=false",
        "train.device=cpu",
    ]
    train(load_config(None, overrides), stream=None)
    return root / "run"


def test_few_shot_transfer_and_open_set_blocks(run, tmp_path, capsys):
    assert cli_main(["evaluate", str(run), "--out", str(tmp_path), "--no-map", *FLAGS]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["data"]["classes"] == 8 and m["data"]["classes_seen_in_training"] == 0
    assert "8 classes scored, none seen in training" in out
    # the episodes recomputed from the embeddings and the raw pixels: same seed, same numbers
    config, net = load_trained(run)
    test = load_dataset(config.data, "test")
    emb = embed(net, test.inputs)
    for vectors, block, metric in (
        (emb, m, config.loss.metric),
        (raw_pixels(test.inputs[:]), m["raw_input_baseline"], "euclidean"),
    ):
        for ways, shots, key, episodes, queries in (
            (5, 1, "one_shot", 40, 15),
            ("all", 1, "one_shot", 20, 5),
            (5, 3, "three_shot", 40, 15),
        ):
            want = few_shot(
                vectors,
                test.y,
                ways=ways,
                shots=shots,
                episodes=episodes,
                queries=queries,
                metric=metric,
                seed=config.seed,
            )
            got = block[key][f"{ways}-way"]
            assert got["accuracy"] == pytest.approx(want.accuracy, abs=1e-12)
            assert got["ci95"] == pytest.approx(want.ci95, abs=1e-12)
            assert got["episodes"] == episodes and got["queries"] == want.queries
    assert m["one_shot"]["all-way"]["ways"] == 8 and "all-way" not in m["three_shot"]
    assert "one-shot: 5-way" in out and "all-way (8)" in out and "three-shot: 5-way" in out
    # thresholds chosen on the validation classes' pairs at each FAR, measured on the test pairs
    val = load_training_data(config).val
    val_emb = embed(net, val.inputs)
    i, j, same = verification_pairs(val.y, seed=config.seed)
    val_dist = paired_at(val_emb, i, j, config.loss.metric)
    ti, tj, tsame = verification_pairs(test.y, seed=config.seed)
    test_dist = paired_at(emb, ti, tj, config.loss.metric)
    assert set(m["threshold_transfer"]) == {"1e-01", "5e-02"}
    for far in (0.1, 0.05):
        t = m["threshold_transfer"][f"{far:.0e}"]
        assert t["threshold"] == pytest.approx(threshold_at_far(val_dist, same, far))
        accepted = test_dist <= t["threshold"]
        assert t["far_reached"] == pytest.approx(float(accepted[~tsame].double().mean()))
        assert t["tar_reached"] == pytest.approx(float(accepted[tsame].double().mean()))
        assert t["far_validation"] <= far
    o = m["open_set"]
    assert (o["enrolled"], o["strangers"]) == (4, 4)
    assert o["genuine_probes"] == 4 * 5 and o["impostor_probes"] == 4 * 6
    for key in ("1e-01", "5e-02"):
        assert o["at_far"][key]["oracle"]["far_reached"] <= o["at_far"][key]["far_asked"]
        assert "validation" in o["at_far"][key]
    assert "FAR 0.1: validation threshold" in out and "open-set DIR" in out
    page = (tmp_path / "report.html").read_text()
    assert "Few-shot episodes" in page and "Open-set identification: 4 classes" in page
    assert "Thresholds chosen on the validation classes" in page
    assert "none of them seen in training" in page


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ways", "20"], "20-way 1-shot needs 20 classes with at least 2 items"),
        (["--ways", "5", "--shots", "6"], "5-way 6-shot needs 5 classes with at least 7 items"),
        (["--ways", "1"], "--ways takes integers >= 2 or 'all', got 1"),
        (["--shots", "0"], "--shots takes integers >= 1, got 0"),
        (["--episodes", "x"], "--episodes takes integers >= 1, got 'x'"),
        (["--far", "2"], "--far takes rates in (0, 1), got 2"),
    ],
)
def test_bad_few_shot_and_far_requests_are_one_line_errors(run, tmp_path, capsys, flags, message):
    out = tmp_path / "eval"
    assert cli_main(["evaluate", str(run), "--out", str(out), "--no-map", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepmetric: error:") and err.count("\n") == 1, err
    assert message in err
    assert not (out / "metrics.json").exists()


def test_the_default_plan_skips_ways_the_test_classes_cannot_give(run, tmp_path, capsys):
    assert cli_main(["evaluate", str(run), "--out", str(tmp_path), "--no-map"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["one_shot"]["skipped"] == {"20-way": "only 8 classes with at least 2 items"}
    assert set(m["five_shot"]) == {"5-way", "skipped"}
    assert m["one_shot"]["5-way"]["episodes"] == 1000
    assert set(m["open_set"]["at_far"]) == {"1e-02", "1e-03"}
    assert torch.isfinite(torch.tensor(m["one_shot"]["all-way"]["accuracy"]))

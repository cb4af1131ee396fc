"""Training from fixed pair and triplet files (``pairs:FILE``, ``triplets:FILE``): the loader and
its one-line errors, siamese and triplet runs on exactly those tuples (their validation keys),
the pairs run's threshold and ``deepmetric verify``, evaluation on a test pairs file, an exact
resume, and the refusals. Tiny PNG images and CSV files the tests write; CPU runs of a few
seconds."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tiny_data
import torch
from PIL import Image
from safetensors.torch import load_file

import deepmetric.data.tuples as tuples_module
from deepmetric.checkpoints import latest_checkpoint
from deepmetric.cli import main as cli_main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import SPEC_FORMS, DatasetError, load_dataset, load_image_folder, load_tuples
from deepmetric.data.training_data import load_training_tuples
from deepmetric.data.tuples import split_tuples
from deepmetric.distances import paired
from deepmetric.evaluate.roc import best_threshold, roc_auc
from deepmetric.evaluate.run import evaluate_run
from deepmetric.evaluate.threshold import threshold_of_pairs
from deepmetric.inference import Embedder, calibrate_threshold
from deepmetric.models import embed
from deepmetric.runs import Run
from deepmetric.training import resume_config, train
from deepmetric.training.modes import PairTuplesMode, TripletTuplesMode
from deepmetric.training.tuples import best_accuracy
from deepmetric.training.tuples import roc_auc as training_roc_auc

SMALL = [
    "train.device=cpu",
    "model.backbone=small_cnn",
    "model.dim=16",
    "image_size=28",
    "epochs=2",
    "train.batch_size=8",
    "train.val_fraction=0.2",
    "train.log_every=1",
    "train.augment=false",
    "train.amp=false",
    "loss.margin=1.0",
]
PAIRS = ["mode=siamese", "loss.name=contrastive"]
TRIPLETS = ["mode=triplet", "loss.name=triplet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuples")
    return {
        "pairs": tiny_data.make_pairs_csv(root / "pairs"),
        "triplets": tiny_data.make_triplets_csv(root / "triplets"),
        "test_pairs": tiny_data.make_pairs_csv(root / "test", pairs=40, seed=7),
    }


def _config(kind: str, csv: Path, out: Path, *extra: str):
    mode = PAIRS if kind == "pairs" else TRIPLETS
    return load_config(None, [f"data={kind}:{csv}", f"out={out}", *mode, *SMALL, *extra])


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, Path]:
    """One trained pairs run and one triplets run (read by several tests: copy before writing
    into them)."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("pairs", "triplets"):
        train(_config(kind, files[kind], root / kind), stream=None)
    return {"pairs": root / "pairs", "triplets": root / "triplets"}


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _png(path: Path, value: int, size: int = 10, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (np.arange(size * size).reshape(size, size) * 3 + value) % 256
    image = Image.fromarray(array.astype(np.uint8))
    (image.convert("RGB") if mode == "RGB" else image).save(path)
    return path


# ------------------------------------------------------------------------------ the loader


def test_pairs_load_with_each_distinct_image_decoded_once_as_folder_data_is(tmp_path, monkeypatch):
    a, b = _png(tmp_path / "img" / "a.png", 0), _png(tmp_path / "img" / "b.png", 50, mode="RGB")
    c = _png(tmp_path / "other" / "c.png", 90, size=14)
    (tmp_path / "list").mkdir()
    csv = tmp_path / "list" / "pairs.csv"
    csv.write_text(
        "A, B ,Same\n"  # the header, without case and surrounding spaces
        "../img/a.png,../img/b.png,1\n"
        "../img/./a.png,../other/c.png, different\n"
        f"{b},../other/c.png,TRUE\n"  # an absolute path
        "\n"  # blank lines are left out
        "../img/b.png,../img/a.png,false\n"
    )
    decoded: list[Path] = []
    real = tuples_module._decode_image

    def counting(path, *args):
        decoded.append(path)
        return real(path, *args)

    monkeypatch.setattr(tuples_module, "_decode_image", counting)
    data = load_tuples(f"pairs:{csv}", size=(12, 12))
    assert sorted(decoded) == sorted({a.resolve(), b.resolve(), c.resolve()})
    assert data.kind == "pairs" and len(data) == 4 and data.images.dtype == torch.uint8
    assert data.index.tolist() == [[0, 1], [0, 2], [1, 2], [1, 0]]
    assert data.same.tolist() == [True, False, True, False]
    assert tuple(data.images.shape) == (3, 3, 12, 12)  # one colour image: all RGB
    # the pixels are those of the folder loader reading the same files
    for name, path in (("x", a), ("y", b), ("z", c)):
        (tmp_path / "folder" / name).mkdir(parents=True)
        (tmp_path / "folder" / name / "i.png").write_bytes(path.read_bytes())
    folder = load_image_folder(tmp_path / "folder", size=(12, 12))
    assert torch.equal(folder.data, data.images)


def test_triplets_load_and_split_seeded_and_stratified(files):
    data = load_tuples(f"triplets:{files['triplets']}", size=28)
    assert data.kind == "triplets" and data.same is None and tuple(data.index.shape) == (60, 3)
    assert len(data.paths) == len(data.images) == 30
    train_part, val = split_tuples(data, 0.2, seed=3)
    assert len(val) == 12 and len(train_part) == 48
    again = split_tuples(data, 0.2, seed=3)[1]
    assert torch.equal(again.index, val.index)
    pairs = load_tuples(f"pairs:{files['pairs']}", size=28)
    _, val = split_tuples(pairs, 0.05, seed=0)  # 30 same + 30 different: 2 of each
    assert val.same.tolist().count(True) == 2 and val.same.tolist().count(False) == 2
    _, none = split_tuples(pairs, 0.0)
    assert len(none) == 0


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("pairs", None, "pairs.csv: file not found"),
        ("pairs", "x,y,z\na.png,a.png,1\na.png,a.png,0\n", "the header must be a,b,same"),
        ("pairs", "anchor,positive,negative\n", "that is a triplets file: use triplets:"),
        ("pairs", "a,b,same\na.png,a.png,1\na.png,a.png,maybe\n", "line 3: same must be 1/0"),
        ("pairs", "a,b,same\na.png,a.png,1\na.png,gone.png,0\n", "line 3: image 'gone.png' not"),
        ("pairs", "a,b,same\na.png,a.png,1\n", "1 pair row(s); at least 2 are needed"),
        ("pairs", "a,b,same\na.png,a.png\na.png,a.png,0\n", "line 2: 2 value(s), expected 3"),
        ("pairs", "a,b,same\na.png,,1\na.png,a.png,0\n", "line 2: no path in column b"),
        ("pairs", "a,b,same\nnote.txt,a.png,1\na.png,a.png,0\n", "line 2: "),
        ("triplets", "", "empty; the first line must be the header anchor,positive,negative"),
        ("triplets", "anchor,positive,negative\na.png,a.png,a.png\n", "1 triplet row(s)"),
    ],
    ids=[
        "missing file",
        "wrong header",
        "other kind's header",
        "bad same",
        "missing image",
        "one row",
        "short row",
        "empty path",
        "not an image",
        "empty file",
        "one triplet",
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, kind, text, message):
    _png(tmp_path / "a.png", 0)
    (tmp_path / "note.txt").write_text("not an image")
    csv = tmp_path / f"{kind}.csv"
    if text is not None:
        csv.write_text(text)
    with pytest.raises(DatasetError) as caught:
        load_tuples(f"{kind}:{csv}", size=8)
    error = str(caught.value)
    assert message in error and "\n" not in error and str(csv) in error


def test_the_specs_are_listed_and_not_read_as_classes(files):
    assert "pairs:FILE" in SPEC_FORMS and "triplets:FILE" in SPEC_FORMS
    with pytest.raises(DatasetError, match="holds fixed pairs and no classes"):
        load_dataset(f"pairs:{files['pairs']}")
    with pytest.raises(ValueError, match="not a tuples spec"):
        load_tuples("mnist")


# -------------------------------------------------------------------------------- training


def test_a_siamese_run_trains_on_the_pairs_and_validates_them(runs, files):
    run = runs["pairs"]
    config = Run.open(run).config
    tuples = load_training_tuples(config)
    assert (len(tuples.train), len(tuples.val)) == (48, 12)  # 0.2 of 30 same + 30 different
    epochs = _records(run, "epoch")
    assert len(epochs) == 2 and epochs[-1]["step"] == 2 * 6  # 48 pairs, 8 a batch
    for record in epochs:
        assert {"val_loss", "val_verification_accuracy", "val_roc_auc"} <= set(record)
        assert "val_precision_at_1" not in record and "val_map_at_r" not in record
        assert 0.5 <= record["val_verification_accuracy"] <= 1 and 0 <= record["val_roc_auc"] <= 1
    summary = _records(run, "summary")[0]
    assert summary["val_roc_auc"] == epochs[-1]["val_roc_auc"]
    assert "test_precision_at_1" not in summary
    assert Run.open(run).preprocessing().shape == (1, 28, 28)


def test_a_triplet_run_trains_on_the_triplets_and_validates_them(runs):
    epochs = _records(runs["triplets"], "epoch")
    assert len(epochs) == 2 and epochs[-1]["step"] == 2 * 6
    assert all(0 <= r["val_triplet_accuracy"] <= 1 and "val_roc_auc" not in r for r in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_the_progress_line_says_what_it_shows(files, tmp_path):
    stream = io.StringIO()
    train(_config("pairs", files["pairs"], tmp_path / "run", "epochs=1"), stream=stream)
    assert "val pairs: accuracy at the best threshold" in stream.getvalue()
    assert "ROC AUC" in stream.getvalue() and "precision@1" not in stream.getvalue()


def test_every_epoch_runs_exactly_the_tuples_in_a_seeded_order():
    mode = PairTuplesMode(10, None, batch_size=4, seed=5)
    first = torch.cat([b[: len(b) // 2] for b in mode.batches(0)])
    assert sorted((first // 2).tolist()) == list(range(10)) and (first % 2 == 0).all()
    for batch in mode.batches(0):  # each pair's second item right after the first half
        half = len(batch) // 2
        assert torch.equal(batch[half:], batch[:half] + 1)
    assert [b.tolist() for b in mode.batches(1)] != [b.tolist() for b in mode.batches(0)]
    again = PairTuplesMode(10, None, batch_size=4, seed=5)
    assert [b.tolist() for b in again.batches(1)] == [b.tolist() for b in mode.batches(1)]
    triplets = TripletTuplesMode(7, None, batch_size=3, seed=0)
    assert triplets.steps_per_epoch == 3
    items = torch.cat([b.view(3, -1).T.reshape(-1) for b in triplets.batches(0)])
    assert sorted(items.tolist()) == list(range(21))


def test_the_validation_scores_are_those_of_evaluate():
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 6, (200,), generator=g).double()  # many ties
    same = torch.rand(200, generator=g) < 0.4
    assert best_accuracy(d, same) == pytest.approx(best_threshold(d, same)[1])
    assert training_roc_auc(d, same) == pytest.approx(roc_auc(d, same))
    assert np.isnan(training_roc_auc(d, torch.ones(200, dtype=torch.bool)))


def test_a_pairs_run_resumes_mid_epoch_exactly(files, tmp_path, monkeypatch):
    extra = ("train.augment=true", "epochs=2")
    train(_config("pairs", files["pairs"], tmp_path / "full", *extra), stream=None)
    fit_module = importlib.import_module("deepmetric.training.fit")  # the module, not fit()
    real = fit_module.set_lr

    def stop_at_step_8(optimizer, plan, step):  # batch 3 of epoch 2: SIGTERM, as a scheduler
        if step == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(optimizer, plan, step)

    monkeypatch.setattr(fit_module, "set_lr", stop_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(_config("pairs", files["pairs"], tmp_path / "cut", *extra), stream=None)
    monkeypatch.setattr(fit_module, "set_lr", real)
    assert latest_checkpoint(tmp_path / "cut").name == "epoch0001-batch000003"
    train(resume_config(tmp_path / "cut"), resume=True, stream=None)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [(r["step"], r["loss"]) for r in _records(tmp_path / "cut", "step")]
    assert steps == [(r["step"], r["loss"]) for r in _records(tmp_path / "full", "step")]
    assert _records(tmp_path / "cut", "epoch") == _records(tmp_path / "full", "epoch")


# ------------------------------------------------------------------ threshold and verify


def test_the_pairs_runs_threshold_is_chosen_on_its_validation_pairs(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["pairs"], run)
    config = Run.open(run).config
    net = Run.open(run).network().net
    val = load_training_tuples(config).val
    emb = embed(net, val.images.float() / 255)
    d = paired(emb[val.index[:, 0]], emb[val.index[:, 1]], config.loss.metric)
    expected = threshold_of_pairs(d, val.same)

    model = Embedder.from_run(run, device="cpu", progress=lambda _: None)
    assert model.threshold.value == pytest.approx(expected, rel=1e-5)
    assert model.threshold.validation_items == 12 and (run / "threshold.json").exists()
    assert calibrate_threshold(run, far=0.5, save=False, progress=lambda _: None).far == 0.5

    images = Run.open(run).config.data.partition(":")[2]
    first, second = (Path(images).parent / "images" / f"{i:04d}.png" for i in (0, 1))
    assert cli_main(["verify", str(run), str(first), str(second), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == pytest.approx(expected, rel=1e-5) and out["same"] in (True, False)


def test_a_triplets_run_has_no_threshold_and_says_why(runs, files, capsys):
    image = files["triplets"].parent / "images" / "0000.png"
    assert cli_main(["verify", str(runs["triplets"]), str(image), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on triplets" in err and "no threshold" in err and "\n" not in err
    assert "calibrate_threshold(" in err


# ------------------------------------------------------------------------------ evaluation


def test_evaluate_on_a_test_pairs_file(runs, files, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["pairs"], run)
    spec = f"pairs:{files['test_pairs']}"
    m = evaluate_run(run, data=spec, device="cpu", progress=lambda _: None)
    v, raw = m["verification"], m["raw_input_baseline"]
    used = len(torch.unique(load_tuples(spec, size=28).index))  # the images the pairs use
    expected = {"kind": "pairs", "count": 40, "images": used, "positive": 20, "negative": 20}
    assert m["tuples"] == expected
    assert v["threshold_source"] == "validation" and 0 <= v["accuracy"] <= 1
    assert {"roc_auc", "eer", "tar_at_far", "accuracy_cross_validated"} <= set(v)
    assert v["tar_at_far"] == {} and len(v["tar_at_far_skipped"]) == 2  # 20 negative pairs
    assert v["threshold"] == Run.open(run).threshold().value  # saved: the validation pairs'
    assert raw["threshold_source"] == "cross-validation" and 0 <= raw["roc_auc"] <= 1
    written = json.loads((run / "eval" / "metrics.json").read_text())
    assert written["tuples"]["count"] == 40 and written["data"]["spec"] == spec
    assert "raw pixels" in (run / "eval" / "report.html").read_text()
    m = evaluate_run(run, data=spec, device="cpu", fars=(0.1,), out=tmp_path / "e")
    assert list(m["verification"]["tar_at_far"]) == ["1e-01"]
    # the run's own file, --split test: its validation pairs, cross-validated
    assert cli_main(["evaluate", str(run), "--out", str(tmp_path / "own"), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert "12 pairs (6 same): verification accuracy" in line and "cross-validation" in line


def test_evaluate_a_triplets_run_on_its_validation_triplets(runs, tmp_path):
    m = evaluate_run(runs["triplets"], out=tmp_path / "e", device="cpu", progress=lambda _: None)
    assert m["tuples"]["kind"] == "triplets" and m["tuples"]["count"] == 12
    assert 0 <= m["triplets"]["accuracy"] <= 1 and "accuracy" in m["raw_input_baseline"]
    assert (tmp_path / "e" / "report.html").exists()


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kind", "overrides", "message"),
    [
        ("pairs", ["mode=batch"], "it trains with mode=siamese loss.name=contrastive"),
        ("pairs", ["mode=siamese"], "with loss.name=contrastive, not loss.name=triplet"),
        ("triplets", ["mode=siamese", "loss.name=contrastive"], "trains with mode=triplet"),
        ("pairs", [*PAIRS, "train.classes=[0,1]"], "train.classes chooses classes"),
        ("triplets", [*TRIPLETS, "train.val_classes=2"], "train.val_classes chooses classes"),
        ("pairs", [*PAIRS, "mode=triplet", "loss.name=triplet"], "holds fixed pairs"),
    ],
    ids=["batch mode", "wrong loss", "pairs mode on triplets", "classes", "val classes", "triplet"],
)
def test_other_modes_losses_and_class_options_are_refused(
    files, tmp_path, capsys, kind, overrides, message
):
    args = [f"data={kind}:{files[kind]}", f"out={tmp_path / 'x'}", *overrides]
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not (tmp_path / "x").exists()

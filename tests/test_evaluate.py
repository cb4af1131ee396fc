"""``deepmetric evaluate`` end to end on a run trained on a small IDX data set."""

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from synthetic import write_learnable_idx

from deepmetric.checkpoints import weights_sha256
from deepmetric.cli import main as cli_main
from deepmetric.config import load_config
from deepmetric.data import ArrayDataset, load_dataset
from deepmetric.distances import paired
from deepmetric.evaluate import evaluate_run, out_of_fold, retrieval_metrics, verification_pairs
from deepmetric.evaluate import run as evaluate_module
from deepmetric.models import embed
from deepmetric.training import load_data, load_trained, train, untrained_network

FIGURES = [
    "loss_curves.png",
    "distances.png",
    "roc.png",
    "per_class.png",
    "map_at_r_per_class.png",
    "retrieval.png",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    data = write_learnable_idx(root / "toy", n_classes=6, n_train=40, n_test=20)
    overrides = [
        f"data=idx:{data}",
        f"out={root / 'run'}",
        "model.dim=16",
        "train.p=3",
        "train.k=4",
        "epochs=3",
        "train.val_fraction=0.2",
        "train.classes=[0,1,2,3]",
        "train.device=cpu",  # the tests recompute on the CPU (tests/test_cuda.py: CUDA)
    ]
    train(load_config(None, overrides), stream=None)
    return root / "run", data


def test_untrained_network_is_the_initial_network_of_a_run(tmp_path):
    """Training with a learning rate far below float32 resolution leaves the weights as they
    were drawn: they equal untrained_network's (joint mode: the head is built after)."""
    data = write_learnable_idx(tmp_path / "toy", n_classes=4, n_train=12, n_test=4)
    for mode in ("joint", "batch"):
        overrides = [
            f"data=idx:{data}",
            f"out={tmp_path / mode}",
            f"mode={mode}",
            "seed=7",
            "epochs=1",
            "train.k=4",
            "train.optimizer=sgd",
            "train.momentum=0",
            "train.lr=1e-30",
            "train.schedule=none",
            "train.device=cpu",
        ]
        train(load_config(None, overrides), stream=None)
        config, trained_net = load_trained(tmp_path / mode)
        start = untrained_network(config, torch.zeros(1, 1, 28, 28))
        after, before = trained_net.state_dict(), start.state_dict()
        assert after.keys() == before.keys()
        # BatchNorm's running statistics follow the batches whatever the learning rate, and its
        # biases start at 0, where a 1e-30 step is representable: equal to 1e-25
        weights = [k for k in after if not k.endswith(("running_mean", "running_var", "tracked"))]
        close = [torch.allclose(after[k], before[k], rtol=0, atol=1e-25) for k in weights]
        assert all(close), mode
        assert len(weights) < len(after)  # the default network has BatchNorm
        other = untrained_network(
            load_config(None, [*overrides, "seed=8"]), torch.zeros(1, 1, 28, 28)
        )
        assert not torch.equal(other.state_dict()["fc.weight"], before["fc.weight"])


def test_evaluate_writes_metrics_figures_report_and_threshold(trained, tmp_path, capsys):
    run_dir, idx_dir = trained
    # on the CPU, as the values recomputed here (1e-9)
    metrics = evaluate_run(run_dir, embedding_map=True, device="cpu", progress=lambda _: None)
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for key in (
        "precision_at_1",
        "r_precision",
        "map_at_r",
        "recall_at_k",
        "nmi",
        "verification",
        "per_class",
    ):
        assert key in saved, key
    v = saved["verification"]
    for key in ("accuracy", "roc_auc", "eer", "tar_at_far", "threshold"):
        assert key in v, key
    assert "validation split" in v["protocol"]  # never chosen on the scored pairs
    assert saved["data"]["items"] == 120 and len(saved["per_class"]) == 6
    assert 0 <= saved["map_at_r"] <= saved["r_precision"] + 1e-9 <= 1 + 1e-9
    assert saved["precision_at_1"] > 0.8 and v["roc_auc"] > 0.8
    assert set(saved["recall_at_k"]) == {"1", "2", "4", "8"}
    assert saved["recall_at_k"]["1"] == pytest.approx(saved["precision_at_1"])
    unseen = saved["unseen_classes"]
    test_set = load_dataset(f"idx:{idx_dir}", "test")  # the honest baseline: raw pixels
    raw = saved["raw_input_baseline"]
    expected = retrieval_metrics(F.normalize(test_set.x.flatten(1), dim=1), test_set.y)
    assert raw["precision_at_1"] == pytest.approx(expected["precision_at_1"])
    assert raw["map_at_r"] == pytest.approx(expected["map_at_r"])
    assert "raw_input_baseline" in unseen and 0 <= unseen["raw_input_baseline"]["map_at_r"] <= 1
    # the other honest baseline: the same architecture with its initial, untrained weights
    config, _ = load_trained(run_dir)
    start = embed(untrained_network(config, test_set.inputs[:1]), test_set.inputs)
    seen_ids = torch.tensor([0, 1, 2, 3])  # train.classes
    for block, keep in ((saved, slice(None)), (unseen, ~torch.isin(test_set.y, seen_ids))):
        want = retrieval_metrics(start[keep], test_set.y[keep])
        got = block["untrained_network_baseline"]
        assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-9)
        assert got["precision_at_1"] == pytest.approx(want["precision_at_1"], abs=1e-9)
    assert saved["map_at_r"] > saved["untrained_network_baseline"]["map_at_r"]  # it trained
    assert "never seen" in unseen["note"] and len(unseen["per_class"]) == 2
    # per-class retrieval, network and raw pixels, for all classes and for the unseen ones
    emb = embed(load_trained(run_dir)[1], test_set.inputs)
    pixels = F.normalize(test_set.x.flatten(1), dim=1)
    for block, keep in ((saved, slice(None)), (unseen, ~torch.isin(test_set.y, seen_ids))):
        for got, x in ((block, emb), (block["raw_input_baseline"], pixels)):
            want = retrieval_metrics(x[keep], test_set.y[keep], per_class=True)["by_class"]
            assert [r["class"] for r in got["by_class"]] == [r["class"] for r in want]
            for g, w in zip(got["by_class"], want):
                assert g["map_at_r"] == pytest.approx(w["map_at_r"], abs=1e-6)
                assert g["confused_with"] == w["confused_with"]
    assert [r["class"] for r in unseen["by_class"]] == [4, 5]
    # which scored classes training saw; few-shot and open-set blocks for both
    assert saved["data"]["classes"] == 6 and saved["data"]["classes_seen_in_training"] == 4
    assert set(saved["one_shot"]) == {"5-way", "all-way", "skipped"}
    assert set(unseen["one_shot"]) == {"all-way", "skipped"}  # two unseen classes
    assert unseen["one_shot"]["all-way"]["ways"] == 2
    assert unseen["open_set"]["enrolled"] == 1 and unseen["open_set"]["strangers"] == 1
    assert set(unseen["threshold_transfer"]) == {"1e-02", "1e-03"}
    # Beside the validation threshold's accuracy: the 10-fold cross-validated one on the same
    # pairs (what carrying the threshold over costs), for all classes and the unseen ones.
    for block, keep in ((saved, slice(None)), (unseen, ~torch.isin(test_set.y, seen_ids))):
        cv, _ = _out_of_fold_per_class(emb[keep], test_set.y[keep], config.loss.metric, config.seed)
        got = block["verification"]["accuracy_cross_validated"]
        assert got == pytest.approx(statistics.fmean(cv.accuracies), abs=1e-12)
        assert block["verification"]["threshold_source"] == "validation"
    assert saved["data"]["class_names"] == [str(c) for c in range(6)]
    cats = saved["triplet_categories"]
    assert cats["easy"] + cats["semi_hard"] + cats["hard"] == pytest.approx(1.0)
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["threshold"] == v["threshold"] == metrics["verification"]["threshold"]
    _, net = load_trained(run_dir)  # the threshold names the weights it was chosen for
    assert threshold["weights_sha256"] == weights_sha256(net.state_dict())
    for name in [*FIGURES, "embedding_map.png"]:
        assert (run_dir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (run_dir / "eval" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: opens offline
    assert "Per class" in page and "Classes never seen in training" in page
    assert page.count("The network against the raw inputs") == 2  # all classes, unseen ones
    assert page.count("Retrieval per class, the network against the raw inputs") == 2
    assert page.count("untrained network: the same retrieval metrics") == 2
    assert page.count("verification accuracy, 10-fold cross-validated") == 2
    # the command line's unseen-class line gives both accuracies, as metrics.json has them
    argv = ["evaluate", str(run_dir), "--out", str(tmp_path), "--no-map", "--device", "cpu"]
    assert cli_main(argv) == 0
    u = unseen["verification"]
    want = (
        f"\n  verification accuracy {u['accuracy']:.4f} (threshold {u['threshold']:.4f}, "
        f"validation), 10-fold cross-validated on these pairs {u['accuracy_cross_validated']:.4f}"
    )
    assert want in capsys.readouterr().out


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder``: its modification time and its bytes."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_evaluate_command_line_on_other_data_keeps_the_run_threshold(trained, capsys):
    run_dir, data = trained
    saved = run_dir / "threshold.json"
    sentinel = '{"threshold": 0.5, "metric": "euclidean", "protocol": "validation"}'
    saved.write_text(sentinel)
    stamp = saved.stat().st_mtime_ns
    argv = ["evaluate", str(run_dir), "--data", f"idx:{data}", "--split", "train", "--no-map"]
    assert cli_main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "precision@1" in printed and "MAP@R" in printed and "cross-validation" in printed
    # the unseen classes 4, 5, each with its MAP@R and the raw pixels' in brackets
    assert re.search(r"per class, MAP@R \(raw inputs\): 4 [01]\.\d{3} \([01]\.\d{3}\)", printed)
    assert re.search(r"; 5 [01]\.\d{3} \([01]\.\d{3}\)", printed)
    # and their verification, judged by their own cross-validation (no validation threshold)
    assert re.search(r"\n  verification accuracy [01]\.\d{4} \(threshold .*, cross-valid", printed)
    assert saved.read_text() == sentinel and saved.stat().st_mtime_ns == stamp
    saved_metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    v = saved_metrics["verification"]
    assert saved_metrics["data"]["split"] == "train" and saved_metrics["data"]["items"] == 240
    assert v["threshold_source"] == "cross-validation"  # no validation split for --data
    assert "cross-validation" in v["protocol"] and len(v["fold_thresholds"]) == 10
    page = (run_dir / "eval" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)  # --no-map


def test_evaluate_out_split_train_on_cpu_writes_only_into_out(trained, tmp_path):
    run_dir, _ = trained
    before = _snapshot(run_dir)
    out = tmp_path / "out"
    metrics = evaluate_run(
        run_dir, split="train", out=out, device="cpu", embedding_map=False, progress=lambda _: None
    )
    assert _snapshot(run_dir) == before  # --out: nothing written outside it
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "report.html", "roc.png"}
    config, _ = load_trained(run_dir)
    train_part, val_part = load_data(config)
    about = metrics["data"]
    assert about["device"] == "cpu" and about["split"] == "train"
    # The threshold was fitted on the validation items: they are not scored.
    assert metrics["verification"]["threshold_source"] == "validation"
    assert about["excluded_validation_items"] == len(val_part) > 0
    assert about["items"] == 240 - len(val_part) == len(train_part) + 2 * 40
    per_class = {row["class"]: row["n"] for row in metrics["per_class"]}
    seen = {c: int((train_part.y == c).sum()) for c in range(4)}
    assert per_class == {**seen, 4: 40, 5: 40}  # classes 4, 5: never trained on, all scored
    assert len(metrics["unseen_classes"]["per_class"]) == 2


def _out_of_fold_per_class(emb, labels, metric, seed):
    """The cross-validated decisions on the verification pairs, and per class, by loops,
    (TAR + TNR) / 2 of those decisions over the pairs of that class."""
    i, j, same = verification_pairs(labels, seed=seed)
    cv = out_of_fold(paired(emb[i], emb[j], metric), same, seed=seed, groups=i * len(labels) + j)
    lab, il, jl, acc = labels.tolist(), i.tolist(), j.tolist(), cv.accepted.tolist()
    per_class = {}
    for c in sorted(set(lab)):
        pos = [acc[k] for k in range(len(il)) if lab[il[k]] == lab[jl[k]] == c]
        neg = [
            not acc[k]
            for k in range(len(il))
            if lab[il[k]] != lab[jl[k]] and c in (lab[il[k]], lab[jl[k]])
        ]
        per_class[c] = (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2
    return cv, per_class


def test_evaluate_without_validation_split_judges_every_pair_out_of_fold(
    trained, tmp_path, monkeypatch
):
    trained_dir, data = trained
    monkeypatch.setattr(evaluate_module, "_figures", lambda *args: [])  # not under test here
    # A run without a validation split: evaluation reads only its config and checkpoint, so the
    # trained run with train.val_fraction=0 in its config stands for one (no second training).
    # Its train.device names CUDA, which evaluation ignores (it runs where it is told).
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir / "checkpoints", run_dir / "checkpoints")
    values = yaml.safe_load((trained_dir / "config.yaml").read_text())
    values["train"]["val_fraction"] = 0.0
    values["train"]["device"] = "cuda"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(values))
    metrics = evaluate_run(run_dir, embedding_map=False, device="cpu", progress=lambda _: None)
    assert metrics["data"]["device"] == "cpu"
    assert not (run_dir / "threshold.json").exists()  # fitted on the scored pairs: not saved
    config, net = load_trained(run_dir)
    test_set = load_dataset(f"idx:{data}", "test")
    emb = embed(net, test_set.x)
    metric = config.loss.metric
    cv, want = _out_of_fold_per_class(emb, test_set.y, metric, config.seed)
    v = metrics["verification"]
    assert v["threshold_source"] == "cross-validation"
    assert v["fold_thresholds"] == cv.thresholds
    assert v["threshold"] == statistics.median(cv.thresholds)  # for information only
    assert v["accuracy"] == pytest.approx(statistics.fmean(cv.accuracies), abs=1e-12)
    got = {row["class"]: row["verification_accuracy"] for row in metrics["per_class"]}
    assert got == pytest.approx(want, abs=1e-12)
    # The unseen classes: their own cross-validation on their own pairs.
    unseen = test_set.y >= 4
    _, want = _out_of_fold_per_class(emb[unseen], test_set.y[unseen], metric, config.seed)
    u = metrics["unseen_classes"]
    assert u["verification"]["threshold_source"] == "cross-validation"
    got = {row["class"]: row["verification_accuracy"] for row in u["per_class"]}
    assert got == pytest.approx(want, abs=1e-12)


def test_evaluate_command_line_errors_are_one_line(trained, tmp_path, capsys):
    run_dir, _ = trained
    bad = [
        (["evaluate", str(tmp_path / "missing")], "not a run folder"),
        (["evaluate", str(run_dir), "--device", "nonsense"], "device 'nonsense'"),
        (["evaluate", str(run_dir), "--data", f"idx:{tmp_path / 'nowhere'}"], "nowhere"),
    ]
    if not torch.cuda.is_available():
        bad.append((["evaluate", str(run_dir), "--device", "cuda"], "device 'cuda'"))
    for argv, message in bad:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deepmetric: error:") and err.count("\n") == 1, err
        assert message in err


def test_class_tags_name_unseen_and_validation_classes():
    ds = ArrayDataset(torch.zeros(6, 1, 2, 2), torch.tensor([0, 1, 2, 3, 4, 5]), list("abcdef"))
    tags = evaluate_module._class_tags
    config = load_config(None, ["train.classes=[0,1,2,3]", "train.val_classes=[1,2]"])
    assert tags(config, ds) == {4: "unseen", 5: "unseen", 1: "validation", 2: "validation"}
    assert tags(load_config(None, []), ds) == {}

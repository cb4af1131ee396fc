"""``deepmetric evaluate`` end to end on a run trained on a small IDX data set."""

import json
import re
from pathlib import Path

import pytest
from synthetic import write_learnable_idx

from deepmetric.cli import main as cli_main
from deepmetric.config import load_config
from deepmetric.evaluate import evaluate_run
from deepmetric.train import train

FIGURES = ["loss_curves.png", "distances.png", "roc.png", "per_class.png", "retrieval.png"]


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
    ]
    train(load_config(None, overrides), stream=None)
    return root / "run", data


def test_evaluate_writes_metrics_figures_report_and_threshold(trained):
    run_dir, _ = trained
    metrics = evaluate_run(run_dir, embedding_map=True, progress=lambda _: None)
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
    assert "never seen" in unseen["note"] and len(unseen["per_class"]) == 2
    cats = saved["triplet_categories"]
    assert cats["easy"] + cats["semi_hard"] + cats["hard"] == pytest.approx(1.0)
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["threshold"] == v["threshold"] == metrics["verification"]["threshold"]
    for name in [*FIGURES, "embedding_map.png"]:
        assert (run_dir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (run_dir / "eval" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES) + 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: opens offline
    assert "Per class" in page and "Classes never seen in training" in page


def test_evaluate_command_line(trained, tmp_path, capsys):
    run_dir, data = trained
    out = tmp_path / "other"
    assert (
        cli_main(
            [
                "evaluate",
                str(run_dir),
                "--data",
                f"idx:{data}",
                "--split",
                "train",
                "--out",
                str(out),
                "--no-map",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "precision@1" in printed and "MAP@R" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["data"]["split"] == "train" and saved["data"]["items"] == 240
    assert "cross-validation" in saved["verification"]["protocol"]  # no val split for --data
    assert not (out / "embedding_map.png").exists()
    assert cli_main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err

"""Model selection on validation classes only: score trained runs on their own validation classes.

``python benchmarks/glyphs_select.py RUN [RUN ...] [--out results.jsonl]`` embeds each run's
validation split (``train.val_classes``: classes held out of training, disjoint from the test
classes) and prints precision@1, MAP@R, 20-way 1-shot and all-way 1-shot on them; with ``--out``
each result is appended as one JSON line (with the run's settings), so every setting measured is
kept. The test classes are never read: this is how ``configs/glyphs.yaml`` was chosen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepmetric.evaluate.fewshot import few_shot
from deepmetric.evaluate.metrics import retrieval_metrics
from deepmetric.models import embed
from deepmetric.training import load_trained
from deepmetric.training.builders import load_training_data


def score(run: Path) -> dict[str, object]:
    """The validation-class figures of one run folder."""
    config, net = load_trained(run)
    data = load_training_data(config)
    if data.val is None or data.val_classes is None:
        raise SystemExit(f"{run}: no validation classes (set train.val_classes)")
    started = time.perf_counter()
    emb = embed(net, data.val.inputs, torch.device("cpu"))
    labels = data.val.y
    metric = config.loss.metric
    r = retrieval_metrics(emb, labels, metric=metric)
    twenty = few_shot(emb, labels, ways=20, shots=1, episodes=1000, queries=15, metric=metric)
    every = few_shot(emb, labels, ways="all", shots=1, episodes=20, queries=5, metric=metric)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    seconds = next((e.get("seconds") for e in reversed(log) if e.get("kind") == "summary"), None)
    return {
        "run": str(run),
        "settings": {
            "backbone": config.model.backbone,
            "dim": config.model.dim,
            "loss": config.loss.name,
            "mining": config.loss.mining if config.loss.name == "triplet" else None,
            "margin": config.loss.margin,
            "epochs": config.epochs,
            "p": config.train.p,
            "k": config.train.k,
            "augment": config.train.augment,
            "lr": config.train.lr,
            "seed": config.seed,
        },
        "val_classes": len(data.val_classes),
        "precision_at_1": r["precision_at_1"],
        "map_at_r": r["map_at_r"],
        "20-way 1-shot": [twenty.accuracy, twenty.ci95],
        "all-way 1-shot": [every.accuracy, every.ci95],
        "train_seconds": seconds,
        "score_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="append one JSON line per run here")
    args = parser.parse_args()
    for run in args.runs:
        result = score(run)
        print(json.dumps(result))
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

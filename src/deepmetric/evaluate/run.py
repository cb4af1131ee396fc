"""``deepmetric evaluate RUN_DIR``: every metric, figure and the report of a trained run.

Writes into ``RUN_DIR/eval/`` (or ``out``): ``metrics.json``, ``report.html`` and the figures
as PNG files, and saves the verification threshold in ``RUN_DIR/threshold.json`` for ``verify``
and the gallery. The threshold is chosen on the run's validation split (the same items training
held out), or by 10-fold cross-validation on the test pairs when the run has none; it is never
chosen on the pairs it is scored on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmetric.config import ConfigError
from deepmetric.data import ArrayDataset, load_dataset
from deepmetric.distances import paired
from deepmetric.evaluate import figures
from deepmetric.evaluate.metrics import clustering_nmi, nearest_neighbors, retrieval_metrics
from deepmetric.evaluate.report import write_report
from deepmetric.evaluate.verification import (
    choose_threshold,
    cross_validated_accuracy,
    eer,
    per_class_table,
    roc_curve,
    test_triplet_categories,
    verification_metrics,
    verification_pairs,
)
from deepmetric.models import embed
from deepmetric.training import load_data, load_trained, resolve_device

Progress = Callable[[str], None]


def _pair_distances(
    emb: torch.Tensor, labels: torch.Tensor, metric: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    i, j, same = verification_pairs(labels, seed=seed)
    return paired(emb[i], emb[j], metric), same


def retrieval_and_verification(
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str,
    margin: float,
    threshold: float | None,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one labelled set of embeddings. ``threshold=None``: choose it by 10-fold
    cross-validation on these pairs (the LFW protocol) and report the cross-validated accuracy."""
    out: dict[str, Any] = dict(retrieval_metrics(emb, labels, metric=metric))
    out["nmi"] = clustering_nmi(emb, labels, seed=seed)
    dist, same = _pair_distances(emb, labels, metric, seed)
    if threshold is None:
        accuracy, std, thresholds = cross_validated_accuracy(dist, same, seed=seed)
        threshold = float(np.median(thresholds))
        verification = verification_metrics(dist, same, threshold=threshold)
        verification["accuracy"], verification["accuracy_std"] = accuracy, std
        protocol = "threshold chosen by 10-fold cross-validation on these pairs (LFW protocol)"
    else:
        verification = verification_metrics(dist, same, threshold=threshold)
        protocol = "threshold chosen on the run's validation split, not on these pairs"
    verification["protocol"] = protocol
    verification["pairs"] = {"positive": int(same.sum()), "negative": int((~same).sum())}
    out["verification"] = verification
    out["per_class"] = per_class_table(emb, labels, metric=metric, threshold=threshold, seed=seed)
    out["triplet_categories"] = {
        **test_triplet_categories(emb, labels, margin=margin, metric=metric, seed=seed),
        "margin": margin,
    }
    out["_pairs"] = (dist, same)  # for the figures; dropped before writing JSON
    return out


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    embedding_map: bool = True,
    progress: Progress = print,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` on ``split`` of ``data`` (default: the
    run's own data set); return the metrics written to ``metrics.json``."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    config, net = load_trained(run_dir)
    device = resolve_device(config.train.device)
    net.to(device)
    spec = data or config.data
    opts = {"size": (config.image_size,) * 2} if spec.startswith("folder:") else {}
    test_set: ArrayDataset = load_dataset(spec, split, **opts)  # type: ignore[arg-type]
    if len(torch.unique(test_set.y)) < 2:
        raise ConfigError(f"{spec} ({split}) has fewer than 2 classes: nothing to evaluate")
    names = test_set.classes or [str(c) for c in range(int(test_set.y.max()) + 1)]
    metric, margin = config.loss.metric, config.loss.margin
    out_dir = Path(out) if out else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    progress(f"embedding {len(test_set):,} {split} items of {spec}")
    emb = embed(net, test_set.x, device)

    threshold = None
    if data is None and config.train.val_fraction > 0:
        _, val_set = load_data(config)
        if len(torch.unique(val_set.y)) >= 2:
            val_emb = embed(net, val_set.x, device)
            threshold = choose_threshold(*_pair_distances(val_emb, val_set.y, metric, config.seed))
    progress("metrics")
    metrics = retrieval_and_verification(
        emb, test_set.y, metric=metric, margin=margin, threshold=threshold, seed=config.seed
    )
    dist, same = metrics.pop("_pairs")
    if config.train.classes is not None:
        unseen = ~torch.isin(test_set.y, torch.as_tensor(config.train.classes))
        if len(torch.unique(test_set.y[unseen])) >= 2:
            unseen_metrics = retrieval_and_verification(
                emb[unseen],
                test_set.y[unseen],
                metric=metric,
                margin=margin,
                threshold=metrics["verification"]["threshold"],
                seed=config.seed,
            )
            unseen_metrics.pop("_pairs")
            unseen_metrics["note"] = "classes not in train.classes: never seen in training"
            metrics["unseen_classes"] = unseen_metrics

    progress("figures")
    figs = _figures(
        run_dir,
        out_dir,
        metrics,
        emb,
        test_set,
        names,
        dist,
        same,
        metric,
        embedding_map,
        config.seed,
    )
    metrics["data"] = {"spec": spec, "split": split, "items": len(test_set), "metric": metric}
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "metrics.json").write_text(json.dumps(_strict(metrics), indent=2))
    (run_dir / "threshold.json").write_text(
        json.dumps(
            {
                "threshold": metrics["verification"]["threshold"],
                "metric": metric,
                "protocol": metrics["verification"]["protocol"],
            },
            indent=2,
        )
    )
    facts = [
        ("run", str(run_dir)),
        ("data", f"{spec} ({split}, {len(test_set):,} items)"),
        ("model", f"{config.model.backbone} → {config.model.dim}-d, {metric} distance"),
        (
            "trained with",
            f"{config.mode} mode, {config.loss.name} loss"
            + (f" ({config.loss.mining})" if config.loss.name == "triplet" else "")
            + f", margin {margin}, {config.epochs} epochs",
        ),
    ]
    write_report(
        out_dir / "report.html",
        title=f"deepmetric evaluation: {config.name}",
        metrics=metrics,
        class_names=names,
        figures=figs,
        facts=facts,
    )
    progress(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'}")
    return metrics


def _strict(value: Any) -> Any:
    """NaN / inf (e.g. a class with a single item) become null: strict JSON for any reader."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _figures(
    run_dir: Path,
    out_dir: Path,
    metrics: dict[str, Any],
    emb: torch.Tensor,
    test_set: ArrayDataset,
    names: list[str],
    dist: torch.Tensor,
    same: torch.Tensor,
    metric: str,
    embedding_map: bool,
    seed: int,
) -> list[tuple[Path, str]]:
    figs: list[tuple[Path, str]] = []
    log = run_dir / "log.jsonl"
    if log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        figs.append(
            (
                figures.loss_curves(records, out_dir / "loss_curves.png"),
                "Training loss per step and per epoch, validation loss and precision@1.",
            )
        )
    v = metrics["verification"]
    d, s = dist.numpy(), same.numpy()
    figs.append(
        (
            figures.distance_histograms(d[s], d[~s], v["threshold"], out_dir / "distances.png"),
            "Distances of same-class and different-class test pairs, with the threshold.",
        )
    )
    far, tar, _ = roc_curve(dist, same)
    figs.append(
        (
            figures.roc_figure(
                np.asarray(far),
                np.asarray(tar),
                v["roc_auc"],
                eer(dist, same)[0],
                out_dir / "roc.png",
            ),
            "Verification ROC on the test pairs (false accept rate on a log scale).",
        )
    )
    figs.append(
        (
            figures.per_class_bars(metrics["per_class"], names, out_dir / "per_class.png"),
            "Per-class triplet ordering accuracy, verification accuracy and precision@1.",
        )
    )
    if test_set.x.dim() == 4:
        rng = np.random.default_rng(seed)
        per_class = [
            int(rng.choice(np.flatnonzero(test_set.y.numpy() == c)))
            for c in np.unique(test_set.y.numpy())
        ][:10]
        _, idx = nearest_neighbors(emb[per_class], emb, 6, metric=metric)
        neighbours = torch.stack([row[row != q][:5] for row, q in zip(idx, per_class)])
        figs.append(
            (
                figures.retrieval_grid(
                    test_set.x, test_set.y, per_class, neighbours, names, out_dir / "retrieval.png"
                ),
                "One query per class and its five nearest test items.",
            )
        )
    if embedding_map:
        path, method = figures.embedding_map(
            emb, test_set.y, names, out_dir / "embedding_map.png", seed=seed
        )
        figs.append((path, f"The test embeddings in two dimensions ({method}), coloured by class."))
    return figs

"""``deepmetric evaluate RUN --data pairs:FILE`` (or ``triplets:FILE``): a run scored on fixed
tuples without classes, beside the raw pixels on the same tuples.

**Pairs**: the verification statistics of the pairs' distances (ROC AUC, EER, TAR@FAR at each
``--far`` the pairs can show: at least one negative pair per 1 / FAR, the others named under
``tar_at_far_skipped``) and the accuracy of ``d <= threshold``. The threshold is never fitted on
the pairs it scores: chosen on the run's validation data (a pairs run: its validation pairs,
:func:`~deepmetric.evaluate.threshold.threshold_of_pairs`; a run of classes: its validation
split's verification pairs) and then saved as ``RUN_DIR/threshold.json`` as ``deepmetric
evaluate`` saves it (not with ``out``); without one (a triplets run, no validation split, or
the run's own validation pairs being the ones scored) every pair is judged out of fold by
10-fold cross-validation on the scored pairs (the LFW protocol), the median fold threshold
reported for information only. **Triplets**: the share with d(a, p) < d(a, n), the ties and
the mean of d(a, n) - d(a, p).

On the run's own ``pairs:`` / ``triplets:`` file (no ``--data``), ``--split test`` scores the
validation tuples (the only ones training never saw) and ``--split train`` the training tuples.
The raw-pixel baseline is each image flattened and L2-normalised
(:func:`~deepmetric.evaluate.metrics.raw_vectors`), in euclidean distance; its pairs are
judged out of fold (it has no validation data of its own).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmetric.checkpoints import weights_sha256
from deepmetric.config import Config, ConfigError, tuple_kind
from deepmetric.data import Preprocessing, Tuples, load_tuples, pixels_to_float
from deepmetric.data.training_data import load_data, load_training_tuples
from deepmetric.distances import paired_at
from deepmetric.evaluate import figures
from deepmetric.evaluate.metrics import raw_vectors
from deepmetric.evaluate.report import STYLE, html_figure, html_table
from deepmetric.evaluate.roc import out_of_fold, roc_curve, verification_metrics
from deepmetric.evaluate.threshold import fit_threshold, threshold_of_pairs
from deepmetric.files import Progress, strict_json, write_json_atomically, write_text_atomically
from deepmetric.models import embed
from deepmetric.runs import VALIDATION_PROTOCOL, Run, Threshold

#: folds of the cross-validation without a validation threshold (as ``deepmetric.evaluate.run``)
FOLDS = 10
CROSS_VALIDATION = (
    "{folds}-fold cross-validation on these pairs (LFW protocol): each pair judged with the "
    "threshold fitted on the other folds; 'threshold' is the median fold threshold, for "
    "information only (not saved)"
)
RAW_NOTE = (
    "the same tuples on the raw pixels (flattened, L2-normalised, euclidean distance), no "
    "network; pairs judged by cross-validation"
)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def embedded(embed_fn: EmbedFn, tuples: Tuples, pre: Preprocessing | None = None):
    """``(embeddings (U, D), index (P, m))``: ``embed_fn`` of the images the tuples use (each
    once, as model inputs: ``v / 255``, or ``pre``'s scale), and the tuples as rows of indices
    into those embeddings."""
    used, index = torch.unique(tuples.index, return_inverse=True)
    return embed_fn(_inputs(tuples.images[used], pre)), index


def _inputs(pixels: torch.Tensor, pre: Preprocessing | None) -> torch.Tensor:
    if pre is not None and pre.scale != 1 / 255:
        return pre.from_pixels(pixels)
    return pixels_to_float(pixels)


def pair_distances(emb: torch.Tensor, index: torch.Tensor, metric: str) -> tuple[torch.Tensor, ...]:
    """The distances of rows of ``index`` into ``emb``: ``(d,)`` of pairs, ``(d(a, p), d(a, n))``
    of triplets, each (P,)."""
    if index.shape[1] == 2:
        return (paired_at(emb, index[:, 0], index[:, 1], metric),)
    return (
        paired_at(emb, index[:, 0], index[:, 1], metric),
        paired_at(emb, index[:, 0], index[:, 2], metric),
    )


def validation_pair_distances(
    embed_fn: EmbedFn, config: Config
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(distances, same, pairs)`` of a pairs run's validation pairs
    (:func:`~deepmetric.data.training_data.load_training_tuples`), embedded by ``embed_fn``:
    what its threshold is chosen on. ``ValueError`` (one line) when there are none."""
    val = load_training_tuples(config).val
    if len(val) == 0 or val.same is None:
        raise ValueError(f"{config.data}: no validation pairs (train.val_fraction=0)")
    emb, index = embedded(embed_fn, val)
    (dist,) = pair_distances(emb, index, config.loss.metric)
    return dist, val.same, len(val)


def _options(config: Config, pre: Preprocessing | None) -> dict[str, object]:
    """Loader options of a tuples file: the run's ``preprocess.json`` (so the images become
    what ``deepmetric embed`` makes of the same files); without one, the config's size."""
    if pre is None:
        return {"size": (config.image_size, config.image_size)}
    mode = "L" if pre.channels == 1 else "RGB"
    return {"size": (pre.height, pre.width), "mode": mode, "resample": pre.resample}


def _scored(run: Run, spec: str, split: str, own: bool) -> tuple[Tuples, dict[str, Any]]:
    """The tuples to score and the notes for ``metrics.json["data"]``."""
    if not own:
        return load_tuples(spec, **_options(run.config, run.preprocessing())), {}
    kind = tuple_kind(spec)
    tuples = load_training_tuples(run.config)
    if split == "train":
        note = "the run's training tuples, without its validation tuples"
        return tuples.train, {"note": note}
    if len(tuples.val) == 0:
        raise ConfigError(
            f"{run.path} holds out no {kind} (train.val_fraction=0), so none of its own are "
            f"unseen: pass --data {kind}:TESTFILE"
        )
    note = "the run's validation tuples: held out of training (the threshold is cross-validated)"
    return tuples.val, {"note": note}


def _run_threshold(
    run: Run, net: nn.Module, device: torch.device
) -> tuple[float, Threshold | None] | None:
    """The threshold chosen on the run's validation data (best accuracy) and, for a pairs run,
    its record to save; ``None`` when the run has none (triplets, no validation split, a
    ``fit()`` run, data that cannot be read)."""
    config = run.config

    def embed_fn(x: torch.Tensor) -> torch.Tensor:
        return embed(net, x, device)

    kind = tuple_kind(config.data)
    try:
        if kind == "pairs":
            dist, same, pairs = validation_pair_distances(embed_fn, config)
            value = threshold_of_pairs(dist, same)
            record = Threshold(
                value=value,
                metric=config.loss.metric,
                protocol=VALIDATION_PROTOCOL,
                validation_items=pairs,
                weights_sha256=weights_sha256(net.state_dict()),
            )
            return value, record
        held_out = config.train.val_fraction > 0 or config.train.val_classes is not None
        if kind is None and not config.from_fit and held_out:
            _, val = load_data(config)
            return fit_threshold(
                embed_fn(val.inputs[:]), val.y, metric=config.loss.metric, seed=config.seed
            ), None
    except (OSError, ValueError):
        return None
    return None


def _cross_validated(dist: torch.Tensor, same: torch.Tensor, seed: int) -> dict[str, Any]:
    """The out-of-fold accuracy of the pairs, its fold thresholds and their median."""
    folds = min(FOLDS, len(dist))
    if folds < 2:
        return {"accuracy": float("nan"), "threshold": float("nan"), "folds": folds}
    cv = out_of_fold(dist, same, folds=folds, seed=seed)
    return {
        "accuracy": float(np.mean(cv.accuracies)),
        "accuracy_std": float(np.std(cv.accuracies)),
        "threshold": float(np.median(cv.thresholds)),
        "fold_thresholds": cv.thresholds,
        "folds": folds,
    }


def _pair_block(
    dist: torch.Tensor,
    same: torch.Tensor,
    threshold: float | None,
    fars: tuple[float, ...],
    seed: int,
) -> dict[str, Any]:
    """Verification of scored pairs at ``threshold`` (``None``: cross-validated)."""
    negatives = int((~same).sum())
    shown = tuple(f for f in fars if f * negatives >= 1)
    cv = _cross_validated(dist, same, seed)
    block = verification_metrics(
        dist, same, threshold=cv["threshold"] if threshold is None else threshold, far_targets=shown
    )
    block["tar_at_far_skipped"] = [
        f"{f:g}: {negatives} negative pairs, fewer than 1 / FAR" for f in fars if f not in shown
    ]
    if threshold is None:
        block["accuracy"] = cv["accuracy"]
        block["accuracy_std"] = cv.get("accuracy_std", float("nan"))
        block["fold_thresholds"] = cv.get("fold_thresholds", [])
        block["threshold_source"] = "cross-validation"
        block["protocol"] = CROSS_VALIDATION.format(folds=cv["folds"])
    else:
        block["accuracy_cross_validated"] = cv["accuracy"]
        block["threshold_source"] = "validation"
        block["protocol"] = VALIDATION_PROTOCOL
    return block


def _triplet_block(d_ap: torch.Tensor, d_an: torch.Tensor) -> dict[str, Any]:
    return {
        "accuracy": float((d_ap < d_an).double().mean()),
        "ties": float((d_ap == d_an).double().mean()),
        "mean_margin": float((d_an - d_ap).double().mean()),
    }


def evaluate_tuples(
    run: Run,
    net: nn.Module,
    spec: str,
    *,
    split: str,
    own: bool,
    out: str | Path | None,
    device: torch.device,
    fars: tuple[float, ...],
    fallback: str | None,
    progress: Progress,
) -> dict[str, Any]:
    """Score ``net`` (the run's, on ``device``) on the tuples of ``spec`` (see the module
    docstring); write ``metrics.json`` and ``report.html`` into ``out`` (default
    ``RUN_DIR/eval``) and return the metrics."""
    started = time.perf_counter()
    config, kind = run.config, tuple_kind(spec)
    tuples, about = _scored(run, spec, split, own)
    pre = run.preprocessing()
    out_dir = run.eval_dir if out is None else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"embedding the {len(tuples):,} {kind} of {spec} on {device}")
    emb, index = embedded(lambda x: embed(net, x, device), tuples, pre)
    raw = raw_vectors(_inputs(tuples.images[torch.unique(tuples.index)], pre))
    metric = config.loss.metric
    metrics: dict[str, Any] = {"tuples": {"kind": kind, "count": len(tuples), "images": len(emb)}}
    saved = None
    if tuples.same is not None:
        same = tuples.same
        pos, neg = int(same.sum()), int((~same).sum())
        metrics["tuples"] |= {"positive": pos, "negative": neg}
        if not pos or not neg:
            raise ConfigError(
                f"{spec}: {pos} same and {neg} different pairs scored: verification needs both"
            )
        scoring_own_val = own and split == "test"
        chosen = None if scoring_own_val else _run_threshold(run, net, device)
        threshold = None if chosen is None else chosen[0]
        saved = None if chosen is None else chosen[1]
        (dist,) = pair_distances(emb, index, metric)
        (raw_dist,) = pair_distances(raw, index, "euclidean")
        metrics["verification"] = _pair_block(dist, same, threshold, fars, config.seed)
        metrics["raw_input_baseline"] = {
            **_pair_block(raw_dist, same, None, fars, config.seed),
            "note": RAW_NOTE,
        }
        figs = _pair_figures(out_dir, metrics["verification"], dist, same)
    else:
        metrics["triplets"] = _triplet_block(*pair_distances(emb, index, metric))
        metrics["raw_input_baseline"] = {
            **_triplet_block(*pair_distances(raw, index, "euclidean")),
            "note": RAW_NOTE,
        }
        figs = []
    if run.log_path.exists():
        figs.insert(0, (figures.loss_curves(_records(run), out_dir / "loss_curves.png"), LOSS))
    metrics["data"] = {
        "spec": spec,
        "split": split if own else None,
        "items": len(tuples),
        "images": len(emb),
        "metric": metric,
        **about,
        "device": str(device),
    }
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomically(out_dir / "metrics.json", strict_json(metrics))
    _write_report(out_dir / "report.html", run, metrics, figs)
    written = [out_dir / "metrics.json", out_dir / "report.html"]
    if saved is not None and out is None and fallback is None:
        written.append(run.write_threshold(saved))
    elif saved is not None and out is None:
        progress(f"{run.threshold_path} left as it is: the latest checkpoint is damaged")
    progress("wrote " + ", ".join(str(p) for p in written))
    return metrics


LOSS = "Training loss per step and per epoch, validation loss and the validation tuples' scores."


def _records(run: Run) -> list[dict[str, Any]]:
    lines = run.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _pair_figures(
    out_dir: Path, v: dict[str, Any], dist: torch.Tensor, same: torch.Tensor
) -> list[tuple[Path, str]]:
    d, s = dist.numpy(), same.numpy()
    far, tar, _ = roc_curve(dist, same)
    where = (
        "chosen on the validation data"
        if v["threshold_source"] == "validation"
        else ("median of the cross-validation fold thresholds, for information")
    )
    return [
        (
            figures.distance_histograms(d[s], d[~s], v["threshold"], out_dir / "distances.png"),
            f"Distances of the same and the different pairs, with the threshold ({where}).",
        ),
        (
            figures.roc_figure(
                np.asarray(far), np.asarray(tar), v["roc_auc"], v["eer"], out_dir / "roc.png"
            ),
            "Verification ROC on these pairs (false accept rate on a log scale).",
        ),
    ]


def _write_report(
    path: Path, run: Run, metrics: dict[str, Any], figs: list[tuple[Path, str]]
) -> None:
    """``report.html``: the scores beside the raw pixels', the protocol, the figures."""
    t, raw, config = metrics["tuples"], metrics["raw_input_baseline"], run.config
    if t["kind"] == "pairs":
        v = metrics["verification"]
        rows = [
            ("verification accuracy", v["accuracy"], raw["accuracy"]),
            ("ROC AUC", v["roc_auc"], raw["roc_auc"]),
            ("EER", v["eer"], raw["eer"]),
            *((f"TAR @ FAR {k}", x, raw["tar_at_far"][k]) for k, x in v["tar_at_far"].items()),
            ("threshold (distance)", v["threshold"], raw["threshold"]),
        ]
        head = f"verification accuracy {v['accuracy']:.4f} &middot; ROC AUC {v['roc_auc']:.4f}"
        what = f"{t['count']:,} pairs ({t['positive']:,} same, {t['negative']:,} different)"
        notes = [v["protocol"], *v["tar_at_far_skipped"]]
    else:
        m = metrics["triplets"]
        rows = [
            ("share with d(a,p) < d(a,n)", m["accuracy"], raw["accuracy"]),
            ("ties d(a,p) = d(a,n)", m["ties"], raw["ties"]),
            ("mean d(a,n) − d(a,p)", m["mean_margin"], raw["mean_margin"]),
        ]
        head = f"triplets ordered right {m['accuracy']:.4f}"
        what = f"{t['count']:,} triplets"
        notes = []
    facts = [
        ("run", str(run.path)),
        ("data", f"{metrics['data']['spec']}: {what} over {t['images']:,} images"),
        ("model", f"{config.model.backbone}, {config.loss.metric} distance"),
        ("trained with", f"{config.mode} mode, {config.loss.name} loss, {config.epochs} epochs"),
    ]
    notes += [raw["note"], metrics["data"].get("note", "")]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>deepmetric evaluation: "
        f"{html.escape(config.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>deepmetric evaluation: {html.escape(config.name)}</h1><p class='big'>{head}</p>",
        html_table(facts, ["", ""]),
        "<h2>Metrics</h2>" + html_table(rows, ["metric", "network", "raw pixels"]),
        "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes if n),
        "<h2>Figures</h2>" + "".join(html_figure(p, c) for p, c in figs),
        "</body></html>",
    ]
    write_text_atomically(path, "".join(parts))


__all__ = ["embedded", "evaluate_tuples", "pair_distances", "validation_pair_distances"]

"""``deepmetric evaluate RUN_DIR``: every metric, figure and the report of a trained run.

Writes ``metrics.json``, ``report.html`` and the figures as PNG files into ``RUN_DIR/eval/``, or
into ``out`` and nowhere else.

**The verification threshold.** Every number that depends on a threshold is scored on pairs the
threshold was not fitted on. One of two protocols, named in ``metrics.json``
(``verification.threshold_source`` and ``verification.protocol``):

- ``"validation"`` (the run's own data set, when its validation split has pairs of at least two
  classes): the threshold is :func:`~deepmetric.evaluate.roc.choose_threshold` on pairs of the
  validation items, which training held out and which are never scored here. It decides the
  scored pairs, the per-class verification accuracies and the unseen-class block. It is saved
  as ``RUN_DIR/threshold.json`` (the threshold calibrated on the validation split, kept with the
  run for later use), but only when writing to the default folder (``out`` is None).
- ``"cross-validation"`` (``data`` is another data set, the run has ``train.val_fraction=0``,
  or its validation split cannot give pairs): 10-fold cross-validation on the scored pairs, the
  LFW protocol. Each pair is judged with the threshold fitted on the other nine folds
  (:func:`~deepmetric.evaluate.roc.out_of_fold`; copies of one pair share a fold); the
  verification ``accuracy`` is the mean fold accuracy, and the per-class verification
  accuracies come from the same out-of-fold decisions (over the scored pairs of each class).
  The unseen-class block runs its own cross-validation on its own pairs. The reported
  ``threshold`` is the median of the ten fold thresholds: it was fitted on these pairs, is
  shown for information (and drawn in the distance histogram) only, decides nothing and is
  never saved.

With a validation threshold, ``verification.accuracy_cross_validated`` is also given: the
accuracy of the same 10-fold cross-validation on the scored pairs, for information. The gap
between it and ``accuracy`` is what carrying the threshold over from the validation classes
costs (their pairs can be harder or easier to tell apart than the scored ones).

``split="train"`` on the run's own data scores the train split *without* the validation items
(``metrics.json["data"]`` says how many were left out), so a threshold fitted on them never
scores them; with ``train.classes``, the train items of the other classes (never trained on,
never in the validation split) are scored too, and make the unseen-class block.

The network runs on ``device`` (``"auto"``: CUDA when available, else the CPU), whatever device
the run was trained on: the weights are loaded on the CPU and moved there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from deepmetric.checkpoints import weights_sha256
from deepmetric.config import Config, ConfigError, tuple_kind
from deepmetric.data import ArrayDataset, Preprocessing, class_split, load_dataset
from deepmetric.data.benchmarks import BENCHMARK_NAMES, inshop_query_gallery
from deepmetric.data.datasets import Split
from deepmetric.data.training_data import load_training_data, resolve_val_classes
from deepmetric.devices import resolve_device
from deepmetric.distances import paired_at
from deepmetric.evaluate import figures
from deepmetric.evaluate.diagnostics import JudgedPairs, per_class_table, test_triplet_categories
from deepmetric.evaluate.fewshot import FewShotPlan, few_shot_metrics
from deepmetric.evaluate.metrics import (
    clustering_nmi,
    nearest_neighbors,
    raw_vectors,
    retrieval_metrics,
)
from deepmetric.evaluate.pairs import verification_pairs
from deepmetric.evaluate.report import write_report
from deepmetric.evaluate.roc import (
    eer,
    out_of_fold,
    roc_curve,
    verification_metrics,
)
from deepmetric.evaluate.threshold import threshold_of_pairs, validation_pairs
from deepmetric.evaluate.transfer import DEFAULT_FARS, open_set, threshold_transfer
from deepmetric.evaluate.tuples import evaluate_tuples
from deepmetric.files import Progress, strict_json, write_json_atomically
from deepmetric.models import embed
from deepmetric.runs import LOG_FILE, VALIDATION_PROTOCOL, Run, Threshold

RAW_NOTE = (
    "the same retrieval metrics on the raw inputs (flattened, L2-normalised; images above 64 "
    "pixels a side area-averaged down to 64), no network"
)
UNTRAINED_NOTE = (
    "the same retrieval metrics of the same architecture with random weights (drawn with the "
    "run's seed: for a deepmetric train run, its initial weights): what training added"
)

#: Folds of the cross-validation used when there is no validation threshold (the LFW protocol).
FOLDS = 10

CROSS_VALIDATION_PROTOCOL = (
    f"{FOLDS}-fold cross-validation on these pairs (LFW protocol): each pair is judged with the "
    f"threshold fitted on the other {FOLDS - 1} folds (accuracy: mean over folds; per-class "
    "accuracies: the same decisions); 'threshold' is the median of the fold thresholds, fitted "
    "on these pairs, for information only (not saved)"
)


def _pairs(
    emb: torch.Tensor, labels: torch.Tensor, metric: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i, j, distances, same)`` of the deterministic verification pairs of a labelled set."""
    i, j, same = verification_pairs(labels, seed=seed)
    return i, j, paired_at(emb, i, j, metric), same


def _has_pairs(labels: torch.Tensor) -> bool:
    """Verification pairs exist: two classes or more, and one with two items or more."""
    counts = torch.unique(labels, return_counts=True)[1]
    return len(counts) >= 2 and bool((counts >= 2).any())


def retrieval_and_verification(
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str,
    margin: float,
    threshold: float | None,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one labelled set of embeddings.

    ``threshold``: fitted on other (validation) data; it decides every pair. ``None``: no such
    threshold; every pair is judged out of fold by a :data:`FOLDS`-fold cross-validation on
    these pairs (see the module docstring), the per-class table included.
    """
    out: dict[str, Any] = dict(retrieval_metrics(emb, labels, metric=metric, per_class=True))
    out["nmi"] = clustering_nmi(emb, labels, seed=seed)
    i, j, dist, same = _pairs(emb, labels, metric, seed)
    cv = out_of_fold(dist, same, folds=FOLDS, seed=seed, groups=i * len(labels) + j)
    accuracies = torch.tensor(cv.accuracies, dtype=torch.float64)
    if threshold is None:
        verification = verification_metrics(dist, same, threshold=float(np.median(cv.thresholds)))
        verification["accuracy"] = float(accuracies.mean())
        verification["accuracy_std"] = float(accuracies.std(correction=0))
        verification["fold_thresholds"] = cv.thresholds
        verification["threshold_source"] = "cross-validation"
        verification["protocol"] = CROSS_VALIDATION_PROTOCOL
        judged = JudgedPairs(i, j, same, cv.accepted)
        per_class = per_class_table(emb, labels, metric=metric, judged=judged, seed=seed)
    else:
        verification = verification_metrics(dist, same, threshold=threshold)
        verification["accuracy_cross_validated"] = float(accuracies.mean())
        verification["threshold_source"] = "validation"
        verification["protocol"] = VALIDATION_PROTOCOL
        per_class = per_class_table(emb, labels, metric=metric, threshold=threshold, seed=seed)
    verification["pairs"] = {"positive": int(same.sum()), "negative": int((~same).sum())}
    out["verification"] = verification
    out["per_class"] = per_class
    out["triplet_categories"] = {
        **test_triplet_categories(emb, labels, margin=margin, metric=metric, seed=seed),
        "margin": margin,
    }
    out["_pairs"] = (dist, same)  # for the figures; dropped before writing JSON
    return out


class _Validation(NamedTuple):
    """The validation classes' embeddings, labels and verification pairs (distances, same)."""

    emb: torch.Tensor
    labels: torch.Tensor
    dist: torch.Tensor
    same: torch.Tensor


def _one_shot_blocks(
    out: dict[str, Any],
    emb: torch.Tensor,
    raw: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str,
    plan: FewShotPlan,
    fars: tuple[float, ...],
    val: _Validation | None,
    seed: int,
) -> None:
    """Add the few-shot blocks (``one_shot``, ``five_shot``, ...; the same on the raw inputs
    under ``raw_input_baseline``), the open-set block (``open_set``: DIR@FAR) and, with a
    validation split, ``threshold_transfer`` (thresholds chosen on the validation classes at
    each FAR, measured on these pairs) to ``out``, the metrics of one labelled set (``raw``:
    its raw-input vectors, :func:`~deepmetric.evaluate.metrics.raw_vectors`)."""
    out.update(few_shot_metrics(emb, labels, metric=metric, plan=plan, seed=seed))
    out["raw_input_baseline"].update(
        few_shot_metrics(raw, labels, metric="euclidean", plan=plan, seed=seed)
    )
    if val is not None and fars:
        dist, same = out["_pairs"]
        out["threshold_transfer"] = threshold_transfer(val.dist, val.same, dist, same, fars=fars)
    if fars and len(torch.unique(labels)) >= 2:
        out["open_set"] = open_set(
            emb,
            labels,
            metric=metric,
            fars=fars,
            seed=seed,
            val_embeddings=None if val is None else val.emb,
            val_labels=None if val is None else val.labels,
        )


def _device(name: str) -> torch.device:
    """The evaluation device: ``auto`` (CUDA when available, else CPU) or a torch device name,
    checked by allocating on it, so a bad or absent device is a one-line ``ConfigError``."""
    device = resolve_device(name)  # a ConfigError saying why not
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = (str(error).strip().splitlines() or ["unavailable"])[0]
        raise ConfigError(f"device {name!r} cannot be used: {reason}") from None
    return device


def _class_tags(
    config: Config, ds: ArrayDataset, val_classes: list[int] | None = None
) -> dict[int, str]:
    """Label id -> "unseen" (not in ``train.classes``) or "validation" (in the resolved
    ``train.val_classes``, given or resolved here: held out of training, chose the settings);
    no tags without ``train.classes`` and ``train.val_classes``."""
    tags: dict[int, str] = {}
    if config.train.classes is not None:
        seen = set(_class_ids(config.train.classes, ds))
        tags |= {c: "unseen" for c in torch.unique(ds.y).tolist() if c not in seen}
    val_ids = val_classes if val_classes is not None else resolve_val_classes(config)
    if val_ids is not None:
        tags |= dict.fromkeys(val_ids, "validation")
    return tags


def _class_ids(classes: list[Any], ds: ArrayDataset) -> list[int]:
    """``train.classes`` (ids or names) as label ids of ``ds``."""
    ids = []
    for c in classes:
        if isinstance(c, str):
            if ds.classes is None or c not in ds.classes:
                raise ConfigError(f"train.classes names {c!r}, which the evaluated data lacks")
            ids.append(ds.classes.index(c))
        else:
            ids.append(int(c))
    return ids


def _resized(spec: str) -> bool:
    """Whether the spec's images are resized when read (image folders, the benchmarks)."""
    return spec.startswith("folder:") or spec.partition(":")[0] in BENCHMARK_NAMES


def _folder_options(config: Config, pre: Preprocessing | None) -> dict[str, object]:
    """Loader options of a ``folder:`` spec: the run's ``preprocess.json`` (channels, size,
    resample filter), so the images become the inputs ``deepmetric embed`` makes of the same
    files; a run without one: the config's ``image_size``, channels as the images are."""
    if pre is None:
        return {"size": (config.image_size, config.image_size)}
    mode = "L" if pre.channels == 1 else "RGB"
    return {"size": (pre.height, pre.width), "mode": mode, "resample": pre.resample}


def _scaled(ds: ArrayDataset, pre: Preprocessing | None) -> ArrayDataset:
    """``ds`` as the run's inputs: uint8 pixels stay pixels (read as ``v / 255``) unless the
    run's ``preprocess.json`` has another scale, then float32 inputs as the embedder makes."""
    if pre is None or pre.scale == 1 / 255 or ds.data.dtype != torch.uint8:
        return ds
    return ArrayDataset(pre.from_pixels(ds.data), ds.y, ds.classes)


def _scored_and_validation(
    config: Config, spec: str, split: Split, own: bool, opts: dict[str, object]
) -> tuple[ArrayDataset, ArrayDataset | None, dict[str, Any]]:
    """``(scored set, validation set or None, notes for metrics.json["data"])``.

    The validation set is the run's own (:func:`~deepmetric.data.training_data.load_data`),
    only when the run's own data is evaluated; on its train split, the scored set leaves it
    out. The notes hold the resolved ``train.val_classes`` (``"val_classes"``: spec, count,
    ids) when set, and on the run's own data how many scored classes training saw
    (:func:`_seen_notes`).
    """
    if not own:
        notes = _val_notes(config, None) | {"classes_seen_in_training": None}
        return load_dataset(spec, split, **opts), None, notes
    run = load_training_data(config)  # after the train.classes filter, without validation
    if split == "test":
        scored = load_dataset(spec, split, **opts)
        if config.train.val_fraction == 0 and config.train.val_classes is None:
            return scored, None, _seen_notes(scored, run.train)
        return scored, run.val, _val_notes(config, run.val_classes) | _seen_notes(scored, run.train)
    train_part, val_set = run.train, run.val
    scored = train_part
    if config.train.classes is not None:  # the other classes: never trained on, not in val
        _, unseen = class_split(load_dataset(spec, "train", **opts), config.train.classes)
        x = torch.cat([train_part.data, unseen.data])  # one loader: one storage type
        y = torch.cat([train_part.y, unseen.y])
        scored = ArrayDataset(x, y, unseen.classes)
    about = {
        "excluded_validation_items": len(val_set),
        "note": "the train split without the validation items (the threshold's own data)",
        **_val_notes(config, run.val_classes),
        **_seen_notes(scored, train_part),
    }
    return scored, val_set, about


def _seen_notes(scored: ArrayDataset, trained: ArrayDataset) -> dict[str, Any]:
    """``{"classes": n, "classes_seen_in_training": m}``: how many of the scored classes have
    items in the run's training set (0: every figure is on classes never trained on). Classes
    are matched by name when both sets name their classes (Omniglot numbers each split's
    classes from 0), else by label id."""
    classes = torch.unique(scored.y)
    trained_ids = torch.unique(trained.y)
    if scored.classes is not None and trained.classes is not None:
        names = {trained.classes[i] for i in trained_ids.tolist() if i < len(trained.classes)}
        seen = sum(
            1
            for c in classes.tolist()
            if (scored.classes[c] if c < len(scored.classes) else None) in names
        )
    else:
        seen = int(torch.isin(classes, trained_ids).sum())
    return {"classes": len(classes), "classes_seen_in_training": seen}


def _val_notes(config: Config, val_classes: list[int] | None) -> dict[str, Any]:
    """``{"val_classes": {"spec", "count", "ids"}}``: the run's ``train.val_classes`` as
    written and resolved (:func:`~deepmetric.data.training_data.resolve_val_classes`; resolved
    here when not given); ``{}`` when unset."""
    ids = val_classes if val_classes is not None else resolve_val_classes(config)
    if ids is None:
        return {}
    return {"val_classes": {"spec": config.train.val_classes, "count": len(ids), "ids": ids}}


class _Sets(NamedTuple):
    """What one evaluation scores: the scored set, the validation set (or None), the notes
    for ``metrics.json["data"]``, the class names."""

    scored: ArrayDataset
    val: ArrayDataset | None
    about: dict[str, Any]
    names: list[str]


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: Split = "test",
    out: str | Path | None = None,
    embedding_map: bool = True,
    device: str = "auto",
    few_shot: FewShotPlan | None = None,
    fars: tuple[float, ...] = DEFAULT_FARS,
    progress: Progress = print,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` on ``split`` of ``data`` (default: the
    run's own data set) on ``device``; write into ``out`` (default ``RUN_DIR/eval``) and return
    the metrics written to ``metrics.json``. See the module docstring for the threshold rules.

    ``few_shot``: the N-way K-shot episodes to run on the scored classes (None: the defaults of
    :class:`~deepmetric.evaluate.fewshot.FewShotPlan`; a way asked for explicitly that the
    classes cannot give is a ``ConfigError``). ``fars``: the false accept rates at which the
    threshold transfer and the open-set identification rate are reported.
    """
    started = time.perf_counter()
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    torch_device = _device(device)
    run = Run.open(run_dir)
    net, _, _, fallback = run.network()  # fallback: the latest is damaged
    weights = weights_sha256(net.state_dict())  # the threshold is for these weights only
    net.to(torch_device)
    spec = data or run.config.data
    if data is None and run.from_fit:
        raise ConfigError(f"{run.path} was trained on Python objects: pass data= (--data)")
    plan = FewShotPlan() if few_shot is None else few_shot
    for far in fars:
        if not 0.0 < far < 1.0:
            raise ConfigError(f"--far takes rates in (0, 1), got {far:g}")
    if tuple_kind(spec) is not None:  # fixed pairs / triplets, no classes: evaluate/tuples.py
        where = dict(split=split, own=data is None, out=out, device=torch_device, fars=fars)
        return evaluate_tuples(run, net, spec, **where, fallback=fallback, progress=progress)
    sets = _load_sets(run, spec, split, own=data is None, plan=plan)
    out_dir = run.eval_dir if out is None else Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    progress(f"embedding {len(sets.scored):,} {split} items of {spec} on {torch_device}")
    emb = embed(net, sets.scored.inputs, torch_device)
    threshold, val = _validation_threshold(net, sets.val, run.config, torch_device)
    progress("raw-input vectors (the baseline)")
    raw = raw_vectors(sets.scored.inputs)
    metrics = _scored_metrics(run, emb, raw, sets.scored, threshold, val, plan, fars, progress)
    if spec.partition(":")[0] == "inshop" and split == "test":
        progress("In-Shop: queries against the gallery")
        metrics["query_gallery"] = _query_gallery(spec, run, emb, raw, sets.scored)
    dist, same = metrics.pop("_pairs")
    untrained = _untrained_baseline(run, sets.scored, torch_device, metrics)
    if run.config.train.classes is not None:
        unseen = _unseen_metrics(run, emb, raw, untrained, sets.scored, threshold, val, plan, fars)
        if unseen is not None:
            metrics["unseen_classes"] = unseen

    progress("figures")
    tags = _class_tags(run.config, sets.scored, sets.about.get("val_classes", {}).get("ids"))
    metric = run.config.loss.metric
    figs = _figures(
        run.path,
        out_dir,
        metrics,
        emb,
        sets.scored,
        sets.names,
        dist,
        same,
        metric,
        embedding_map,
        run.config.seed,
        tags,
    )
    metrics["data"] = {
        "spec": spec,
        "split": split,
        "items": len(sets.scored),
        "metric": metric,
        "class_names": sets.names,
        "classes": len(torch.unique(sets.scored.y)),
        **sets.about,
        "device": str(torch_device),
    }
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    written = _write_outputs(run, out_dir, metrics, sets, spec, split, emb.shape[1], figs)
    if threshold is not None and out is None and fallback is not None:
        progress(
            f"{run.threshold_path} left as it is: these are the weights of an older "
            "checkpoint, the latest one is damaged"
        )
    elif threshold is not None and out is None:  # fitted on the run's validation split
        assert sets.val is not None
        record = Threshold(
            value=threshold,
            metric=metric,
            protocol=VALIDATION_PROTOCOL,
            validation_items=len(sets.val),
            weights_sha256=weights,
        )
        written.append(run.write_threshold(record))
    progress("wrote " + ", ".join(str(p) for p in written))
    return metrics


def _load_sets(run: Run, spec: str, split: Split, *, own: bool, plan: FewShotPlan) -> _Sets:
    """The scored and validation sets as the run's inputs (folder data read as its
    ``preprocess.json`` says), checked: two classes or more, the few-shot plan possible."""
    resized = _resized(spec)
    pre = run.preprocessing() if resized else None
    opts = _folder_options(run.config, pre) if resized else {}
    scored, val, about = _scored_and_validation(run.config, spec, split, own, opts)
    scored, val = _scaled(scored, pre), None if val is None else _scaled(val, pre)
    if len(torch.unique(scored.y)) < 2:
        raise ConfigError(f"{spec} ({split}) has fewer than 2 classes: nothing to evaluate")
    try:
        plan.check(scored.y, f"{spec} ({split})")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    names = scored.classes or [str(c) for c in range(int(scored.y.max()) + 1)]
    return _Sets(scored, val, about, names)


def _validation_threshold(
    net: torch.nn.Module, val_set: ArrayDataset | None, config: Config, device: torch.device
) -> tuple[float | None, _Validation | None]:
    """The threshold chosen on the validation set's verification pairs (best accuracy) and
    the validation embeddings and pairs; ``(None, None)`` without validation pairs."""
    if val_set is None or not _has_pairs(val_set.y):
        return None, None
    val_emb = embed(net, val_set.inputs, device)
    val_dist, val_same = validation_pairs(val_emb, val_set.y, config.loss.metric, config.seed)
    val = _Validation(val_emb.cpu(), val_set.y.cpu(), val_dist.cpu(), val_same.cpu())
    return threshold_of_pairs(val_dist, val_same), val


def _scored_metrics(
    run: Run,
    emb: torch.Tensor,
    raw: torch.Tensor,
    scored: ArrayDataset,
    threshold: float | None,
    val: _Validation | None,
    plan: FewShotPlan,
    fars: tuple[float, ...],
    progress: Progress,
) -> dict[str, Any]:
    """Retrieval, verification, per-class, the raw-input baseline, few-shot, threshold
    transfer and open-set blocks of the scored set (``"_pairs"``: its scored pairs)."""
    config = run.config
    metric, margin = config.loss.metric, config.loss.margin
    progress("metrics")
    metrics = retrieval_and_verification(
        emb, scored.y, metric=metric, margin=margin, threshold=threshold, seed=config.seed
    )
    progress("raw-input baseline")
    metrics["raw_input_baseline"] = {
        **retrieval_metrics(raw, scored.y, metric="euclidean", per_class=True),
        "note": RAW_NOTE,
    }
    progress("few-shot episodes, threshold transfer, open-set identification")
    few = dict(metric=metric, plan=plan, fars=tuple(fars), val=val, seed=config.seed)
    _one_shot_blocks(metrics, emb.cpu(), raw, scored.y, **few)
    return metrics


def _query_gallery(
    spec: str, run: Run, emb: torch.Tensor, raw: torch.Tensor, scored: ArrayDataset
) -> dict[str, Any]:
    """DeepFashion In-Shop's protocol: each query image searched for among the gallery images
    (relevant: the gallery images of its item), beside the same on the raw pixels. The test
    split is the queries followed by the gallery
    (:func:`~deepmetric.data.benchmarks.inshop_query_gallery` says how many queries)."""
    directory = spec.partition(":")[2] or None
    opts = _folder_options(run.config, run.preprocessing())
    query, _ = inshop_query_gallery(directory, **opts)  # type: ignore[arg-type]
    nq, metric, y = len(query), run.config.loss.metric, scored.y
    if not 0 < nq < len(scored):
        raise ConfigError(f"{spec}: {nq} queries in a test split of {len(scored)} items")
    block = retrieval_metrics(
        emb[:nq], y[:nq], metric=metric, ref_embeddings=emb[nq:], ref_labels=y[nq:]
    )
    block["raw_input_baseline"] = retrieval_metrics(
        raw[:nq], y[:nq], metric="euclidean", ref_embeddings=raw[nq:], ref_labels=y[nq:]
    )
    block["queries_given"], block["gallery"] = nq, len(scored) - nq
    block["note"] = "each query image against the gallery images only (In-Shop's protocol)"
    return block


def _untrained_baseline(
    run: Run, scored: ArrayDataset, device: torch.device, metrics: dict[str, Any]
) -> torch.Tensor:
    """The run's architecture with its initial random weights on the scored set: its
    retrieval metrics into ``metrics``; returns its embeddings."""
    untrained_net = run.untrained_network(scored.inputs[:1]).to(device)
    untrained = embed(untrained_net, scored.inputs, device)
    metrics["untrained_network_baseline"] = {
        **retrieval_metrics(untrained, scored.y, metric=run.config.loss.metric),
        "note": UNTRAINED_NOTE,
    }
    return untrained


def _unseen_metrics(
    run: Run,
    emb: torch.Tensor,
    raw: torch.Tensor,
    untrained: torch.Tensor,
    scored: ArrayDataset,
    threshold: float | None,
    val: _Validation | None,
    plan: FewShotPlan,
    fars: tuple[float, ...],
) -> dict[str, Any] | None:
    """Every block of the scored metrics again on the classes not in ``train.classes``
    (never seen in training); ``None`` when they give no verification pairs."""
    config = run.config
    metric = config.loss.metric
    seen = torch.as_tensor(_class_ids(config.train.classes or [], scored), dtype=scored.y.dtype)
    unseen = ~torch.isin(scored.y, seen)
    labels = scored.y[unseen]
    if not _has_pairs(labels):
        return None
    block = retrieval_and_verification(
        emb[unseen],
        labels,
        metric=metric,
        margin=config.loss.margin,
        threshold=threshold,  # None: its own cross-validation on its own pairs
        seed=config.seed,
    )
    block["note"] = "classes not in train.classes: never seen in training"
    block["raw_input_baseline"] = {
        **retrieval_metrics(raw[unseen], labels, metric="euclidean", per_class=True),
        "note": RAW_NOTE,
    }
    unseen_plan = plan._replace(explicit=False)  # checked on the whole set already
    few = dict(metric=metric, plan=unseen_plan, fars=tuple(fars), val=val, seed=config.seed)
    _one_shot_blocks(block, emb[unseen].cpu(), raw[unseen], labels, **few)
    block.pop("_pairs")
    block["untrained_network_baseline"] = {
        **retrieval_metrics(untrained[unseen], labels, metric=metric),
        "note": UNTRAINED_NOTE,
    }
    return block


def _write_outputs(
    run: Run,
    out_dir: Path,
    metrics: dict[str, Any],
    sets: _Sets,
    spec: str,
    split: Split,
    dim: int,
    figs: list[tuple[Path, str]],
) -> list[Path]:
    """``metrics.json`` (strict JSON, atomically) and ``report.html``; their paths."""
    config = run.config
    write_json_atomically(out_dir / "metrics.json", strict_json(metrics))
    facts = [
        ("run", str(run.path)),
        ("data", f"{spec} ({split}, {len(sets.scored):,} items)"),
        (
            "model",
            f"{config.model.backbone} → {dim}-d, {config.loss.metric} distance"
            + (" (features before the projection head)" if config.model.projection_head else ""),
        ),
        (
            "trained with",
            f"{config.mode} mode, {config.loss.name} loss"
            + (f" ({config.loss.mining})" if config.loss.name == "triplet" else "")
            + f", margin {config.loss.margin}, {config.epochs} epochs",
        ),
    ]
    write_report(
        out_dir / "report.html",
        title=f"deepmetric evaluation: {config.name}",
        metrics=metrics,
        class_names=sets.names,
        figures=figs,
        facts=facts,
    )
    return [out_dir / "metrics.json", out_dir / "report.html"]


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
    tags: dict[int, str],
) -> list[tuple[Path, str]]:
    figs: list[tuple[Path, str]] = []
    log = run_dir / LOG_FILE
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
            "Distances of same-class and different-class test pairs, with the threshold"
            + (
                " (chosen on the validation split)."
                if v["threshold_source"] == "validation"
                else " (median of the cross-validation fold thresholds, for information)."
            ),
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
    figs.append(
        (
            figures.map_at_r_versus_raw(
                metrics["by_class"],
                metrics["raw_input_baseline"]["by_class"],
                names,
                tags,
                out_dir / "map_at_r_per_class.png",
            ),
            "MAP@R per class, the network against the raw inputs (all test classes ranked "
            "together; hatched: classes the network never trained on).",
        )
    )
    if test_set.data.dim() == 4:
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
                    test_set.inputs,
                    test_set.y,
                    per_class,
                    neighbours,
                    names,
                    out_dir / "retrieval.png",
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

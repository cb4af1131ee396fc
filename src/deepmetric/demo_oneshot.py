"""One-shot identification of classes the network never saw, with an open-set "unknown".

The protocol: train on Fashion-MNIST classes 0-5 (``make demo-oneshot``: ``configs/openset.yaml``,
which trains on 0, 1, 3, 5 and validates on 2, 4, into ``runs/oneshot_openset``; without a
config, the defaults plus ``train.classes=[0,1,2,3,4,5]`` into ``runs/oneshot_0to5``; an
existing run there is reused), create a gallery with the run's threshold (chosen on its
validation split, never on the gallery's data), enroll ONE test image of each unseen class
6-9, then identify

- every other test image of classes 6-9 (genuine queries: their class is enrolled), and
- ``strangers`` test images of classes 0-5 (never enrolled: the right answer is "unknown").

On a data set whose test classes are all unseen (a class-disjoint split such as the glyph set,
``make demo-oneshot``: ``configs/glyphs.yaml``, see :mod:`deepmetric.data.glyphs`), pass
``enroll=N`` and ``stranger_classes=M`` instead: ONE image of each of N test classes is
enrolled (the face ``enroll_face`` where the data names its faces: one font for every
character), every other image of those classes is a genuine query, and every image of M
other test classes is a stranger, so strangers are as new to the network as the enrolled.

Printed: the one-shot accuracy (the nearest of the enrolled identities is the right one,
threshold ignored; chance is 1 / the number enrolled), the accuracy of accepted answers
(genuine queries whose distance is within the threshold), the acceptance rate of genuine
queries and the rejection rate of strangers. A figure goes to ``RUN/oneshot/oneshot.png``:
the enrolled examples, and a grid of queries with their answers (green: right, red: a wrong
name, gray: unknown for an enrolled class).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from deepmetric.components import load_checked_config
from deepmetric.config import Config
from deepmetric.data import ArrayDataset, load_dataset
from deepmetric.data.training_data import load_options
from deepmetric.devices import resolve_device
from deepmetric.gallery.gallery import Gallery, Identification, index_path
from deepmetric.inference import Embedder, Threshold
from deepmetric.training import train
from deepmetric.training.fit import has_checkpoint

SEEN = [0, 1, 2, 3, 4, 5]
RIGHT, WRONG, UNKNOWN = "#2ca02c", "#d62728", "#7f7f7f"
FIGURE_CLASSES = 8  # the figure shows the first few enrolled classes and their queries


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if hits.size else math.nan


def _names(classes: list[str] | None, ids: Sequence[int]) -> dict[int, str]:
    return {c: (classes[c] if classes is not None else f"class {c}") for c in ids}


def _figure(
    path: Path,
    enrolled: list[tuple[str, torch.Tensor]],
    shown: list[tuple[torch.Tensor, str, Identification]],
    columns: int = 8,
) -> Path:
    """Row 0: the enrolled examples; below: queries, titled with the truth and the answer,
    framed by the outcome."""
    from matplotlib.figure import Figure

    rows = 1 + math.ceil(len(shown) / columns)
    fig = Figure(figsize=(1.5 * columns, 1.75 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()

    def show(ax: object, x: torch.Tensor) -> None:
        img = x.detach().float().clamp(0, 1).numpy()
        img = img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0))
        ax.set_axis_on()  # type: ignore[attr-defined]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)  # type: ignore[attr-defined]

    for col, (name, x) in enumerate(enrolled[:columns]):
        show(axes[0, col], x)
        axes[0, col].set_title(f"enrolled: {name}", fontsize=7, fontweight="bold")
    for i, (x, truth, answer) in enumerate(shown):
        ax = axes[1 + i // columns, i % columns]
        show(ax, x)
        stranger = truth.startswith("stranger")
        if answer.identity is None:
            colour = RIGHT if stranger else UNKNOWN
        else:
            colour = RIGHT if answer.identity == truth else WRONG
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        said = answer.identity if answer.identity is not None else "unknown"
        ax.set_title(f"{truth}\n-> {said} ({answer.distance:.2f})", fontsize=6, color=colour)
    fig.suptitle(
        "One-shot identification: top, the one enrolled example per class; below, queries "
        "(truth -> answer, distance). Green: right (strangers: unknown), red: a wrong name, "
        "gray: unknown for an enrolled class",
        fontsize=8,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _face_of_items(spec: str, split: str) -> tuple[list[str], np.ndarray] | None:
    """``(face names, face index of each item)`` of an ``npz:`` glyph set's ``split``, or None
    when the data does not name its faces (see :mod:`deepmetric.data.glyphs`)."""
    if not spec.startswith("npz:"):
        return None
    key = "face" if split == "train" else "face_test"
    with np.load(spec.removeprefix("npz:"), allow_pickle=False) as arrays:
        if "faces" not in arrays.files or key not in arrays.files:
            return None
        return [str(f) for f in arrays["faces"]], arrays[key].astype(np.int64)


def _enrolled_items(
    labels: np.ndarray,
    classes: Sequence[int],
    rng: np.random.Generator,
    face: int | None,
    faces: np.ndarray | None,
) -> dict[int, int]:
    """Class -> the item enrolled for it: the one drawn by ``face`` when given, else random."""
    if face is None or faces is None:
        return {c: int(rng.choice(np.flatnonzero(labels == c))) for c in classes}
    out = {}
    for c in classes:
        hit = np.flatnonzero((labels == c) & (faces == face))
        if not len(hit):
            raise ValueError(f"class {c} has no image of the face asked to enroll")
        out[c] = int(hit[0])
    return out


def main(
    overrides: Sequence[str] = (),
    *,
    run: str | Path = "runs/oneshot_0to5",
    strangers: int = 1000,
    config: str | Path | None = None,
    device: str = "auto",
    enroll: int | None = None,
    stranger_classes: int | None = None,
    enroll_face: str | None = None,
    far: float | None = None,
) -> dict[str, float]:
    """Run the protocol of the module docstring; print and return the figures.

    Args:
        overrides: ``key=value`` overrides of the training config (after the defaults and
            ``train.classes=[0,1,2,3,4,5]``), e.g. ``data=idx:DIR epochs=1``.
        run: the run folder (trained when it has no checkpoints, else reused).
        strangers: test images of the trained classes to query (all when fewer).
        config: a YAML config to train with (``make demo-oneshot`` passes
            ``configs/openset.yaml``); it must set ``train.classes``, the seen classes. Without
            one: the defaults with ``train.classes=[0,1,2,3,4,5]``.
        device: where the network trains (``train.device``, unless ``overrides`` set it) and
            then embeds the gallery and the queries (and the gallery's index lives).
        enroll: enroll this many unseen test classes (drawn with the seed; default all).
        stranger_classes: strangers are every image of this many other unseen test classes
            (default: ``strangers`` images of the trained classes); for data whose test classes
            are all unseen, train.classes need not be set then.
        enroll_face: enroll each class's image of this face (npz glyph sets name their faces).
        far: the gallery's threshold is the largest with a false accept rate <= ``far`` on the
            run's validation pairs (default: the run's threshold, best validation accuracy).

    Returns:
        ``one_shot_accuracy``, ``accepted_accuracy``, ``genuine_acceptance``,
        ``stranger_rejection``, ``accepted_precision`` (strangers' accepted answers counted
        wrong), ``threshold``, and the counts ``genuine`` / ``strangers`` / ``enrolled``.
    """
    for name, value in (("strangers", strangers), ("stranger_classes", stranger_classes)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if enroll is not None and enroll < 2:
        raise ValueError(f"enroll must be at least 2 classes, got {enroll}")
    resolve_device(device)  # a bad or absent device: said before any training
    run = Path(run)
    seen = [] if config is not None else [f"train.classes={SEEN}".replace(" ", "")]
    cfg = load_checked_config(config, [*seen, f"out={run}", f"train.device={device}", *overrides])
    if cfg.train.classes is None and stranger_classes is None:
        raise ValueError(f"{config}: set train.classes (the classes trained on, 'seen')")
    faces = _face_of_items(cfg.data, "test")
    face = _face_index(cfg.data, faces, enroll_face)
    _train_once(cfg, run)
    embedder = Embedder.from_run(run, device=device, calibrate=far is None, progress=print)
    test = load_dataset(cfg.data, "test", **load_options(cfg))  # type: ignore[arg-type]
    plan = _plan(cfg, test, enroll, strangers, stranger_classes, face, faces)
    folder = run / "oneshot"
    gallery_file = folder / "gallery.db"
    threshold, answers = _identify(gallery_file, embedder, run, far, test, plan)
    result = _scores(plan, answers, threshold.value)
    figure = _figure_of(folder / "oneshot.png", test, plan, answers)
    _say(result, plan, threshold, enroll_face, figure, gallery_file)
    return result


class _Plan(NamedTuple):
    """Who is enrolled and who asks: the enrolled classes and the item enrolled for each, the
    genuine queries (other items of those classes), the strangers (never enrolled), the test
    labels and class names, what the strangers are (for the printout)."""

    classes: list[int]
    enrolled: dict[int, int]
    genuine: np.ndarray
    strangers: np.ndarray
    stranger_note: str
    labels: np.ndarray
    names: dict[int, str]


def _face_index(
    spec: str, faces: tuple[list[str], np.ndarray] | None, name: str | None
) -> int | None:
    """The index of the face ``name`` to enroll (None: any face)."""
    if name is None:
        return None
    if faces is None:
        raise ValueError(f"{spec} does not name its faces: drop --enroll-face")
    if name not in faces[0]:
        raise ValueError(f"no face {name!r} in {spec}; faces: {faces[0]}")
    return faces[0].index(name)


def _train_once(config: Config, run: Path) -> None:
    """Train ``config`` into ``run`` unless it already holds a trained run."""
    if has_checkpoint(run):  # a run killed before its first save is trained again
        print(f"reusing the trained run {run} (delete it to train again)")
        return
    which = (
        "the training split" if config.train.classes is None else f"classes {config.train.classes}"
    )
    print(f"training on {which} of {config.data} into {run}")
    train(config)


def _seen_classes(config: Config, labels: np.ndarray) -> list[int]:
    """The classes trained on: ``train.classes``, else every training class, which must then
    be disjoint from the test classes."""
    if config.train.classes is not None:
        return sorted(set(config.train.classes))
    trained = load_dataset(config.data, "train", **load_options(config))  # type: ignore[arg-type]
    seen = sorted(set(trained.y.unique().tolist()))
    if set(seen) & set(labels.tolist()):
        raise ValueError(
            f"{config.data}: its test classes are also training classes; set train.classes"
        )
    return seen


def _plan(
    config: Config,
    test: ArrayDataset,
    enroll: int | None,
    strangers: int,
    stranger_classes: int | None,
    face: int | None,
    faces: tuple[list[str], np.ndarray] | None,
) -> _Plan:
    """Draw (with the config's seed) the enrolled unseen classes, the item of each to enroll,
    and the strangers."""
    labels = test.y.numpy()
    seen = _seen_classes(config, labels)
    unseen = sorted(set(np.unique(labels).tolist()) - set(seen))
    if not unseen:
        raise ValueError(f"{config.data}: no test class outside train.classes {seen}")
    rng = np.random.default_rng(config.seed)
    wanted = len(unseen) if enroll is None else enroll
    if wanted + (stranger_classes or 0) > len(unseen):
        raise ValueError(
            f"{config.data} has {len(unseen)} unseen test classes: too few to enroll {wanted} "
            f"and keep {stranger_classes or 0} as strangers"
        )
    drawn = rng.permutation(unseen).tolist()
    classes = sorted(drawn[:wanted])
    names = _names(test.classes, sorted(set(seen) | set(unseen)))
    enrolled = _enrolled_items(labels, classes, rng, face, faces[1] if faces else None)
    genuine = np.array(
        [i for i in range(len(labels)) if labels[i] in enrolled and i != enrolled[labels[i]]],
        dtype=np.int64,
    )
    if stranger_classes is not None:
        pool_classes = sorted(drawn[wanted : wanted + stranger_classes])
        stranger_ids = np.flatnonzero(np.isin(labels, pool_classes))
        note = f"every test image of {len(pool_classes)} other unseen classes"
    else:
        pool = np.flatnonzero(np.isin(labels, seen))
        stranger_ids = np.sort(rng.choice(pool, size=min(strangers, len(pool)), replace=False))
        note = f"test images of the trained classes {seen}, never enrolled"
    return _Plan(classes, enrolled, genuine, stranger_ids, note, labels, names)


def _identify(
    gallery_file: Path,
    embedder: Embedder,
    run: Path,
    far: float | None,
    test: ArrayDataset,
    plan: _Plan,
) -> tuple[Threshold, list[Identification]]:
    """A new gallery (the demo's own of a previous run removed) with one item of each
    enrolled class; the answers to the genuine queries, then to the strangers."""
    for leftover in (Path(f"{gallery_file}-wal"), Path(f"{gallery_file}-shm"), gallery_file):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(index_path(gallery_file), ignore_errors=True)
    gallery_file.parent.mkdir(parents=True, exist_ok=True)
    with Gallery.create(gallery_file, embedder, source=run, far=far, progress=print) as gallery:
        for c, i in plan.enrolled.items():
            gallery.enroll(plan.names[c], test.inputs[i : i + 1], metadata={"test_index": i})
        queries = np.concatenate([plan.genuine, plan.strangers])
        return gallery.threshold, gallery.identify(test.inputs[queries], k=len(plan.classes))


def _scores(plan: _Plan, answers: list[Identification], threshold: float) -> dict[str, float]:
    """The figures :func:`main` returns."""
    truth = [plan.names[int(plan.labels[i])] for i in plan.genuine]
    got = answers[: len(plan.genuine)]
    top1 = np.array([a.candidates[0].identity == t for a, t in zip(got, truth)])
    accepted = np.array([a.identity is not None for a in got])
    right = np.array([a.identity == t for a, t in zip(got, truth)])
    rejected = np.array([a.identity is None for a in answers[len(plan.genuine) :]])
    accepted_all = int(accepted.sum()) + int((~rejected).sum())
    return {
        "one_shot_accuracy": _rate(top1),
        "accepted_accuracy": _rate(right[accepted]),
        "genuine_acceptance": _rate(accepted),
        "stranger_rejection": _rate(rejected),
        "accepted_precision": int(right.sum()) / accepted_all if accepted_all else math.nan,
        "threshold": threshold,
        "genuine": len(plan.genuine),
        "strangers": len(plan.strangers),
        "enrolled": len(plan.enrolled),
    }


def _figure_of(path: Path, test: ArrayDataset, plan: _Plan, answers: list[Identification]) -> Path:
    """The enrolled items of the first classes, a few genuine queries of each with their
    answers, then strangers from across their classes."""
    genuine, strangers, labels, names = plan.genuine, plan.strangers, plan.labels, plan.names
    got = answers[: len(genuine)]
    shown: list[tuple[torch.Tensor, str, Identification]] = []
    per_class = 6
    for c in plan.classes[:FIGURE_CLASSES]:
        for j in np.flatnonzero(labels[genuine] == c)[:per_class]:
            shown.append((test.inputs[genuine[j]], names[c], got[j]))
    spread = np.unique(np.linspace(0, len(strangers) - 1, 2 * per_class).round().astype(int))
    for j in spread if len(strangers) else []:
        i = strangers[j]
        shown.append(
            (test.inputs[i], f"stranger ({names[int(labels[i])]})", answers[len(genuine) + j])
        )
    enrolled = [(names[c], test.inputs[plan.enrolled[c]]) for c in plan.classes[:FIGURE_CLASSES]]
    return _figure(path, enrolled, shown, columns=max(per_class, len(enrolled)))


def _say(
    result: dict[str, float],
    plan: _Plan,
    threshold: Threshold,
    enroll_face: str | None,
    figure: Path,
    gallery_file: Path,
) -> None:
    """Print the figures, one line each."""
    classes = plan.classes
    listed = ", ".join(plan.names[c] for c in classes[:10]) + (", ..." if len(classes) > 10 else "")
    how = "one enrolled test image each" + (
        f" (face {enroll_face})" if enroll_face is not None else ""
    )
    print(
        f"one-shot identification of {len(classes)} classes never trained on ({listed}), "
        f"{how}; {len(plan.genuine)} genuine queries, {len(plan.strangers)} strangers "
        f"({plan.stranger_note})"
    )
    print(f"threshold {threshold.value:.4f} ({threshold.metric}): {threshold.protocol}")
    print(
        f"one-shot accuracy (top-1 among the {len(classes)} enrolled, threshold ignored): "
        f"{result['one_shot_accuracy']:.4f} (chance {1 / len(classes):.4f})"
    )
    print(
        f"accepted answers (genuine queries within the threshold): accuracy "
        f"{result['accepted_accuracy']:.4f}; of all accepted answers, strangers included: "
        f"{result['accepted_precision']:.4f} right"
    )
    print(f"genuine queries accepted: {result['genuine_acceptance']:.4f}")
    print(f"strangers rejected (answered unknown): {result['stranger_rejection']:.4f}")
    print(f"figure: {figure}; gallery: {gallery_file}")

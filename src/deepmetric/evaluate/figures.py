"""The pictures people look at, as PNG files (matplotlib, no display needed).

Each function draws one figure from plain arrays and writes it to ``path``; none computes a
metric itself. Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so
nothing here touches matplotlib's global backend or needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

POSITIVE, NEGATIVE = "#1b9e77", "#d95f02"
RIGHT, WRONG = "#2ca02c", "#d62728"


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=kwargs.pop("figsize", (7, 4)), layout="constrained")
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


#: the validation keys of epoch records drawn per epoch: (key, label, style, colour)
VALIDATION_CURVES = (
    ("val_precision_at_1", "precision@1", "o-", "C2"),
    ("val_map_at_r", "MAP@R (stratified sample)", "s--", "C4"),
    ("val_verification_accuracy", "pair accuracy at the best threshold", "o-", "C2"),
    ("val_roc_auc", "ROC AUC", "s--", "C4"),
    ("val_triplet_accuracy", "triplets with d(a,p) < d(a,n)", "o-", "C2"),
)


def loss_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss per logged step (raw and smoothed), train / validation loss per epoch,
    the share of active triplets per logged step (batch-all averages over those only, so its
    loss can rise while the embedding improves) and validation precision@1 per epoch, from the
    records of a run's ``log.jsonl``."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_active, ax_p1) = _subplots(1, 3, figsize=(15, 4))
    active = [
        (r["step"], r["active"])
        for r in steps
        if r.get("active") is not None and np.isfinite(r["active"])
    ]
    if active:
        ax_active.plot(*zip(*active), color="C1", lw=1)
    ax_active.set(
        xlabel="optimiser step",
        ylabel="share of valid triplets",
        title="Active triplets (loss > 0) in the batch",
        ylim=(0, 1.02),
    )
    ax_active.grid(alpha=0.3)
    if steps:
        x = np.array([r["step"] for r in steps])
        y = np.array([r["loss"] for r in steps])
        ax_loss.plot(x, y, color="0.75", lw=0.8, label="train loss (logged steps)")
        window = max(1, len(y) // 30)
        ax_loss.plot(
            x[window - 1 :],
            _smooth(y, window),
            color="C0",
            lw=1.8,
            label=f"train loss (mean of {window})",
        )
    if epochs:
        ex = [r["step"] for r in epochs]
        ax_loss.plot(
            ex,
            [r["train_loss"] for r in epochs],
            "o-",
            color="C0",
            ms=5,
            label="train loss (epoch mean)",
        )
        ax_loss.plot(
            ex, [r["val_loss"] for r in epochs], "s--", color="C3", ms=5, label="validation loss"
        )
        epoch_ids = [r["epoch"] for r in epochs]
        shown = [key for key, *_ in VALIDATION_CURVES if any(key in r for r in epochs)]
        for key, label, style, color in VALIDATION_CURVES:
            if key in shown:  # older runs' logs have no MAP@R; fixed tuples have their own
                values = [np.nan if r.get(key) is None else r[key] for r in epochs]
                ax_p1.plot(epoch_ids, values, style, color=color, label=label)
        if len(shown) > 1:
            ax_p1.legend(fontsize=8)
        ax_p1.set_xticks(epoch_ids)
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="Loss during training")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    tuples = epochs and "val_precision_at_1" not in epochs[-1]
    title = "Validation tuples" if tuples else "Validation retrieval"
    ylabel = "share" if tuples else "retrieval"
    ax_p1.set(xlabel="epoch", ylabel=ylabel, title=title, ylim=(0, 1.02))
    ax_p1.grid(alpha=0.3)
    return _save(fig, path)


def distance_histograms(
    positive: np.ndarray, negative: np.ndarray, threshold: float, path: str | Path
) -> Path:
    """Overlaid histograms of same-class and different-class pair distances, with the decision
    threshold: the further apart the two humps, the better the embedding."""
    fig, ax = _subplots(figsize=(7, 4))
    hi = float(max(np.max(positive, initial=0), np.max(negative, initial=0)))
    bins = np.linspace(0, hi * 1.02 + 1e-12, 80)
    ax.hist(
        negative,
        bins=bins,
        density=True,
        alpha=0.55,
        color=NEGATIVE,
        label=f"different class ({len(negative):,} pairs)",
    )
    ax.hist(
        positive,
        bins=bins,
        density=True,
        alpha=0.55,
        color=POSITIVE,
        label=f"same class ({len(positive):,} pairs)",
    )
    ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.3f}")
    ax.set(
        xlabel="distance between the two embeddings",
        ylabel="density",
        title="Pair distances: same class vs different class",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_figure(far: np.ndarray, tar: np.ndarray, auc: float, eer: float, path: str | Path) -> Path:
    """ROC curve with a logarithmic false-accept axis (where verification systems operate),
    the EER point and the TAR at FAR = 1e-3 and 1e-2 marked."""
    fig, ax = _subplots(figsize=(6, 5))
    floor = 1e-5
    ax.plot(np.maximum(far, floor), tar, color="C0", lw=2, label=f"ROC (AUC {auc:.4f})")
    ax.plot([eer], [1 - eer], "o", color="k", label=f"EER {eer:.4f}")
    for target, marker in ((1e-3, "s"), (1e-2, "^")):
        ok = far <= target
        if ok.any():
            best = float(tar[ok].max())
            ax.plot([target], [best], marker, color="C3", label=f"TAR {best:.3f} @ FAR {target:g}")
    ax.set_xscale("log")
    ax.set(
        xlim=(floor, 1),
        ylim=(0, 1.01),
        xlabel="false accept rate (log scale)",
        ylabel="true accept rate",
        title="Verification ROC",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def embedding_map(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    max_tsne: int = 5000,
    seed: int = 0,
) -> tuple[Path, str]:
    """A 2-D map of the embeddings coloured by class: t-SNE for up to ``max_tsne`` points, PCA
    beyond. Returns the path and the method used."""
    x = embeddings.detach().float().numpy()
    y = labels.numpy()
    if len(x) <= max_tsne:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
        xy = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed
        ).fit_transform(x)
        method = "t-SNE"
    else:
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        method = "PCA"
    fig, ax = _subplots(figsize=(8, 7))
    classes = np.unique(y)
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for n, c in enumerate(classes):
        pts = xy[y == c]
        name = class_names[c] if c < len(class_names) else str(c)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6, color=cmap(n % cmap.N), label=name)
    ax.set(title=f"Test embeddings in 2-D ({method}, {len(x):,} points)", xticks=[], yticks=[])
    if len(classes) <= 20:
        ax.legend(markerscale=4, fontsize=8, loc="best", frameon=True)
    return _save(fig, path), method


def per_class_bars(
    table: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Per class: triplet ordering accuracy, verification accuracy and precision@1, side by
    side, so the weak classes stand out."""
    names = [
        class_names[r["class"]] if r["class"] < len(class_names) else str(r["class"]) for r in table
    ]
    keys = [
        ("triplet_accuracy", "triplet ordering accuracy"),
        ("verification_accuracy", "verification accuracy"),
        ("precision_at_1", "precision@1"),
    ]
    x = np.arange(len(table))
    width = 0.27
    fig, ax = _subplots(figsize=(max(7, 0.8 * len(table) + 2), 4.5))
    for n, (key, label) in enumerate(keys):
        ax.bar(x + (n - 1) * width, [r[key] for r in table], width, label=label)
    low = min([r[k] for r in table for k, _ in keys], default=0)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="score", title="Per-class scores")
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def map_at_r_versus_raw(
    network: Sequence[dict[str, Any]],
    raw: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    tags: dict[int, str],
    path: str | Path,
) -> Path:
    """Per class, MAP@R of the network beside that of the raw inputs (``by_class`` rows of
    :func:`~deepmetric.neighbors.retrieval_metrics`, in the same class order), so the classes
    where the network loses to the pixels stand out. ``tags`` (label -> "unseen" or
    "validation") are written after the class names; the classes the network never trained on
    (both tags) are hatched."""
    names = [
        (class_names[r["class"]] if r["class"] < len(class_names) else str(r["class"]))
        + (f" ({tags[r['class']]})" if r["class"] in tags else "")
        for r in network
    ]
    hatch = ["//" if r["class"] in tags else "" for r in network]
    x = np.arange(len(network))
    width = 0.4
    fig, ax = _subplots(figsize=(max(7, 0.8 * len(network) + 2), 4.5))
    ax.bar(x - width / 2, [r["map_at_r"] for r in network], width, label="network", hatch=hatch)
    ax.bar(x + width / 2, [r["map_at_r"] for r in raw], width, label="raw inputs", hatch=hatch)
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="MAP@R", title="MAP@R per class: the network against the raw inputs")
    fig.legend(fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _as_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> an array imshow takes."""
    img = x.detach().float().clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0))


def retrieval_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    queries: Sequence[int],
    neighbours: torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per query: the query image, then its nearest items in order, framed green when
    of the query's class and red when not."""
    k = neighbours.shape[1]
    fig, axes = _subplots(
        len(queries), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(queries)), squeeze=False
    )
    gray = images.shape[1] == 1
    for row, q in enumerate(queries):
        ax = axes[row, 0]
        ax.imshow(_as_image(images[q]), cmap="gray" if gray else None)
        ax.set_title(f"query: {class_names[int(labels[q])]}", fontsize=7)
        for col in range(k):
            r = int(neighbours[row, col])
            ax = axes[row, col + 1]
            ax.imshow(_as_image(images[r]), cmap="gray" if gray else None)
            right = bool(labels[r] == labels[q])
            for spine in ax.spines.values():
                spine.set_edgecolor(RIGHT if right else WRONG)
                spine.set_linewidth(3)
            ax.set_title(
                f"{col + 1}: {class_names[int(labels[r])]}",
                fontsize=7,
                color=RIGHT if right else WRONG,
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "Queries and their 5 nearest test items (green: same class, red: wrong)", fontsize=9
    )
    return _save(fig, path)

"""What the losses share: argument checks, a zero loss that keeps the graph, cosine
similarities and a stable ``log(1 + sum exp)``. (A loss's gradient computed in closed form
reaches autograd through :meth:`deepmetric.tiles.RowTiles.loss`.)"""

from __future__ import annotations

import torch

from deepmetric import mining as miners
from deepmetric.distances import check_embeddings, pairwise


def check_margin(margin: float) -> float:
    margin = float(margin)
    if not margin >= 0 or margin == float("inf"):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return margin


def check_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    multi_label: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a batch (and its reference set); return ``(labels, ref_labels)`` on the
    embeddings' device. With ``multi_label`` the labels may also be multi-hot (B, L) or a
    boolean positive mask (B, R) (:func:`deepmetric.mining.check_pair_labels`); a mask comes
    without ``ref_labels``, even with ``ref_embeddings``."""
    if labels is None:
        raise ValueError("labels is None: pass integer labels (B,)")
    mask = multi_label and _is_mask(labels)
    if not mask and (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("pass ref_embeddings and ref_labels together, or neither")
    labels_out, ref_out = check_given_batch(
        embeddings, labels, ref_embeddings, ref_labels, multi_label=multi_label
    )
    assert labels_out is not None
    return labels_out, ref_out


def _is_mask(labels: object) -> bool:
    return isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.dtype == torch.bool


def check_given_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    *,
    multi_label: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`check_batch` for a loss on given tuples (``indices=``): the labels (and the
    reference labels) may be None, and are checked when given; ``ref_labels`` needs
    ``ref_embeddings``."""
    check_embeddings(embeddings)
    if len(embeddings) == 0:
        raise ValueError("empty batch: embeddings has 0 rows")
    if labels is not None and not multi_label:
        miners.check_labels(labels, len(embeddings))
    if ref_embeddings is None and ref_labels is not None:
        raise ValueError("ref_labels were passed without ref_embeddings")
    if ref_embeddings is not None:
        check_embeddings(ref_embeddings, "ref_embeddings")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_embeddings has dimension {ref_embeddings.shape[1]}, "
                f"embeddings has {embeddings.shape[1]}"
            )
        if ref_labels is not None and not multi_label:
            miners.check_labels(ref_labels, len(ref_embeddings), "ref_labels")
    if multi_label and labels is not None:
        n_refs = len(embeddings) if ref_embeddings is None else len(ref_embeddings)
        same_set = ref_embeddings is None
        miners.check_pair_labels(labels, ref_labels, len(embeddings), n_refs, same_set=same_set)
    elif multi_label and ref_labels is not None and ref_embeddings is not None:
        if ref_labels.dim() == 1:
            miners.check_labels(ref_labels, len(ref_embeddings), "ref_labels")
        else:
            miners.check_pair_labels(
                ref_labels, None, len(ref_embeddings), 0, same_set=True, name="ref_labels"
            )
    if labels is not None:
        labels = labels.to(embeddings.device)
    if ref_labels is not None:
        ref_labels = ref_labels.to(embeddings.device)
    return labels, ref_labels


def zero(embeddings: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the graph, so ``backward()`` works and gives zeros."""
    return embeddings.sum() * 0.0


def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) cosine similarities ``x_i . y_j / (|x_i| |y_j|)`` (``y=None``: ``x`` itself), as
    ``1 - pairwise(x, y, "cosine")``: float32 (float64 if an input is) whatever the autocast
    state; a zero vector has similarity 0 to everything."""
    return 1.0 - pairwise(x, y, "cosine")


def log1p_sum_exp(a: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(1 + sum over the kept entries of exp(a))`` along ``dim``, as a logsumexp with an
    extra 0 entry, so nothing overflows; exactly 0, with a zero gradient, where nothing is kept."""
    a = torch.where(keep, a, -torch.inf)
    shape = list(a.shape)
    shape[dim] = 1
    return torch.logsumexp(torch.cat([a, a.new_zeros(shape)], dim=dim), dim=dim)

"""Training on fixed tuples (``pairs:FILE``, ``triplets:FILE``): the items the loop reads and
what validation measures on them instead of the class-based precision@1 and MAP@R.

The epoch record's validation keys, and the words the progress line puts before them, by the
kind of data (:data:`VALIDATION_KEYS`):

- classes: ``val_precision_at_1``, ``val_map_at_r``;
- pairs: ``val_verification_accuracy`` (the share of validation pairs decided right at the
  threshold that decides most of them right) and ``val_roc_auc``;
- triplets: ``val_triplet_accuracy`` (the share of validation triplets with
  d(a, p) < d(a, n)).

A record holds the keys of its kind only (NaN without validation data).
"""

from __future__ import annotations

from typing import Any

import torch

from deepmetric.data import Tuples, pixels_to_float
from deepmetric.distances import paired
from deepmetric.training.source import Source

#: kind of data (``None``: classes) -> the validation keys of its epoch records and the words
#: the progress line shows before each
VALIDATION_KEYS: dict[str | None, tuple[tuple[str, str], ...]] = {
    None: (("val_precision_at_1", "val precision@1"), ("val_map_at_r", "MAP@R")),
    "pairs": (
        ("val_verification_accuracy", "val pairs: accuracy at the best threshold"),
        ("val_roc_auc", "ROC AUC"),
    ),
    "triplets": (("val_triplet_accuracy", "val triplets with d(a,p) < d(a,n)"),),
}


class TupleSource(Source):
    """Fixed tuples as the items the training loop reads: item ``r * m + s`` (``m`` = 2 for
    pairs, 3 for triplets) is image ``s`` of tuple ``r``. The labels say what the file says:
    two items of one tuple have equal labels when declared the same (a pair's two images when
    ``same``; a triplet's anchor and positive), so the pair loss reads ``same`` from them. The
    images themselves stay stored once."""

    def __init__(self, tuples: Tuples, *, name: str = "the data") -> None:
        self.tuples = tuples
        self.data = tuples  # type: ignore[assignment]
        self.name = name
        self.items = tuples.index.reshape(-1)
        rows = torch.arange(len(tuples)).repeat_interleave(tuples.index.shape[1]) * 2
        if tuples.same is not None:
            other = torch.stack([torch.zeros_like(tuples.same), ~tuples.same], dim=1)
        else:
            other = torch.tensor([[False, False, True]]).expand(len(tuples), 3)
        self.labels = rows + other.reshape(-1).long()

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return pixels_to_float(self.tuples.images[self.items[torch.as_tensor(idx)]])


def validation_keys(kind: str | None) -> dict[str, float]:
    """The validation keys of an epoch record for ``kind`` of data, all NaN."""
    return {key: float("nan") for key, _ in VALIDATION_KEYS[kind]}


def best_accuracy(distances: torch.Tensor, same: torch.Tensor) -> float:
    """The accuracy of ``d <= t`` at the threshold ``t`` that maximises it on these pairs (equal
    distances decided alike; :func:`deepmetric.evaluate.best_threshold`'s accuracy)."""
    d, order = torch.sort(distances.double())
    s = same[order]
    negatives = int((~s).sum())
    accepted_right = torch.cumsum(s.long(), 0) + negatives - torch.cumsum((~s).long(), 0)
    cut = torch.ones(len(d), dtype=torch.bool)  # accept up to i: only where d changes
    cut[:-1] = d[1:] != d[:-1]
    best = max(negatives, int(accepted_right[cut].max())) if len(d) else 0
    return best / len(d) if len(d) else float("nan")


def roc_auc(distances: torch.Tensor, same: torch.Tensor) -> float:
    """The area under the ROC of ``d <= t``: P(d_pos < d_neg) + P(d_pos == d_neg) / 2 over the
    pairs (:func:`deepmetric.evaluate.roc_auc`); NaN without both kinds of pair."""
    pos, neg = distances[same].double(), torch.sort(distances[~same].double()).values
    if not len(pos) or not len(neg):
        return float("nan")
    above = len(neg) - torch.searchsorted(neg, pos, right=True)
    ties = torch.searchsorted(neg, pos, right=True) - torch.searchsorted(neg, pos)
    return float((above.double().sum() + ties.double().sum() / 2) / (len(pos) * len(neg)))


def tuple_validation(emb: torch.Tensor, val: TupleSource, metric: str) -> dict[str, Any]:
    """The validation keys of a tuples run from the embeddings of every item of ``val``."""
    tuples = val.tuples
    if tuples.same is not None:
        d = paired(emb[0::2], emb[1::2], metric)
        return {
            "val_verification_accuracy": best_accuracy(d, tuples.same),
            "val_roc_auc": roc_auc(d, tuples.same),
        }
    d_ap = paired(emb[0::3], emb[1::3], metric)
    d_an = paired(emb[0::3], emb[2::3], metric)
    return {"val_triplet_accuracy": float((d_ap < d_an).double().mean())}


__all__ = [
    "VALIDATION_KEYS",
    "TupleSource",
    "best_accuracy",
    "roc_auc",
    "tuple_validation",
    "validation_keys",
]

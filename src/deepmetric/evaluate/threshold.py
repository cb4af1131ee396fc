"""The verification threshold of labelled embeddings, chosen on their deterministic
verification pairs (:func:`~deepmetric.evaluate.pairs.verification_pairs` with a seed), so
``deepmetric evaluate`` and :func:`deepmetric.inference.calibrate_threshold` give the same value
for the same weights:

- ``far=None``: the accuracy-maximising threshold
  (:func:`~deepmetric.evaluate.roc.choose_threshold`);
- ``far=f``: the largest threshold whose false accept rate on the pairs is ``<= f``
  (:func:`~deepmetric.evaluate.roc.threshold_at_far`).

A threshold is a distance: never below 0.
"""

from __future__ import annotations

import torch

from deepmetric.distances import paired_at
from deepmetric.evaluate.pairs import verification_pairs
from deepmetric.evaluate.roc import choose_threshold, threshold_at_far


def validation_pairs(
    embeddings: torch.Tensor, labels: torch.Tensor, metric: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distances, same)`` of the deterministic verification pairs ``deepmetric evaluate``
    draws from a labelled set (:func:`~deepmetric.evaluate.verification_pairs`)."""
    counts = torch.unique(labels, return_counts=True)[1]
    if len(counts) < 2 or not bool((counts >= 2).any()):
        raise ValueError(
            f"the validation data has {len(counts)} class(es) and "
            f"{'no' if not bool((counts >= 2).any()) else 'some'} class with two items: "
            "verification pairs need two classes and one class with two items or more"
        )
    i, j, same = verification_pairs(labels, seed=seed)
    return paired_at(embeddings, i, j, metric), same


def fit_threshold(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    metric: str,
    far: float | None = None,
    seed: int = 0,
) -> float:
    """The threshold of labelled embeddings (N, D), labels (N,): accuracy-maximising on their
    verification pairs (``far=None``) or the largest with FAR <= ``far`` on them. Never below
    0: where even the closest pairs are to be rejected, 0 (only identical embeddings pass)."""
    return threshold_of_pairs(*validation_pairs(embeddings, labels, metric, seed), far=far)


def threshold_of_pairs(
    distances: torch.Tensor, same: torch.Tensor, far: float | None = None
) -> float:
    """The threshold of scored pairs ``distances`` (P,), ``same`` (P,) bool: accuracy-maximising
    (``far=None``) or the largest with FAR <= ``far``; never below 0."""
    if far is None:
        return max(0.0, choose_threshold(distances, same))
    return max(0.0, threshold_at_far(distances, same, far))


__all__ = ["fit_threshold", "threshold_of_pairs", "validation_pairs"]

"""The verification threshold: a distance ``t``; a pair is declared the same when ``d <= t``.

A threshold is only ever chosen on labelled pairs that it will not judge: the run's validation
split (held out of training), or held-out data the caller passes. Two rules:

- ``far=None``: the accuracy-maximising threshold (:func:`~deepmetric.evaluate.choose_threshold`),
  on the same deterministic pairs ``deepmetric evaluate`` draws
  (:func:`~deepmetric.evaluate.verification_pairs` with the run's seed), so both give the same
  value for the same weights;
- ``far=f``: the largest threshold whose false accept rate on the validation pairs is ``<= f``
  (see :func:`threshold_at_far`).

The record is saved as ``RUN_DIR/threshold.json`` with the keys ``deepmetric evaluate`` writes
(``threshold``, ``metric``, ``protocol``, ``validation_items``) plus ``far`` (null at best
accuracy) and ``weights_sha256`` (the weights it was chosen for).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deepmetric.distances import check_metric, paired_at
from deepmetric.evaluate.pairs import verification_pairs
from deepmetric.evaluate.roc import choose_threshold, threshold_at_far

THRESHOLD_FILE = "threshold.json"

#: The protocol ``deepmetric evaluate`` names for its validation threshold (the same text).
VALIDATION_PROTOCOL = "threshold chosen on the run's validation split, not on these pairs"


def far_protocol(far: float) -> str:
    return (
        f"threshold chosen on the run's validation split at a false accept rate <= {far:g} "
        "on its pairs (the largest such threshold), not on these pairs"
    )


@dataclass(frozen=True)
class Threshold:
    """A verification threshold and where it came from.

    ``value``: the distance threshold (accept ``d <= value``); ``metric``: the distance it is
    in; ``protocol``: how it was chosen; ``far``: the false accept rate target (``None``: the
    accuracy-maximising threshold); ``validation_items``: items it was chosen on;
    ``weights_sha256``: the weights it was chosen for (``None`` when unknown, e.g. written by
    ``deepmetric evaluate``).
    """

    value: float
    metric: str
    protocol: str
    far: float | None = None
    validation_items: int | None = None
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        value = self.value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"threshold must be >= 0 (a distance), got {value!r}")
        check_metric(self.metric)
        if self.far is not None and not 0.0 <= self.far <= 1.0:
            raise ValueError(f"far must be in [0, 1], got {self.far!r}")

    def to_json(self) -> dict[str, Any]:
        """The ``threshold.json`` record (``value`` is stored as ``threshold``)."""
        record = asdict(self)
        return {"threshold": record.pop("value"), **record}

    @classmethod
    def from_json(cls, record: Any, source: str = "threshold record") -> Threshold:
        """Read a ``threshold.json`` record; ``ValueError`` naming ``source`` when invalid."""
        if not isinstance(record, dict) or "threshold" not in record or "metric" not in record:
            raise ValueError(f"{source}: not a threshold record (needs threshold and metric)")
        try:
            return cls(
                value=record["threshold"],
                metric=record["metric"],
                protocol=str(record.get("protocol", "unknown")),
                far=record.get("far"),
                validation_items=record.get("validation_items"),
                weights_sha256=record.get("weights_sha256"),
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None


def read_threshold(path: str | Path) -> Threshold | None:
    """The record in ``path``; ``None`` when there is no such file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return Threshold.from_json(record, str(path))


def write_threshold(path: str | Path, threshold: Threshold) -> None:
    """Write the record atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(threshold.to_json(), indent=2))
    os.replace(partial, path)


# ----------------------------------------------------------------------------- fitting


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
    distances, same = validation_pairs(embeddings, labels, metric, seed)
    if far is None:
        return max(0.0, choose_threshold(distances, same))
    return max(0.0, threshold_at_far(distances, same, far))


__all__ = [
    "THRESHOLD_FILE",
    "VALIDATION_PROTOCOL",
    "Threshold",
    "fit_threshold",
    "read_threshold",
    "threshold_at_far",
    "validation_pairs",
    "write_threshold",
]

"""Evaluation: metrics as pure functions over embeddings and labels, figures, the HTML report,
and ``evaluate_run`` behind ``deepmetric evaluate``.

Importing this package imports the metric functions only; figures (matplotlib) and the run
evaluation load on first use.
"""

from deepmetric.evaluate.metrics import (
    clustering_nmi,
    kmeans,
    nearest_neighbors,
    nearest_other,
    nmi,
    retrieval_metrics,
)
from deepmetric.evaluate.verification import (
    best_threshold,
    choose_threshold,
    cross_validated_accuracy,
    eer,
    per_class_table,
    roc_auc,
    roc_curve,
    tar_at_far,
    test_triplet_categories,
    verification_metrics,
    verification_pairs,
)


def evaluate_run(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`deepmetric.evaluate.run.evaluate_run` (imported here on first use)."""
    from deepmetric.evaluate.run import evaluate_run as run

    return run(*args, **kwargs)


__all__ = [
    "best_threshold",
    "choose_threshold",
    "clustering_nmi",
    "cross_validated_accuracy",
    "eer",
    "evaluate_run",
    "kmeans",
    "nearest_neighbors",
    "nearest_other",
    "nmi",
    "per_class_table",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "test_triplet_categories",
    "verification_metrics",
    "verification_pairs",
]

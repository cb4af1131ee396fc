"""Evaluation: metrics as pure functions over embeddings and labels, figures, the HTML report,
and ``evaluate_run`` behind ``deepmetric evaluate``.

Modules: ``metrics`` (retrieval, clustering), ``roc`` (ROC / AUC / EER / TAR@FAR, thresholds,
cross-validation), ``pairs`` (deterministic verification pairs), ``diagnostics`` (per-class
table, test triplet categories), ``figures``, ``report``, ``run`` (evaluate a run folder).

Importing this package imports the metric functions only; figures (matplotlib) and the run
evaluation load on first use.
"""

from deepmetric.evaluate.diagnostics import JudgedPairs, per_class_table, test_triplet_categories
from deepmetric.evaluate.metrics import (
    clustering_nmi,
    kmeans,
    nearest_neighbors,
    nearest_other,
    nmi,
    raw_input_baseline,
    retrieval_metrics,
)
from deepmetric.evaluate.pairs import verification_pairs
from deepmetric.evaluate.roc import (
    OutOfFold,
    best_threshold,
    choose_threshold,
    cross_validated_accuracy,
    cross_validation_folds,
    eer,
    out_of_fold,
    roc_auc,
    roc_curve,
    tar_at_far,
    threshold_at_far,
    verification_metrics,
)


def evaluate_run(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`deepmetric.evaluate.run.evaluate_run` (imported here on first use)."""
    from deepmetric.evaluate.run import evaluate_run as run

    return run(*args, **kwargs)


__all__ = [
    "JudgedPairs",
    "OutOfFold",
    "best_threshold",
    "choose_threshold",
    "clustering_nmi",
    "cross_validated_accuracy",
    "cross_validation_folds",
    "eer",
    "evaluate_run",
    "kmeans",
    "nearest_neighbors",
    "nearest_other",
    "nmi",
    "out_of_fold",
    "per_class_table",
    "raw_input_baseline",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "test_triplet_categories",
    "threshold_at_far",
    "verification_metrics",
    "verification_pairs",
]

"""Use a trained model: embed images, verify pairs, export to ONNX.

``Embedder.from_run(run_dir)`` / ``Embedder.from_onnx(path)`` -> ``preprocess``, ``embed``,
``verify``, ``identity``; ``calibrate_threshold(run_dir, far=None)`` chooses the verification
threshold on the run's validation split; ``export_onnx(run_or_embedder, path)`` writes a
self-contained ONNX file. Modules: ``embedder``, ``threshold``, ``export``.
"""

from deepmetric.inference.embedder import (
    Embedder,
    Verification,
    calibrate_threshold,
    weights_sha256,
)
from deepmetric.inference.export import export_onnx
from deepmetric.inference.threshold import Threshold, fit_threshold, threshold_at_far

__all__ = [
    "Embedder",
    "Threshold",
    "Verification",
    "calibrate_threshold",
    "export_onnx",
    "fit_threshold",
    "threshold_at_far",
    "weights_sha256",
]

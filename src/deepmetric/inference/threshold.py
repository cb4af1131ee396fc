"""The verification threshold: a distance ``t``; a pair is declared the same when ``d <= t``.

A threshold is only ever chosen on labelled pairs that it will not judge: the run's validation
split (held out of training), or held-out data the caller passes. How it is chosen is
:mod:`deepmetric.evaluate.threshold` (the same rule ``deepmetric evaluate`` applies); the record,
``RUN_DIR/threshold.json``, is :class:`deepmetric.runs.Threshold`, read and written by
:class:`deepmetric.runs.Run` (the keys ``threshold``, ``metric``, ``protocol``,
``validation_items``, ``far``: null at best accuracy, ``weights_sha256``: the weights it was
chosen for). This module gathers both for users of :mod:`deepmetric.inference`.
"""

from deepmetric.evaluate.roc import threshold_at_far
from deepmetric.evaluate.threshold import fit_threshold, validation_pairs
from deepmetric.runs import (
    THRESHOLD_FILE,
    VALIDATION_PROTOCOL,
    Threshold,
    far_protocol,
    read_threshold,
    write_threshold,
)

__all__ = [
    "THRESHOLD_FILE",
    "VALIDATION_PROTOCOL",
    "Threshold",
    "far_protocol",
    "fit_threshold",
    "read_threshold",
    "threshold_at_far",
    "validation_pairs",
    "write_threshold",
]

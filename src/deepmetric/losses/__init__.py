"""Metric-learning losses: triplet (batch-all, batch-hard, semi-hard, explicit), contrastive,
lifted structured.

Modules: :mod:`~deepmetric.losses.triplet` (``TripletLoss``, ``triplet_margin_loss``),
:mod:`~deepmetric.losses.pairs` (``ContrastiveLoss``, ``LiftedStructuredLoss``),
:mod:`~deepmetric.losses.memory` (``CrossBatchMemory``: the last M samples as references); what
they share is in ``_common``.

Each loss is an ``nn.Module`` that calls :mod:`deepmetric.distances` and :mod:`deepmetric.mining`;
none owns a model. All take ``embeddings`` (B, D) and integer ``labels`` (B,), return a scalar,
and give 0 (with a gradient of zeros, never NaN) when the batch has nothing to learn from: no
positive pair, a single class, B = 1. Bad input raises ``ValueError`` naming the problem.

For Siamese *ranking* (RankIQA-style: a shared network scores two inputs and the loss is
``relu(margin - (s_i - s_j))`` when i should rank above j) use ``torch.nn.MarginRankingLoss``;
``examples/siamese_ranking.py`` shows it with a shared scorer.
"""

from deepmetric.losses.memory import CrossBatchMemory
from deepmetric.losses.pairs import ContrastiveLoss, LiftedStructuredLoss
from deepmetric.losses.triplet import MINING, Mining, TripletLoss, triplet_margin_loss

__all__ = [
    "MINING",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "LiftedStructuredLoss",
    "Mining",
    "TripletLoss",
    "triplet_margin_loss",
]

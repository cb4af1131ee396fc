"""Metric-learning losses: triplet (batch-all, batch-hard, semi-hard, explicit), contrastive,
lifted structured, multi-similarity, proxy anchor, ArcFace / CosFace, NT-Xent.

Modules: :mod:`~deepmetric.losses.triplet` (``TripletLoss``, ``triplet_margin_loss``),
:mod:`~deepmetric.losses.pairs` (``ContrastiveLoss``, ``LiftedStructuredLoss``),
:mod:`~deepmetric.losses.multi_similarity` (``MultiSimilarityLoss``),
:mod:`~deepmetric.losses.proxies` (``ProxyAnchorLoss``, ``MarginSoftmaxLoss``: learnable class
vectors, so their parameters go to the optimiser),
:mod:`~deepmetric.losses.self_supervised` (``NTXentLoss``: two views, no labels needed),
:mod:`~deepmetric.losses.memory` (``CrossBatchMemory``: the last M samples as references of a
batch loss); what they share is in ``_common``. :mod:`~deepmetric.losses.registry` holds them
by name (``LOSSES``: each loss's ``loss.*`` options and what each means for it, how to build it
and read it back); ``register_loss`` adds one of your own.

Each loss is an ``nn.Module`` that calls :mod:`deepmetric.distances` and :mod:`deepmetric.mining`;
none owns a model. All but ``NTXentLoss`` (two views ``z1``, ``z2`` (B, D)) take ``embeddings``
(B, D) and integer ``labels`` (B,); all return a scalar, and give 0 (with a gradient of zeros,
never NaN) when the batch has nothing to learn from: for the pair losses no positive pair, a
single class, B = 1; for the proxy losses no item of a known class (a single item still has its
proxy to learn from). Bad input raises ``ValueError`` naming the problem.

``TripletLoss``, ``ContrastiveLoss`` and ``LiftedStructuredLoss`` also take your own tuples
instead of mining: ``loss(embeddings, labels or None, indices=Triplets(...) / Pairs(...))``
(:mod:`deepmetric.mining`'s index types), or a ``miner=fn(dist, labels)`` of your own at
construction that returns them.

For Siamese *ranking* (RankIQA-style: a shared network scores two inputs and the loss is
``relu(margin - (s_i - s_j))`` when i should rank above j) use ``torch.nn.MarginRankingLoss``;
``examples/siamese_ranking.py`` shows it with a shared scorer.
"""

from deepmetric.losses.memory import CrossBatchMemory
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.pairs import ContrastiveLoss, LiftedStructuredLoss
from deepmetric.losses.proxies import MARGIN_KINDS, MarginKind, MarginSoftmaxLoss, ProxyAnchorLoss
from deepmetric.losses.registry import (
    LOSSES,
    SHARED_OPTIONS,
    LossEntry,
    name_loss,
    register_loss,
)
from deepmetric.losses.self_supervised import NTXentLoss
from deepmetric.losses.triplet import MINING, Mining, TripletLoss, triplet_margin_loss

__all__ = [
    "LOSSES",
    "MARGIN_KINDS",
    "MINING",
    "SHARED_OPTIONS",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "LiftedStructuredLoss",
    "LossEntry",
    "MarginKind",
    "MarginSoftmaxLoss",
    "Mining",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "ProxyAnchorLoss",
    "TripletLoss",
    "name_loss",
    "register_loss",
    "triplet_margin_loss",
]

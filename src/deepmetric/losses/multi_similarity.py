"""Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarities, with the paper's pair
mining."""

from __future__ import annotations

import torch
from torch import nn

from deepmetric import mining as miners
from deepmetric.losses._common import (
    check_batch,
    check_finite,
    check_nonnegative,
    check_positive,
    cosine_similarity,
    log1p_sum_exp,
)


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss with the paper's pair mining (Wang, Han, Huang, Dong and Scott,
    "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019).

    The embeddings are L2-normalised inside; ``S_ij`` is the cosine similarity of anchor i and
    reference item j. Anchor i's positives ``P_i`` (same label) and negatives ``N_i`` (another
    label) are mined against each other:

    - a negative j is kept if ``S_ij + epsilon > min over P_i of S_ik``;
    - a positive j is kept if ``S_ij - epsilon < max over N_i of S_ik``;

    so an anchor without positives keeps no negative, and one without negatives keeps no
    positive. With the kept sets ``P~_i``, ``N~_i``::

        L_i = 1/alpha * log(1 + sum_{j in P~_i} exp(-alpha (S_ij - base)))
            + 1/beta  * log(1 + sum_{j in N~_i} exp( beta (S_ij - base)))

    and the loss is the mean of ``L_i`` over **all** B anchors (the paper's ``1/m``): an anchor
    with nothing kept adds 0 but still counts. (pytorch-metric-learning averages over the anchors
    with a non-zero term instead: a larger value when some anchor has nothing kept.) Each sum is
    a logsumexp, so large ``beta`` does not overflow. Mining carries no gradient. O(B R) time and
    memory.

    Call ``loss(embeddings (B, D), labels (B,))``: the pairs come from the batch, an item never
    paired with itself (the diagonal is excluded by index, not by similarity). With
    ``ref_embeddings (R, D)`` and ``ref_labels (R,)`` (a memory bank, a gallery) the pairs come
    from the reference set instead and every reference item with the anchor's label is a
    positive (so do not include the anchors themselves there), as in ``TripletLoss``. Returns a
    scalar: 0 with a zero gradient (never NaN) when nothing is kept (a single class, no positive
    pair, B = 1, an empty reference set).

    Defaults: ``alpha=2``, ``beta=50``, ``epsilon=0.1``, the paper's values and
    pytorch-metric-learning's defaults; ``base=0.5`` (lambda) as in the authors' code and
    pytorch-metric-learning (the paper's text gives lambda = 1).

    Example::

        loss = MultiSimilarityLoss()(model(images), labels)
        loss.backward()
    """

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
    ) -> None:
        super().__init__()
        self.alpha = check_positive("alpha", alpha)
        self.beta = check_positive("beta", beta)
        self.base = check_finite("base", base)
        self.epsilon = check_nonnegative("epsilon", epsilon)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}"

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        labels, ref_labels = check_batch(embeddings, labels, ref_embeddings, ref_labels)
        sim = cosine_similarity(embeddings, ref_embeddings)  # (B, R)
        if sim.shape[1] == 0:
            return sim.sum()  # an empty reference set: 0, still connected to the embeddings
        masks = miners.pair_masks(labels, ref_labels)
        with torch.no_grad():
            s = sim.detach()
            hardest_pos = torch.where(masks.positive, s, torch.inf).amin(dim=1, keepdim=True)
            hardest_neg = torch.where(masks.negative, s, -torch.inf).amax(dim=1, keepdim=True)
            keep_neg = masks.negative & (s + self.epsilon > hardest_pos)
            keep_pos = masks.positive & (s - self.epsilon < hardest_neg)
        pos = log1p_sum_exp(-self.alpha * (sim - self.base), keep_pos, dim=1) / self.alpha
        neg = log1p_sum_exp(self.beta * (sim - self.base), keep_neg, dim=1) / self.beta
        return (pos + neg).mean()

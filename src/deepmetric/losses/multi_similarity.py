"""Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarities, with the paper's pair
mining."""

from __future__ import annotations

import torch
from torch import nn

from deepmetric import mining as miners
from deepmetric.checks import finite_number, nonnegative_number, positive_number
from deepmetric.losses._common import (
    check_batch,
    log1p_sum_exp,
    zero,
)
from deepmetric.tiles import RowTiles, check_tile_bytes


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
    a logsumexp, so large ``beta`` does not overflow. Mining carries no gradient. O(B R) time;
    memory bounded by ``tile_bytes`` per tile of rows (:mod:`deepmetric.tiles`), never (B, R).

    Call ``loss(embeddings (B, D), labels (B,))``: the pairs come from the batch, an item never
    paired with itself (the diagonal is excluded by index, not by similarity). With
    ``ref_embeddings (R, D)`` and ``ref_labels (R,)`` (a memory bank, a gallery) the pairs come
    from the reference set instead and every reference item with the anchor's label is a
    positive (so do not include the anchors themselves there), as in ``TripletLoss``. Returns a
    scalar: 0 with a zero gradient (never NaN) when nothing is kept (a single class, no positive
    pair, B = 1, an empty reference set).

    Multi-label data: ``labels`` multi-hot (B, L) 0/1 integers (``ref_labels`` (R, L)), a
    positive sharing at least one label with the anchor and a negative none (an item with no
    label has no positive, so keeps nothing, and is everyone's negative); or a boolean positive
    mask (B, B) (with ``ref_embeddings``: (B, R), no ``ref_labels``), its diagonal ignored
    (:func:`deepmetric.mining.tile_masks`).

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
        tile_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha = positive_number("alpha", alpha)
        self.beta = positive_number("beta", beta)
        self.base = finite_number("base", base)
        self.epsilon = nonnegative_number("epsilon", epsilon)
        self.tile_bytes = check_tile_bytes(tile_bytes)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}"

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        labels, ref_labels = check_batch(
            embeddings, labels, ref_embeddings, ref_labels, multi_label=True
        )
        tiles = RowTiles(embeddings, ref_embeddings, "cosine", tile_bytes=self.tile_bytes)
        if tiles.shape[1] == 0:
            return zero(embeddings)  # an empty reference set
        ref = labels if ref_labels is None else ref_labels
        total = tiles.x.new_zeros(())
        for tile in tiles:
            with torch.no_grad():
                offset = tile.start if ref_embeddings is None else None
                masks = miners.tile_masks(labels[tile.start : tile.stop], ref, self_offset=offset)
                value, grad = self._tile_sum(tile.dist, masks)
                total += value
            tiles.backprop(tile, grad)
        return tiles.loss(total / len(labels), scale=1.0 / len(labels))

    def _tile_sum(
        self, dist: torch.Tensor, masks: miners.PairMasks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum_i L_i`` over rows of the distance matrix ``d = 1 - S`` (T, R), and its gradient
        with respect to ``d``: ``w+_ij - w-_ij``, with ``w+_ij`` the share of entry j in the
        positive term's ``log(1 + sum exp)`` (0 where not kept), ``w-_ij`` the same in the
        negative term.

        The positives are packed into (T, P) slots, so their term costs O(T P); the negatives'
        term is a ``where`` over the kept negatives, a row minimum, an ``add``, one ``exp``, a
        row sum and a scale. A negative is kept where
        ``d_ij < 1 + epsilon - hardest_pos_i``; the row's nearest kept negative, when there is
        one, is its nearest negative overall, which sets both the positives' mining and the
        shift ``m_i = max(0, max_j a_ij)`` of the logsumexp
        ``log(1 + sum_j exp(a_ij)) = m_i + log(exp(-m_i) + sum_j exp(a_ij - m_i))``,
        ``a_ij = beta (1 - base - d_ij)``."""
        inf = dist.new_tensor(torch.inf)  # a 0-d tensor: torch.where is faster with it
        slots = miners.positive_slots(masks.positive)
        s_pos = 1.0 - dist.gather(1, slots.index)  # (T, P)
        hardest_pos = torch.where(slots.valid, s_pos, inf)
        if hardest_pos.shape[1] == 0:  # no positive in the tile
            hardest_pos = s_pos.new_full((len(s_pos), 1), inf)
        hardest_pos = hardest_pos.amin(dim=1, keepdim=True)
        limit = (1.0 + self.epsilon) - hardest_pos  # (T, 1); -inf without a positive
        kept = torch.where(masks.negative & (dist < limit), dist, inf)  # (T, R), inf: dropped
        nearest = kept.amin(dim=1, keepdim=True)  # inf where no negative is kept

        top = self.beta * (1.0 - self.base)  # a_ij = top - beta d_ij
        shift = (top - self.beta * nearest).clamp_min(0.0)  # m_i (0 where nothing is kept)
        e = torch.add(top - shift, kept, alpha=-self.beta).exp_()  # exp(a_ij - m_i), 0 dropped
        lse_neg = shift + torch.log(torch.exp(-shift) + e.sum(dim=1, keepdim=True))
        grad = e.mul_(-torch.exp(shift - lse_neg))  # -w-_ij

        keep_pos = slots.valid & (s_pos - self.epsilon < 1.0 - nearest)
        a_pos = torch.where(keep_pos, -self.alpha * (s_pos - self.base), -inf)  # (T, P)
        lse_pos = log1p_sum_exp(a_pos, keep_pos, dim=1)
        grad.scatter_add_(1, slots.index, (a_pos - lse_pos[:, None]).exp_())  # + w+_ij
        value = lse_pos.sum() / self.alpha + lse_neg.sum() / self.beta
        return value, grad

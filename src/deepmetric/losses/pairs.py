"""Pair losses over a labelled batch: contrastive (also on explicit Siamese pairs) and lifted
structured."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import Metric, check_embeddings, check_metric, paired, pairwise
from deepmetric.losses._common import check_batch, check_margin, with_gradient, zero


class _PairwiseLoss(nn.Module):
    """A margin and a metric, checked at construction: what the pair-based losses share."""

    def __init__(self, *, margin: float = 1.0, metric: Metric = "euclidean") -> None:
        super().__init__()
        check_metric(metric)
        self.margin = check_margin(margin)
        self.metric = metric

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}"


class ContrastiveLoss(_PairwiseLoss):
    """Contrastive loss for Siamese pairs (Hadsell, Chopra and LeCun 2006).

    For a pair at distance d: ``0.5 * d^2`` if the two are the same kind, else
    ``0.5 * relu(margin - d)^2``: similar pairs are pulled together, dissimilar ones pushed apart
    until they are ``margin`` away.

    - ``loss(x1 (N, D), x2 (N, D), same (N,))``: explicit pairs, ``same`` 1/True for a similar
      pair; the mean over the N pairs.
    - ``loss(embeddings (B, D), labels (B,))``: the mean over all B (B - 1) / 2 unordered pairs
      i < j of the batch; 0 when B = 1. O(B^2).
    """

    def _terms(self, d: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.where(same, d**2, F.relu(self.margin - d) ** 2)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, same: torch.Tensor | None = None
    ) -> torch.Tensor:
        if same is not None:
            return self._pairs(x, y, same)
        check_batch(x, y)
        y = y.to(x.device)
        n = len(x)
        if n < 2:
            return zero(x)
        d = pairwise(x, metric=self.metric)
        with torch.no_grad():
            # v = d for similar pairs, relu(margin - d) for dissimilar ones; loss terms 0.5 v^2
            # and derivative +v / -v. The diagonal (d = 0, similar) adds 0; each unordered pair
            # appears twice in the full matrix.
            same = y[:, None] == y[None, :]
            v = torch.where(same, d, (self.margin - d).clamp_min_(0.0))
            value = 0.5 * torch.vdot(v.flatten(), v.flatten())
            grad = torch.where(same, v, -v)
        return with_gradient(d, value, grad) / (n * (n - 1))

    def _pairs(self, x1: torch.Tensor, x2: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        check_embeddings(x1, "x1")
        check_embeddings(x2, "x2")
        if not isinstance(same, torch.Tensor) or same.shape != (len(x1),):
            shape = tuple(same.shape) if isinstance(same, torch.Tensor) else type(same).__name__
            raise ValueError(f"same must be a ({len(x1)},) tensor of 0/1, got {shape}")
        if not ((same == 0) | (same == 1)).all():
            raise ValueError("same must hold only 0 and 1 (or False and True)")
        if len(x1) == 0:
            raise ValueError("empty batch: no pairs")
        d = paired(x1, x2, self.metric)
        return self._terms(d, same.to(d.device).bool()).mean()


class LiftedStructuredLoss(_PairwiseLoss):
    """Lifted structured loss (Song, Xiang, Jegelka and Savarese, CVPR 2016, eq. 4).

    With D the (B, B) distance matrix and ``S_i = sum over negatives k of i of exp(margin - D_ik)``,
    each positive pair i < j gets ``J_ij = log(S_i + S_j) + D_ij`` and the loss is
    ``1 / (2 |P|) * sum over positive pairs of relu(J_ij)^2``. ``log S_i`` is a logsumexp, so
    nothing overflows; O(B^2). 0 when there is no positive pair or a single class.
    """

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_batch(embeddings, labels)
        masks = miners.pair_masks(labels.to(embeddings.device))
        upper_pos = torch.triu(masks.positive, diagonal=1)
        n_pairs = int(upper_pos.sum())
        # In a batch either every row has a negative or none does (a single class).
        if n_pairs == 0 or not bool(masks.negative.any()):
            return zero(embeddings)
        d = pairwise(embeddings, metric=self.metric)
        return with_gradient(d, *self._sum_and_gradient(d, masks, upper_pos)) / (2 * n_pairs)

    @torch.no_grad()
    def _sum_and_gradient(
        self, d: torch.Tensor, masks: miners.PairMasks, upper_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sum relu(J_ij)^2`` over the positive pairs i < j, and its gradient w.r.t. ``d``.

        With ``g_ij = 2 relu(J_ij)``: ``dJ_ij/dD_ij = 1``, and through
        ``log S_i = logsumexp_k (margin - D_ik)`` each negative (i, k) gets
        ``-c_i softmax_k(margin - D_ik)``, ``c_i = sum_j g_ij S_i / (S_i + S_j)``.
        """
        a = torch.where(masks.negative, self.margin - d, -torch.inf)  # (B, B)
        log_s = torch.logsumexp(a, dim=1)
        # J only at the positive pairs i < j, packed in (B, P) slots.
        slots = miners.positive_slots(upper_pos)
        partner = slots.index
        j = torch.logaddexp(log_s[:, None], log_s[partner]) + d.gather(1, partner)
        hinge = torch.where(slots.valid, F.relu(j), 0.0)
        g = 2.0 * hinge
        share = torch.sigmoid(log_s[:, None] - log_s[partner])  # S_i / (S_i + S_j)
        c = (g * share).sum(dim=1).scatter_add_(0, partner.flatten(), (g * (1 - share)).flatten())
        grad = a.sub_(log_s[:, None]).exp_().mul_(-c[:, None])  # softmax over negatives, -c_i
        grad.scatter_add_(1, partner, g)
        return (hinge**2).sum(), grad

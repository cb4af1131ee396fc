"""Pair losses over a labelled batch: contrastive (also on explicit Siamese pairs) and lifted
structured."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import Metric, check_embeddings, check_metric, paired
from deepmetric.losses._common import check_batch, check_margin, zero
from deepmetric.tiles import RowTiles, check_tile_bytes


class _PairwiseLoss(nn.Module):
    """A margin, a metric and a tile budget (see :mod:`deepmetric.tiles`), checked at
    construction: what the pair-based losses share."""

    def __init__(
        self, *, margin: float = 1.0, metric: Metric = "euclidean", tile_bytes: int | None = None
    ) -> None:
        super().__init__()
        check_metric(metric)
        self.margin = check_margin(margin)
        self.metric = metric
        self.tile_bytes = check_tile_bytes(tile_bytes)

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
        tiles = RowTiles(x, metric=self.metric, tile_bytes=self.tile_bytes)
        total = tiles.x.new_zeros(())
        for tile in tiles:
            with torch.no_grad():
                # v = d for similar pairs, relu(margin - d) for dissimilar ones; loss terms
                # 0.5 v^2 and derivative +v / -v. The diagonal (d = 0, similar) adds 0; each
                # unordered pair appears twice in the full matrix.
                d = tile.dist
                same = y[tile.start : tile.stop, None] == y[None, :]
                v = torch.where(same, d, (self.margin - d).clamp_min_(0.0))
                total += 0.5 * torch.vdot(v.flatten(), v.flatten())
                tiles.backprop(tile, torch.where(same, v, -v))
        return tiles.loss(total / (n * (n - 1)), scale=1.0 / (n * (n - 1)))

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
        labels = labels.to(embeddings.device)
        classes, counts = labels.unique(return_counts=True)
        n_pairs = int((counts * (counts - 1)).sum()) // 2
        if n_pairs == 0 or len(classes) < 2:  # no positive pair, or no negative at all
            return zero(embeddings)
        tiles = RowTiles(embeddings, metric=self.metric, tile_bytes=self.tile_bytes)
        with torch.no_grad():
            # Pass 1: log S_i over each row's negatives, and each row's positive partners
            # j > i (packed in slots) with their distances.
            log_s = tiles.x.new_empty(len(labels))
            partners: list[tuple[miners.Slots, torch.Tensor]] = []
            for tile in tiles:
                masks = self._masks(labels, tile.start, tile.stop)
                a = torch.where(masks.negative, self.margin - tile.dist, -torch.inf)
                log_s[tile.start : tile.stop] = torch.logsumexp(a, dim=1)
                slots = miners.positive_slots(masks.positive)
                partners.append((slots, tile.dist.gather(1, slots.index)))
            # The hinges and, for every row i, c_i (see _coefficients), over all rows.
            total, g, c = self._coefficients(log_s, partners)
        # Pass 2: the gradient, tile by tile.
        for (start, stop), g_rows, (slots, _) in zip(tiles.blocks(), g, partners):
            tile = tiles.tile(start, stop)
            with torch.no_grad():
                masks = self._masks(labels, start, stop)
                a = torch.where(masks.negative, self.margin - tile.dist, -torch.inf)
                # softmax over the negatives, times -c_i; g at the positive partners
                grad = a.sub_(log_s[start:stop, None]).exp_().mul_(-c[start:stop, None])
                grad.scatter_add_(1, slots.index, g_rows)
            tiles.backprop(tile, grad)
        return tiles.loss(total / (2 * n_pairs), scale=1.0 / (2 * n_pairs))

    @staticmethod
    def _masks(labels: torch.Tensor, start: int, stop: int) -> miners.PairMasks:
        """Rows start:stop's negatives and their positive partners j > i."""
        masks = miners.tile_masks(labels[start:stop], labels, self_offset=start)
        return masks._replace(positive=torch.triu(masks.positive, diagonal=start + 1))

    @staticmethod
    def _coefficients(
        log_s: torch.Tensor, partners: list[tuple[miners.Slots, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``sum relu(J_ij)^2`` over the positive pairs i < j; per tile, ``g_ij = 2 relu(J_ij)``
        (T, P) at the partner slots; and ``c`` (B,).

        ``J_ij = log(S_i + S_j) + D_ij``: ``dJ_ij/dD_ij = 1``, and through
        ``log S_i = logsumexp_k (margin - D_ik)`` each negative (i, k) gets
        ``-c_i softmax_k(margin - D_ik)``, ``c_i = sum_j g_ij S_i / (S_i + S_j)`` (plus the
        same from the pairs where i is the partner j, with ``S_j / (S_i + S_j)``).
        """
        total = log_s.new_zeros(())
        c = torch.zeros_like(log_s)
        gs = []
        start = 0
        for slots, d_pos in partners:
            rows = slice(start, start + len(d_pos))
            partner = slots.index
            j = torch.logaddexp(log_s[rows, None], log_s[partner]) + d_pos
            hinge = torch.where(slots.valid, F.relu(j), 0.0)
            g = 2.0 * hinge
            share = torch.sigmoid(log_s[rows, None] - log_s[partner])  # S_i / (S_i + S_j)
            c[rows] += (g * share).sum(dim=1)
            c.scatter_add_(0, partner.flatten(), (g * (1 - share)).flatten())
            total += (hinge**2).sum()
            gs.append(g)
            start += len(d_pos)
        return total, gs, c

"""Pair losses over a labelled batch, over given index pairs (``indices=``) or over the pairs a
miner of the user's own returns: contrastive (also on explicit Siamese pairs) and lifted
structured."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import (
    Metric,
    check_embeddings,
    check_metric,
    paired,
    paired_at,
    pairwise,
)
from deepmetric.losses._common import check_batch, check_given_batch, check_margin, zero
from deepmetric.tiles import RowTiles, check_tile_bytes

#: A pair miner of one's own: ``miner(dist (B, B), labels (B,))`` returning
#: :class:`~deepmetric.mining.Pairs` (or :class:`~deepmetric.mining.PairMasks`). ``dist``
#: carries no gradient.
PairMiner = Callable[[torch.Tensor, torch.Tensor], "miners.Pairs | miners.PairMasks"]


class _PairwiseLoss(nn.Module):
    """A margin, a metric, a tile budget (see :mod:`deepmetric.tiles`) and an optional miner,
    checked at construction; and the given pairs of a call: what the pair-based losses share."""

    def __init__(
        self,
        *,
        margin: float = 1.0,
        metric: Metric = "euclidean",
        miner: PairMiner | None = None,
        tile_bytes: int | None = None,
    ) -> None:
        super().__init__()
        check_metric(metric)
        if miner is not None and not callable(miner):
            raise ValueError(
                f"miner must be a callable (dist, labels) -> Pairs, got {type(miner).__name__}"
            )
        self.margin = check_margin(margin)
        self.metric = metric
        self.miner = miner
        self.tile_bytes = check_tile_bytes(tile_bytes)

    def extra_repr(self) -> str:
        mined = "" if self.miner is None else f", miner={self.miner!r}"
        return f"margin={self.margin}, metric={self.metric!r}{mined}"

    def _given_pairs(
        self, embeddings: torch.Tensor, labels: torch.Tensor | None, indices: object
    ) -> miners.Pairs:
        """Checked int64 :class:`~deepmetric.mining.Pairs` on the embeddings' device: the given
        ``indices``, or what ``self.miner`` returns for the batch."""
        if indices is not None and self.miner is not None:
            raise ValueError("this loss has a miner: pass indices= to a loss built without one")
        labels, _ = check_given_batch(embeddings, labels, multi_label=True)
        name = "indices"
        if self.miner is not None:
            if labels is None:
                raise ValueError("labels is None: the miner needs labels (B,)")
            with torch.no_grad():
                indices = self.miner(pairwise(embeddings, None, self.metric), labels)
            name = "the miner's pairs"
        pairs = miners.check_pairs(
            indices, len(embeddings), len(embeddings), same_set=True, name=name
        )
        return miners.Pairs(*(t.to(embeddings.device) for t in pairs))


class ContrastiveLoss(_PairwiseLoss):
    """Contrastive loss for Siamese pairs (Hadsell, Chopra and LeCun 2006).

    For a pair at distance d: ``0.5 * d^2`` if the two are the same kind, else
    ``0.5 * relu(margin - d)^2``: similar pairs are pulled together, dissimilar ones pushed apart
    until they are ``margin`` away.

    - ``loss(x1 (N, D), x2 (N, D), same (N,))``: explicit pairs, ``same`` 1/True for a similar
      pair; the mean over the N pairs.
    - ``loss(embeddings (B, D), labels (B,))``: the mean over all B (B - 1) / 2 unordered pairs
      i < j of the batch; 0 when B = 1. O(B^2). Multi-label: ``labels`` multi-hot (B, L) 0/1
      integers, a pair similar when the two share a label (two items with no label are
      dissimilar); or a boolean (B, B) mask of the similar pairs, diagonal ignored (an
      asymmetric mask: each ordered pair (i, j) counts by ``mask[i, j]``, half each).
    - ``loss(embeddings (B, D), labels or None, indices=Pairs(a1, p, a2, n))``: your own pairs
      of the batch, similar ``(a1[i], p[i])`` and dissimilar ``(a2[j], n[j])``
      (:class:`~deepmetric.mining.Pairs`; :class:`~deepmetric.mining.PairMasks` are read too);
      the mean over all P + N given pairs, that is ``loss(e[i], e[j], same)`` of the same rows;
      0 when none is given. ``labels`` are only checked when given. O((P + N) D).
    - ``ContrastiveLoss(miner=fn)``: ``fn(dist (B, B), labels)`` (no gradient) returns the pairs,
      used as if passed through ``indices=``.

    A ``ValueError`` names bad pairs: not integer tensors, different lengths, out of range, an
    item paired with itself.
    """

    def _terms(self, d: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.where(same, d**2, F.relu(self.margin - d) ** 2)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        same: torch.Tensor | None = None,
        *,
        indices: miners.Pairs | miners.PairMasks | None = None,
    ) -> torch.Tensor:
        if indices is not None or self.miner is not None:
            if same is not None:
                raise ValueError("same= is for explicit pairs (x1, x2, same), not with indices=")
            a1, p, a2, n = self._given_pairs(x, y, indices)
            if len(a1) + len(a2) == 0:
                return zero(x)
            d_pos = paired_at(x, a1, p, self.metric)
            d_neg = paired_at(x, a2, n, self.metric)
            total = (d_pos**2).sum() + (F.relu(self.margin - d_neg) ** 2).sum()
            return 0.5 * total / (len(a1) + len(a2))
        if same is not None:
            return self._pairs(x, y, same)
        if y is None:
            raise ValueError("labels is None: pass labels (B,), or the pairs through indices=")
        y, _ = check_batch(x, y, multi_label=True)
        n = len(x)
        if n < 2:
            return zero(x)
        tiles = RowTiles(x, metric=self.metric, tile_bytes=self.tile_bytes)
        total = tiles.x.new_zeros(())
        for tile in tiles:
            with torch.no_grad():
                # v = d for similar pairs, relu(margin - d) for dissimilar ones; loss terms
                # 0.5 v^2 and derivative +v / -v. The diagonal (d = 0, counted similar) adds
                # 0; each unordered pair appears twice in the full matrix.
                d = tile.dist
                masks = miners.tile_masks(y[tile.start : tile.stop], y, self_offset=tile.start)
                same = ~masks.negative
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


def _log_sum_exp_neg(d: torch.Tensor) -> torch.Tensor:
    """``log sum_k exp(-d_ik)`` over each row of ``d`` (T, R), +inf entries adding nothing:
    ``-m_i + log sum_k exp(m_i - d_ik)`` with ``m_i`` the row's minimum; -inf for a row of
    +inf only. Three passes over the tile."""
    nearest = d.amin(dim=1, keepdim=True)
    shift = torch.where(torch.isinf(nearest), 0.0, nearest)  # (T, 1)
    return torch.log(torch.sub(shift, d).exp_().sum(dim=1)) - shift[:, 0]


class LiftedStructuredLoss(_PairwiseLoss):
    """Lifted structured loss (Song, Xiang, Jegelka and Savarese, CVPR 2016, eq. 4).

    With D the (B, B) distance matrix and ``S_i = sum over negatives k of i of exp(margin - D_ik)``,
    each positive pair i < j gets ``J_ij = log(S_i + S_j) + D_ij`` and the loss is
    ``1 / (2 |P|) * sum over positive pairs of relu(J_ij)^2``. ``log S_i`` is a logsumexp, so
    nothing overflows; O(B^2). 0 when there is no positive pair or a single class.
    Multi-label: ``labels`` multi-hot (B, L) 0/1 integers (positive: the two share a label;
    negative: they share none; an item with no label is everyone's negative) or a boolean (B, B)
    positive mask, diagonal ignored, read on its upper triangle for the positive pairs i < j;
    an item without negatives has ``S_i = 0``; 0 when no item has a negative.

    **Your own pairs**: ``loss(embeddings, labels or None, indices=Pairs(a1, p, a2, n))`` (or
    :class:`~deepmetric.mining.PairMasks`) uses the given positive pairs ``(a1[i], p[i])`` as P
    and, for ``S_x``, the given negative pairs whose *first* index is x: ``S_x = sum over j with
    a2[j] == x of exp(margin - D(x, n[j]))`` (pytorch-metric-learning's reading); list a
    negative pair in both orders to count it for both items, as the batch form does. The mean is
    over the given positive pairs; a positive pair neither of whose items has a given negative
    adds 0, and no positive pair gives 0. With every positive pair i < j and every ordered
    negative pair (or ``pair_masks(labels)``) this is the batch loss. O((P + N) D).
    ``LiftedStructuredLoss(miner=fn)``: ``fn(dist (B, B), labels)`` returns those pairs.
    """

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        indices: miners.Pairs | miners.PairMasks | None = None,
    ) -> torch.Tensor:
        if indices is not None or self.miner is not None:
            return self._given(embeddings, self._given_pairs(embeddings, labels, indices))
        if labels is None:
            raise ValueError("labels is None: pass labels (B,), or the pairs through indices=")
        labels, _ = check_batch(embeddings, labels, multi_label=True)
        classes = labels.dim() == 1
        n_pairs = 0  # counted in pass 1 for multi-label data
        if classes:  # count the pairs before computing any distance
            names, counts = labels.unique(return_counts=True)
            n_pairs = int((counts * (counts - 1)).sum()) // 2
            if n_pairs == 0 or len(names) < 2:  # no positive pair, or no negative at all
                return zero(embeddings)
        tiles = RowTiles(embeddings, metric=self.metric, tile_bytes=self.tile_bytes)
        inf = tiles.x.new_tensor(torch.inf)  # a 0-d tensor: torch.where is faster with it
        with torch.no_grad():
            # Pass 1: log S_i over each row's negatives, and the number of positive pairs.
            # Nothing of a tile outlives it but log_s, allocated before: long-lived small
            # tensors between the tiles would keep the heap from reusing their memory.
            log_s = tiles.x.new_empty(len(labels))
            for tile in tiles:
                if classes:  # only the negatives are needed here: no partner mask
                    rows = labels[tile.start : tile.stop]
                    negative = miners.tile_masks(rows, labels, self_offset=tile.start).negative
                else:
                    masks = self._masks(labels, tile.start, tile.stop)
                    negative = masks.negative
                    n_pairs += int(miners.row_counts(masks.positive).sum())
                negatives = torch.where(negative, tile.dist, inf)
                log_s[tile.start : tile.stop] = self.margin + _log_sum_exp_neg(negatives)
            nothing = n_pairs == 0 or bool(torch.isinf(log_s).all())  # multi-label's exit
        if nothing:
            return zero(embeddings)
        with torch.no_grad():
            # A row without negatives (multi-label) has log S = -inf and no softmax term.
            log_s_safe = torch.where(torch.isinf(log_s), 0.0, log_s)
            c = torch.zeros_like(log_s)  # see _pairs_sum; complete for a row once its tile's
            total = log_s.new_zeros(())  # pairs are in, as a row's partners come after it
        # Pass 2: the hinges, c, and the gradient, tile by tile.
        for tile in tiles:
            with torch.no_grad():
                masks = self._masks(labels, tile.start, tile.stop)
                slots = miners.positive_slots(masks.positive)
                rows = slice(tile.start, tile.stop)
                value, g = self._pairs_sum(log_s, rows, slots, tile.dist.gather(1, slots.index), c)
                total += value
                # softmax over the negatives, exp(margin - D_ik - log S_i), times -c_i; then g
                # at the positive partners
                negatives = torch.where(masks.negative, tile.dist, inf)
                grad = torch.sub((self.margin - log_s_safe[rows])[:, None], negatives).exp_()
                grad.mul_(-c[rows, None]).scatter_add_(1, slots.index, g)
            tiles.backprop(tile, grad)
        return tiles.loss(total / (2 * n_pairs), scale=1.0 / (2 * n_pairs))

    def _given(self, x: torch.Tensor, pairs: miners.Pairs) -> torch.Tensor:
        """The loss on checked pairs, by autograd over the gathered distances. Items without a
        given negative get ``log S = -inf`` through ``torch.where`` on safe values, so no NaN
        reaches the gradient."""
        a1, p, a2, n = pairs
        if len(a1) == 0:
            return zero(x)
        d_pos = paired_at(x, a1, p, self.metric)
        v = self.margin - paired_at(x, a2, n, self.metric)  # (N,)
        has = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        has[a2] = True
        with torch.no_grad():  # per-item max of v, for a stable log-sum-exp
            top = torch.full((len(x),), -torch.inf, dtype=v.dtype, device=x.device)
            top = top.scatter_reduce(0, a2, v, "amax")
            top = torch.where(has, top, 0.0)
        s = torch.zeros(len(x), dtype=v.dtype, device=x.device).index_add(
            0, a2, (v - top[a2]).exp()
        )
        log_s = torch.where(has, torch.log(torch.where(has, s, 1.0)) + top, -torch.inf)
        valid = has[a1] | has[p]
        j = torch.logaddexp(torch.where(valid, log_s[a1], 0.0), torch.where(valid, log_s[p], 0.0))
        hinge = torch.where(valid, F.relu(j + d_pos), 0.0)
        return (hinge**2).sum() / (2 * len(a1))

    @staticmethod
    def _masks(labels: torch.Tensor, start: int, stop: int) -> miners.PairMasks:
        """Rows start:stop's negatives and their positive partners j > i."""
        masks = miners.tile_masks(labels[start:stop], labels, self_offset=start)
        return masks._replace(positive=torch.triu(masks.positive, diagonal=start + 1))

    @staticmethod
    def _pairs_sum(
        log_s: torch.Tensor,
        rows: slice,
        slots: miners.Slots,
        d_pos: torch.Tensor,
        c: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows ``rows`` and their positive partners j > i (``slots``, distances
        ``d_pos`` (T, P)): ``sum relu(J_ij)^2`` and ``g_ij = 2 relu(J_ij)`` (T, P); adds the
        pairs' shares to ``c`` (B,).

        ``J_ij = log(S_i + S_j) + D_ij``: ``dJ_ij/dD_ij = 1``, and through
        ``log S_i = logsumexp_k (margin - D_ik)`` each negative (i, k) gets
        ``-c_i softmax_k(margin - D_ik)``, ``c_i = sum_j g_ij S_i / (S_i + S_j)`` (plus the
        same from the pairs where i is the partner j, with ``S_j / (S_i + S_j)``).
        """
        partner = slots.index
        j = torch.logaddexp(log_s[rows, None], log_s[partner]) + d_pos
        hinge = torch.where(slots.valid, F.relu(j), 0.0)
        g = 2.0 * hinge
        # S_i / (S_i + S_j); 1/2 (unused: g = 0) where neither has a negative
        share = torch.sigmoid((log_s[rows, None] - log_s[partner]).nan_to_num_(0.0))
        c[rows] += (g * share).sum(dim=1)
        c.scatter_add_(0, partner.flatten(), (g * (1 - share)).flatten())
        return (hinge**2).sum(), g

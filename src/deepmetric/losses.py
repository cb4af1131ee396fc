"""Metric-learning losses: triplet (batch-all, batch-hard, semi-hard, explicit), contrastive,
lifted structured.

Each loss is an ``nn.Module`` that calls :mod:`deepmetric.distances` and :mod:`deepmetric.mining`;
none owns a model. All take ``embeddings`` (B, D) and integer ``labels`` (B,), return a scalar,
and give 0 (with a gradient of zeros, never NaN) when the batch has nothing to learn from: no
positive pair, a single class, B = 1. Bad input raises ``ValueError`` naming the problem.

For Siamese *ranking* (RankIQA-style: a shared network scores two inputs and the loss is
``relu(margin - (s_i - s_j))`` when i should rank above j) use ``torch.nn.MarginRankingLoss``;
``examples/siamese_ranking.py`` shows it with a shared scorer.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import Metric, check_embeddings, check_metric, paired, pairwise

Mining = Literal["batch_all", "batch_hard", "semi_hard"]
MINING: tuple[str, ...] = get_args(Mining)


def _check_margin(margin: float) -> float:
    margin = float(margin)
    if not margin >= 0 or margin == float("inf"):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return margin


def _check_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> None:
    check_embeddings(embeddings)
    if len(embeddings) == 0:
        raise ValueError("empty batch: embeddings has 0 rows")
    miners.check_labels(labels, len(embeddings))
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("pass ref_embeddings and ref_labels together, or neither")
    if ref_embeddings is not None and ref_labels is not None:
        check_embeddings(ref_embeddings, "ref_embeddings")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_embeddings has dimension {ref_embeddings.shape[1]}, "
                f"embeddings has {embeddings.shape[1]}"
            )
        miners.check_labels(ref_labels, len(ref_embeddings), "ref_labels")


def _zero(embeddings: torch.Tensor) -> torch.Tensor:
    """A zero loss still connected to the graph, so ``backward()`` works and gives zeros."""
    return embeddings.sum() * 0.0


class _ScalarWithGradient(torch.autograd.Function):
    """A scalar ``value`` of ``dist`` whose gradient ``grad`` (same shape as ``dist``) the caller
    computed in closed form, without building an autograd graph of (B, R) intermediates.
    No double backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        dist: torch.Tensor,
        value: torch.Tensor,
        grad: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad_output * grad, None, None


def _with_gradient(dist: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return _ScalarWithGradient.apply(dist, value.detach(), grad.detach())


@torch.no_grad()
def _soft_triplet_sum(
    dist: torch.Tensor, masks: miners.PairMasks
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum over valid (a, p, n) of softplus(d_ap - d_an)`` and its gradient w.r.t. ``dist``:
    ``sum_n sigmoid(d_ap - d_an)`` at (a, p), ``-sum_p sigmoid(d_ap - d_an)`` at (a, n).
    One (B, R) pass per positive slot: O(P B R) time, O(B R) memory."""
    slots = miners.positive_slots(masks.positive)
    grad = torch.zeros_like(dist)
    total = dist.new_zeros(())
    for j in range(slots.index.shape[1]):
        positive = slots.index[:, j : j + 1]  # (B, 1)
        x = dist.gather(1, positive) - dist  # d_ap - d_an for every n, (B, R)
        keep = masks.negative & slots.valid[:, j : j + 1]
        total += torch.where(keep, F.softplus(x), 0.0).sum()
        slope = torch.where(keep, torch.sigmoid(x), 0.0)
        grad -= slope
        grad.scatter_add_(1, positive, slope.sum(dim=1, keepdim=True))
    return total, grad


class TripletLoss(nn.Module):
    """Triplet loss over all the triplets of a labelled batch, with online mining.

    For a valid triplet (a, p, n) (``label[a] == label[p]``, a != p, ``label[n] != label[a]``) the
    loss is ``relu(d_ap - d_an + margin)``, or ``softplus(d_ap - d_an)`` with ``soft=True``
    (the soft margin of Hermans et al. 2017; ``margin`` is then unused). ``mining`` decides which
    triplets count and what is averaged:

    - ``"batch_all"``: every valid triplet; the mean over those with a loss > 0 (with ``soft``,
      over all valid triplets). O(B^2 log B) or O(K B^2), O(B^2) memory.
    - ``"batch_hard"``: per anchor with a positive and a negative, its farthest positive and
      nearest negative; the mean over those anchors (Hermans et al. 2017). O(B^2).
    - ``"semi_hard"``: per positive pair, the nearest negative farther than the positive, or the
      farthest negative if there is none; the mean over all those pairs (FaceNet, Schroff et al.
      2015, with TensorFlow Addons' semantics). O(B^2 log B) or O(K B^2).

    Call ``loss(embeddings (B, D), labels (B,))``, or with ``ref_embeddings (R, D)`` and
    ``ref_labels (R,)`` to take positives and negatives from a reference set (a memory bank)
    instead of the batch. Returns a scalar; 0 when there is no valid triplet.

    Example::

        loss = TripletLoss(margin=0.2, mining="semi_hard")(model(images), labels)
        loss.backward()
    """

    def __init__(
        self,
        *,
        margin: float = 0.2,
        mining: Mining = "batch_all",
        metric: Metric = "euclidean",
        soft: bool = False,
        method: miners.Method = "auto",
    ) -> None:
        super().__init__()
        if mining not in MINING:
            raise ValueError(f"unknown mining {mining!r}; expected one of {', '.join(MINING)}")
        check_metric(metric)
        miners.check_method(method)
        self.margin = _check_margin(margin)
        self.mining = mining
        self.metric = metric
        self.soft = bool(soft)
        self.method = method

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, metric={self.metric!r}, " + (
            f"soft={self.soft}"
        )

    def _hinge(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x + margin)`` or ``softplus(x)`` for x = d_ap - d_an."""
        return F.softplus(x) if self.soft else F.relu(x + self.margin)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_batch(embeddings, labels, ref_embeddings, ref_labels)
        labels = labels.to(embeddings.device)
        if ref_labels is not None:
            ref_labels = ref_labels.to(embeddings.device)
        dist = pairwise(embeddings, ref_embeddings, self.metric)
        if self.mining == "batch_all":
            return self._batch_all(embeddings, dist, labels, ref_labels)
        if self.mining == "batch_hard":
            triplets = miners.batch_hard(dist, labels, ref_labels)
        else:
            triplets = miners.semi_hard(dist, labels, ref_labels, method=self.method)
        if len(triplets.anchor) == 0:
            return _zero(embeddings)
        d_ap = dist[triplets.anchor, triplets.positive]
        d_an = dist[triplets.anchor, triplets.negative]
        return self._hinge(d_ap - d_an).mean()

    def _batch_all(
        self,
        embeddings: torch.Tensor,
        dist: torch.Tensor,
        labels: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.soft:
            masks = miners.pair_masks(labels, ref_labels)
            count = int((masks.positive.sum(dim=1) * masks.negative.sum(dim=1)).sum())
            if count == 0:
                return _zero(embeddings)
            return _with_gradient(dist, *_soft_triplet_sum(dist, masks)) / count
        # Given the active set, the hinge sum is linear in dist:
        # sum_(a,p) c_ap (d_ap + m) - sum_(a,n) c_an d_an, with the counts c from the miner.
        active = miners.batch_all_counts(
            dist, labels, ref_labels, margin=self.margin, method=self.method
        )
        count = int(active.per_slot.sum())
        if count == 0:
            return _zero(embeddings)
        with torch.no_grad():
            grad = active.per_negative.to(dist.dtype).neg_()
            grad.scatter_add_(1, active.slots.index, active.per_slot.to(dist.dtype))
            value = torch.vdot(grad.flatten(), dist.flatten()) + self.margin * count
        return _with_gradient(dist, value, grad) / count


def triplet_margin_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    margin: float = 0.2,
    metric: Metric = "euclidean",
    soft: bool = False,
) -> torch.Tensor:
    """Triplet loss on explicit triplets, as a three-input triplet network produces them.

    ``mean_i relu(d(a_i, p_i) - d(a_i, n_i) + margin)`` (``softplus(d_ap - d_an)`` with
    ``soft=True``) over (N, D) tensors ``anchor``, ``positive``, ``negative``; returns a scalar.
    """
    margin = _check_margin(margin)
    if not (anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            "anchor, positive and negative must have the same shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if len(anchor) == 0:
        raise ValueError("empty batch: no triplets")
    x = paired(anchor, positive, metric) - paired(anchor, negative, metric)
    return (F.softplus(x) if soft else F.relu(x + margin)).mean()


class _PairwiseLoss(nn.Module):
    """A margin and a metric, checked at construction: what the pair-based losses share."""

    def __init__(self, *, margin: float = 1.0, metric: Metric = "euclidean") -> None:
        super().__init__()
        check_metric(metric)
        self.margin = _check_margin(margin)
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
        _check_batch(x, y)
        y = y.to(x.device)
        n = len(x)
        if n < 2:
            return _zero(x)
        d = pairwise(x, metric=self.metric)
        with torch.no_grad():
            # v = d for similar pairs, relu(margin - d) for dissimilar ones; loss terms 0.5 v^2
            # and derivative +v / -v. The diagonal (d = 0, similar) adds 0; each unordered pair
            # appears twice in the full matrix.
            same = y[:, None] == y[None, :]
            v = torch.where(same, d, (self.margin - d).clamp_min_(0.0))
            value = 0.5 * torch.vdot(v.flatten(), v.flatten())
            grad = torch.where(same, v, -v)
        return _with_gradient(d, value, grad) / (n * (n - 1))

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
        _check_batch(embeddings, labels)
        masks = miners.pair_masks(labels.to(embeddings.device))
        upper_pos = torch.triu(masks.positive, diagonal=1)
        n_pairs = int(upper_pos.sum())
        # In a batch either every row has a negative or none does (a single class).
        if n_pairs == 0 or not bool(masks.negative.any()):
            return _zero(embeddings)
        d = pairwise(embeddings, metric=self.metric)
        return _with_gradient(d, *self._sum_and_gradient(d, masks, upper_pos)) / (2 * n_pairs)

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

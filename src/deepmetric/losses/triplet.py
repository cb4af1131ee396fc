"""Triplet losses: over a labelled batch with online mining (batch-all, batch-hard, semi-hard)
or a miner of the user's own, over given index triplets of a batch (``indices=``), and over
explicit (anchor, positive, negative) embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import Metric, check_metric, paired, pairwise
from deepmetric.losses._common import check_batch, check_given_batch, check_margin, zero
from deepmetric.tiles import Entries, RowTiles, check_tile_bytes

Mining = Literal["batch_all", "batch_hard", "semi_hard"]
#: the names of :data:`deepmetric.mining.MINING_RULES`, the table ``mining=`` is looked up in
MINING: tuple[str, ...] = tuple(miners.MINING_RULES)

#: A triplet miner of one's own: ``miner(dist (B, R), labels (B,))`` (with a reference set,
#: ``miner(dist, labels, ref_labels (R,))``, the signature of :mod:`deepmetric.mining`'s miners)
#: returning :class:`~deepmetric.mining.Triplets`. ``dist`` carries no gradient.
TripletMiner = Callable[..., miners.Triplets]


@torch.no_grad()
def _soft_triplet_sum(
    dist: torch.Tensor, masks: miners.PairMasks
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum over valid (a, p, n) of softplus(d_ap - d_an)`` and its gradient w.r.t. ``dist``:
    ``sum_n sigmoid(d_ap - d_an)`` at (a, p), ``-sum_p sigmoid(d_ap - d_an)`` at (a, n).
    One (T, R) pass per positive slot: O(P T R) time, O(T R) memory."""
    slots = miners.positive_slots(masks.positive)
    grad = torch.zeros_like(dist)
    total = dist.new_zeros(())
    for j in range(slots.index.shape[1]):
        positive = slots.index[:, j : j + 1]  # (T, 1)
        x = dist.gather(1, positive) - dist  # d_ap - d_an for every n, (T, R)
        keep = masks.negative & slots.valid[:, j : j + 1]
        total += torch.where(keep, F.softplus(x), 0.0).sum()
        slope = torch.where(keep, torch.sigmoid(x), 0.0)
        grad -= slope
        grad.scatter_add_(1, positive, slope.sum(dim=1, keepdim=True))
    return total, grad


def _triplets_sum(
    dist: torch.Tensor, triplets: miners.Triplets, hinge: str, margin: float
) -> tuple[torch.Tensor, Entries]:
    """``sum_t h(d_ap - d_an)`` over listed triplets (``anchor`` indexing rows of ``dist``),
    ``h`` = ``relu(. + margin)`` or ``softplus``, and its gradient w.r.t. ``dist`` as
    :class:`~deepmetric.tiles.Entries`: ``h'`` at (a, p), ``-h'`` at (a, n), summed over
    triplets sharing a pair. ``relu'(0) = 0``."""
    a, p, n = triplets
    x = dist[a, p] - dist[a, n]
    if hinge == "soft":
        value, slope = F.softplus(x).sum(), torch.sigmoid(x)
    else:
        value, slope = F.relu(x + margin).sum(), (x + margin > 0).to(dist.dtype)
    return value, Entries(torch.cat([a, a]), torch.cat([p, n]), torch.cat([slope, -slope]))


class TripletLoss(nn.Module):
    """Triplet loss over the triplets of a labelled batch, with online mining, or over given
    triplets.

    For a triplet (a, p, n) the loss is ``relu(d_ap - d_an + margin)``, or
    ``softplus(d_ap - d_an)`` with ``soft=True`` (the soft margin of Hermans et al. 2017;
    ``margin`` is then unused). A triplet is *valid* when ``label[a] == label[p]``, a != p, and
    ``label[n] != label[a]``. ``mining`` decides which valid triplets count and what is averaged:

    - ``"batch_all"`` (the default): every valid triplet; the mean over those with a loss > 0
      (with ``soft``, over all valid triplets). O(B^2 log B) or O(K B^2).
    - ``"batch_hard"``: per anchor with a positive and a negative, its farthest positive and
      nearest negative; the mean over those anchors (Hermans et al. 2017). O(B^2).
    - ``"semi_hard"``: per positive pair, the nearest negative farther than the positive, or the
      farthest negative if there is none; the mean over all those pairs (FaceNet, Schroff et al.
      2015, with TensorFlow Addons' semantics). O(B^2 log B) or O(K B^2).

    Call ``loss(embeddings (B, D), labels (B,))``, or with ``ref_embeddings (R, D)`` and
    ``ref_labels (R,)`` to take positives and negatives from a reference set (a memory bank)
    instead of the batch. Returns a scalar; 0 when there is no valid triplet.

    **Multi-label data.** ``labels`` may be multi-hot (B, L) 0/1 integers (``ref_labels``
    (R, L)): p is a positive of a when they share a label, n a negative when they share none
    (an item with no label has no positive and is everyone's negative); or a boolean positive
    mask (B, B) (with ``ref_embeddings``: (B, R), and no ``ref_labels``), its diagonal ignored.
    See :func:`deepmetric.mining.tile_masks`; memory stays bounded for multi-hot labels (the
    label rows are tiled too); a mask is (B, R) by nature.

    **Your own triplets.** ``loss(embeddings, labels, indices=Triplets(anchor, positive,
    negative))`` skips mining: ``anchor`` (T,) indexes the batch, ``positive`` and ``negative``
    (T,) the reference set (the batch itself without ``ref_embeddings``). ``labels`` (and
    ``ref_labels``) may be None; when given they are only checked, not compared with the
    triplets. The loss is the mean over **all** T triplets, ``mean_t relu(d_ap - d_an + margin)``
    (not only over those with a loss > 0, as batch-all averages): with the euclidean metric and
    ``soft=False`` this is ``torch.nn.functional.triplet_margin_loss(e[a], e[p], e[n],
    margin=margin, eps=0)``, values and gradients; torch's default ``eps=1e-6`` adds 1e-6 to
    every coordinate difference, so its value differs by about 1e-6. T = 0 gives 0 (torch: NaN).
    Gradients come from autograd on the T gathered rows: O(T D) time and memory. A
    ``ValueError`` names bad indices: not integer tensors, different lengths, out of range, a
    positive equal to its negative, or (without a reference set) an anchor equal to its
    positive or negative.

    **Your own miner.** ``TripletLoss(miner=fn)`` calls ``fn(dist, labels)`` (see
    :data:`TripletMiner`) on the (B, R) distance matrix, without gradient, and uses the
    triplets it returns as if passed through ``indices=`` (the mean over all of them).
    :mod:`deepmetric.mining`'s miners fit: ``miner=mining.batch_hard`` gives the loss of
    ``mining="batch_hard"``. Unlike the built-in mining, this holds the whole (B, R) matrix.
    ``miner`` replaces ``mining`` (pass one or neither), and a loss built with a miner takes no
    ``indices=``.

    Memory of the built-in mining is bounded at any B: the (B, R) distances are visited in tiles
    of rows of ``tile_bytes`` each (default 8 MiB on the CPU, 512 MiB on a GPU) and the
    gradient with respect to the embeddings is gathered tile by tile (:mod:`deepmetric.tiles`),
    so a few tiles and the (B, D) gradients are all that is held, never a (B, R) matrix.

    Example::

        loss = TripletLoss(margin=0.2, mining="semi_hard")(model(images), labels)
        loss = TripletLoss(margin=0.2)(model(images), None, indices=Triplets(a, p, n))
        loss.backward()
    """

    def __init__(
        self,
        *,
        margin: float = 0.2,
        mining: Mining | None = None,
        miner: TripletMiner | None = None,
        metric: Metric = "euclidean",
        soft: bool = False,
        method: miners.Method = "auto",
        tile_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if miner is not None and mining is not None:
            raise ValueError("pass mining= (a built-in rule) or miner= (your own), not both")
        if miner is not None and not callable(miner):
            raise ValueError(
                f"miner must be a callable (dist, labels) -> Triplets, got {type(miner).__name__}"
            )
        mining = "batch_all" if mining is None else mining
        if mining not in MINING:
            raise ValueError(f"unknown mining {mining!r}; expected one of {', '.join(MINING)}")
        check_metric(metric)
        miners.check_method(method)
        self.margin = check_margin(margin)
        self.mining = mining
        self.miner = miner
        self.metric = metric
        self.soft = bool(soft)
        self.method = method
        self.tile_bytes = check_tile_bytes(tile_bytes)

    def extra_repr(self) -> str:
        rule = f"mining={self.mining!r}" if self.miner is None else f"miner={self.miner!r}"
        return f"margin={self.margin}, {rule}, metric={self.metric!r}, soft={self.soft}"

    def _hinge(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x + margin)`` or ``softplus(x)`` for x = d_ap - d_an."""
        return F.softplus(x) if self.soft else F.relu(x + self.margin)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        ref_embeddings: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
        *,
        indices: miners.Triplets | None = None,
    ) -> torch.Tensor:
        if indices is not None or self.miner is not None:
            return self._given(embeddings, labels, ref_embeddings, ref_labels, indices)
        if labels is None:
            raise ValueError("labels is None: pass labels (B,), or the triplets through indices=")
        labels, ref_labels = check_batch(
            embeddings, labels, ref_embeddings, ref_labels, multi_label=True
        )
        tiles = RowTiles(embeddings, ref_embeddings, self.metric, tile_bytes=self.tile_bytes)
        ref = labels if ref_labels is None else ref_labels
        total, count = tiles.x.new_zeros(()), 0
        for tile in tiles:
            offset = tile.start if ref_embeddings is None else None
            masks = miners.tile_masks(labels[tile.start : tile.stop], ref, self_offset=offset)
            value, n, grad = self._tile_sum(tile.dist, masks)
            total += value
            count += n
            tiles.backprop(tile, grad)
        if count == 0:
            return zero(embeddings)
        return tiles.loss(total / count, scale=1.0 / count)

    def _given(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        ref_embeddings: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
        indices: object,
    ) -> torch.Tensor:
        """The mean hinge over given triplets, or over those ``self.miner`` returns."""
        if indices is not None and self.miner is not None:
            raise ValueError("this loss has a miner: pass indices= to a loss built without one")
        labels, ref_labels = check_given_batch(
            embeddings, labels, ref_embeddings, ref_labels, multi_label=True
        )
        ref = embeddings if ref_embeddings is None else ref_embeddings
        name = "indices"
        if self.miner is not None:
            if labels is None:
                raise ValueError("labels is None: the miner needs labels (B,)")
            mask = labels.dim() == 2 and labels.dtype == torch.bool
            if ref_embeddings is not None and ref_labels is None and not mask:
                raise ValueError("ref_labels is None: the miner needs them with ref_embeddings")
            with torch.no_grad():
                dist = pairwise(embeddings, ref_embeddings, self.metric)
                if ref_labels is None:
                    indices = self.miner(dist, labels)
                else:
                    indices = self.miner(dist, labels, ref_labels)
            name = "the miner's triplets"
        a, p, n = miners.check_triplets(
            indices, len(embeddings), len(ref), same_set=ref_embeddings is None, name=name
        )
        if len(a) == 0:
            return zero(embeddings)
        a, p, n = a.to(embeddings.device), p.to(embeddings.device), n.to(embeddings.device)
        anchors = embeddings[a]
        x = paired(anchors, ref[p], self.metric) - paired(anchors, ref[n], self.metric)
        return self._hinge(x).mean()

    @torch.no_grad()
    def _tile_sum(
        self, dist: torch.Tensor, masks: miners.PairMasks
    ) -> tuple[torch.Tensor, int, torch.Tensor | Entries]:
        """The loss's sum over the triplets of rows of the distance matrix (T, R), how many
        terms it averages over, and the sum's gradient w.r.t. ``dist``."""
        tile = miners.MINING_RULES[self.mining].tile
        if tile is not None:  # the rule lists the triplets
            triplets = tile(dist, masks, method=self.method)
            hinge = "soft" if self.soft else "margin"
            value, grad = _triplets_sum(dist, triplets, hinge, self.margin)
            return value, len(triplets.anchor), grad
        if self.soft:  # batch-all, soft: every valid triplet counts
            count = int((masks.positive.sum(dim=1) * masks.negative.sum(dim=1)).sum())
            value, grad = _soft_triplet_sum(dist, masks)
            return value, count, grad
        return self._batch_all_sum(dist, masks)

    def _batch_all_sum(
        self, dist: torch.Tensor, masks: miners.PairMasks
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        # Given the active set, the hinge sum is linear in dist:
        # sum_(a,p) c_ap (d_ap + m) - sum_(a,n) c_an d_an, with the counts c from the miner.
        active = miners.active_counts_tile(dist, masks, margin=self.margin, method=self.method)
        count = int(active.per_slot.sum())
        grad = active.per_negative.to(dist.dtype).neg_()
        grad.scatter_add_(1, active.slots.index, active.per_slot.to(dist.dtype))
        value = torch.vdot(grad.flatten(), dist.flatten()) + self.margin * count
        return value, count, grad


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
    margin = check_margin(margin)
    if not (anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            "anchor, positive and negative must have the same shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if len(anchor) == 0:
        raise ValueError("empty batch: no triplets")
    x = paired(anchor, positive, metric) - paired(anchor, negative, metric)
    return (F.softplus(x) if soft else F.relu(x + margin)).mean()

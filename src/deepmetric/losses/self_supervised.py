"""Self-supervised contrastive loss over two augmented views: NT-Xent (SimCLR)."""

from __future__ import annotations

import torch
from torch import nn

from deepmetric import mining as miners
from deepmetric.checks import positive_number
from deepmetric.distances import check_embeddings
from deepmetric.tiles import RowTiles, check_tile_bytes


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy, NT-Xent (Chen, Kornblith, Norouzi and
    Hinton, "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
    eq. 1).

    ``z1`` and ``z2`` (B, D) are two augmented views of the same B items; the 2B embeddings
    ``z = [z1; z2]`` are L2-normalised inside and ``s_ij`` is their cosine similarity. Each of
    the 2B anchors i has its other view ``i'`` as the positive and the other 2B - 2 embeddings as
    negatives::

        l_i = -s_ii' / t + log sum_{k != i} exp(s_ik / t)        (the positive is in the sum)

    and the loss is the mean of ``l_i`` over the 2B anchors; ``t`` is ``temperature``.

    With ``labels`` (B,) (the same label for both views of an item), the other items of the
    anchor's class, both their views, are left out of the sum: they are neither positives nor
    negatives. ``labels=None`` (the default) is the pure self-supervised loss, every other item
    a negative.

    ``temperature=0.1`` (SimCLR's ImageNet setting; its CIFAR-10 runs use 0.5): lower values
    weigh the hardest negatives more. O(B^2) time; memory bounded by ``tile_bytes`` per tile of
    rows (:mod:`deepmetric.tiles`), never (2B, 2B).

    Returns a scalar, >= 0. With no negative at all (B = 1, or a single class in ``labels``)
    every ``l_i`` is exactly 0, with a zero gradient. Identical embeddings give ``log(2B - 1)``.

    Example::

        loss = NTXentLoss(temperature=0.2)(model(augment(x)), model(augment(x)))
    """

    def __init__(self, *, temperature: float = 0.1, tile_bytes: int | None = None) -> None:
        super().__init__()
        self.temperature = positive_number("temperature", temperature)
        self.tile_bytes = check_tile_bytes(tile_bytes)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_embeddings(z1, "z1")
        check_embeddings(z2, "z2")
        if z1.shape != z2.shape:
            raise ValueError(
                f"z1 and z2 must have the same shape (B, D), got {tuple(z1.shape)} and "
                f"{tuple(z2.shape)}"
            )
        b = len(z1)
        if b == 0:
            raise ValueError("empty batch: z1 and z2 have 0 rows")
        if labels is not None:
            miners.check_labels(labels, b)
        n = 2 * b
        tiles = RowTiles(torch.cat([z1, z2]), metric="cosine", tile_bytes=self.tile_bytes)
        both = None if labels is None else labels.to(tiles.device).repeat(2)
        total = tiles.x.new_zeros(())
        for tile in tiles:
            with torch.no_grad():
                rows = torch.arange(tile.start, tile.stop, device=tiles.device)
                partner = ((rows + b) % n)[:, None]
                sim = (1.0 - tile.dist) / self.temperature  # (T, n)
                if both is None:  # only the anchor itself
                    left_out = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
                    left_out.diagonal(offset=tile.start).fill_(True)
                else:  # self, the other view and same-class items, but for the positive
                    left_out = both[tile.start : tile.stop, None] == both[None, :]
                    left_out.scatter_(1, partner, False)
                masked = sim.masked_fill_(left_out, -torch.inf)
                log_denominator = torch.logsumexp(masked, dim=1, keepdim=True)
                total += (log_denominator - masked.gather(1, partner)).sum()
                # d l_i / d s_ik = softmax_k - [k = i']; s = (1 - D) / t
                grad = masked.sub_(log_denominator).exp_()
                grad.scatter_add_(1, partner, grad.new_full(partner.shape, -1.0))
                grad.mul_(-1.0 / self.temperature)
            tiles.backprop(tile, grad)
        return tiles.loss(total / n, scale=1.0 / n)

"""Self-supervised contrastive loss over two augmented views: NT-Xent (SimCLR)."""

from __future__ import annotations

import torch
from torch import nn

from deepmetric import mining as miners
from deepmetric.distances import check_embeddings
from deepmetric.losses._common import check_positive, cosine_similarity


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
    weigh the hardest negatives more. O(B^2) time and memory.

    Returns a scalar, >= 0. With no negative at all (B = 1, or a single class in ``labels``)
    every ``l_i`` is exactly 0, with a zero gradient. Identical embeddings give ``log(2B - 1)``.

    Example::

        loss = NTXentLoss(temperature=0.2)(model(augment(x)), model(augment(x)))
    """

    def __init__(self, *, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)

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
        sim = cosine_similarity(torch.cat([z1, z2])) / self.temperature  # (2B, 2B)
        n = 2 * b
        anchor = torch.arange(n, device=sim.device)
        partner = (anchor + b) % n
        if labels is None:
            left_out = torch.eye(n, dtype=torch.bool, device=sim.device)
        else:
            both = labels.to(sim.device).repeat(2)
            left_out = both[:, None] == both[None, :]  # self, the other view, same-class items
            left_out[anchor, partner] = False  # the other view is the positive
        log_denominator = torch.logsumexp(sim.masked_fill(left_out, -torch.inf), dim=1)
        return (log_denominator - sim[anchor, partner]).mean()

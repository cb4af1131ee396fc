"""Image augmentation for training: stateless, seeded per batch, so a resumed run sees the same
augmented batches as an uninterrupted one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips (p = 1/2) and shifts of up to ``max_shift`` pixels each way,
    zero-filled; (B, C, H, W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]

"""Image augmentation for training: stateless, seeded per batch, so a resumed run sees the same
augmented batches as an uninterrupted one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    max_shift: int = 2,
    *,
    batch_size: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Random horizontal flips (p = 1/2) and shifts of up to ``max_shift`` pixels each way,
    zero-filled; (B, C, H, W) -> (B, C, H, W).

    The draws are made for a batch of ``batch_size`` items (default B) and items ``offset`` to
    ``offset + B`` of it are applied to ``x``: a rank's slice of a global batch is augmented
    exactly as in the one-process run of the whole batch."""
    b, c, h, w = x.shape
    total = b if batch_size is None else batch_size
    if not 0 <= offset <= total - b:
        raise ValueError(f"items {offset}..{offset + b} are not inside a batch of {total}")
    part = slice(offset, offset + b)
    flip = (torch.rand(total, generator=generator) < 0.5)[part]
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, total), generator=generator)[:, part]
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]

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


#: the symmetries of the square: transform t rotates by (t mod 4) x 90 degrees, after a
#: vertical flip when t >= 4
DIHEDRAL = 8


def dihedral(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Square images ``x`` (B, C, S, S) under the symmetries ``t`` (an int, or (B,) ints in
    ``0..7``) of the square: ``rot90^(t mod 4)(flip_rows^(t >= 4)(x))``; same shape.

    ``t = 0`` is the identity; the eight are distinct for an image with no symmetry."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"dihedral transforms need square images (B, C, S, S), got {tuple(x.shape)}"
        )
    ts = torch.as_tensor(t, dtype=torch.long)
    if ts.dim() > 1 or (ts.dim() == 1 and len(ts) != len(x)):
        raise ValueError(f"t must be an int or ({len(x)},) ints, got shape {tuple(ts.shape)}")
    ts = ts.expand(len(x))
    if len(ts) and (int(ts.min()) < 0 or int(ts.max()) >= DIHEDRAL):
        raise ValueError(f"dihedral transforms are 0..{DIHEDRAL - 1}, got {ts.unique().tolist()}")
    out = x.clone()
    for k in ts.unique().tolist():
        rows = ts == k
        z = x[rows]
        if k >= 4:
            z = z.flip(-2)
        out[rows] = torch.rot90(z, k % 4, (-2, -1))
    return out

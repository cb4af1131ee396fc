"""Pairwise distances in tiles of rows, with a loss's gradient gathered tile by tile.

A batch loss over the distance matrix ``D = pairwise(x, y)`` (B, R) is a sum over anchors, and
for every loss here its gradient ``G = dL/dD`` has a closed form. So nothing needs all of D at
once: :class:`RowTiles` visits D in tiles of T rows, ``D[rows]`` (T, R); the loss computes its
value and ``G[rows]`` on the tile, and :meth:`RowTiles.backprop` turns ``G[rows]`` into the
tile's share of ``dL/dx`` and ``dL/dy`` at once (two matrix products), after which the tile is
dropped. Memory: a few (T, R) tiles and the (B, D) + (R, D) gradients, never (B, R); T is
chosen so one (T, R) float32 tile takes ``tile_bytes`` (:func:`default_tile_bytes`: 8 MiB on
the CPU, 512 MiB on a GPU). Every reduction runs over one tile, so no kernel sees more than
2^31 elements while a tile holds fewer. The work is that of the distance matrix with its
backward (three (T, D) x (D, R) products per tile), the gradient computed during the forward
pass; :meth:`RowTiles.loss` hands it to autograd, whose backward is then a multiplication.
Nothing is computed for the gradient when no input requires one (validation, ``no_grad``).

The tiles equal the rows of :func:`deepmetric.distances.pairwise` (float32, float64 if an
input is; autocast off; the euclidean diagonal of ``pairwise(x)`` exactly 0), and
:meth:`RowTiles.backprop` applies the backward of the same formulas, so a loss gets the values
and gradients it would get from the whole matrix, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from deepmetric.distances import Metric, _autocast_off, _compute_dtype, check_metric

MIB = 1 << 20
#: :class:`Entries` are backpropagated entry by entry while ``SPARSE_COST * K * D <= T * R``
#: (K entries, D dimensions, a (T, R) tile), else scattered into the tile and backpropagated
#: as a dense gradient (two matrix products). Semi-hard forward + backward on 2 CPU cores
#: (2026-12-05, ms; entry by entry always / with 4 / dense always, settings interleaved in one
#: process): B = 256: 2.8 / 1.7 / 1.6; B = 1,024 and 4,096: all three within the noise
#: (13-16 and 114-146); B = 16,384: 2,017 / 1,938 / 2,589, and batch-hard 1,272 / 1,137 /
#: 1,801 (1 and 16 measured too: 4 was never far from the best).
SPARSE_COST = 4.0
#: Bytes of one float32 (T, R) tile on the CPU and on a GPU: with the handful of tiles a loss
#: holds at once, under 0.1 GiB of work memory on the CPU and about 4 GiB on a GPU at any B.
#: On the CPU a tile stays under glibc's largest dynamic mmap threshold (32 MiB), so a freed
#: tile's memory is reused by the next instead of being mapped afresh (a page fault every 4 KiB,
#: which cost more than the arithmetic with 64 MiB tiles), and a few tiles fit the caches.
CPU_TILE_BYTES = 8 * MIB
GPU_TILE_BYTES = 512 * MIB


def default_tile_bytes(device: torch.device) -> int:
    """The tile budget for ``device``: :data:`GPU_TILE_BYTES` on CUDA, else
    :data:`CPU_TILE_BYTES`."""
    return GPU_TILE_BYTES if device.type == "cuda" else CPU_TILE_BYTES


def check_tile_bytes(tile_bytes: int | None) -> int | None:
    """``tile_bytes`` as an int (None stays None); ``ValueError`` unless it is >= 1."""
    if tile_bytes is None:
        return None
    if isinstance(tile_bytes, bool) or int(tile_bytes) != tile_bytes or tile_bytes < 1:
        raise ValueError(f"tile_bytes must be an integer >= 1 (or None), got {tile_bytes!r}")
    return int(tile_bytes)


def row_blocks(n_rows: int, n_cols: int, tile_bytes: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` blocks of rows covering ``range(n_rows)``, each block of
    ``n_cols`` float32 columns within ``tile_bytes`` (at least one row; and, whatever the
    budget, fewer than 2^31 elements when a row has fewer)."""
    rows = max(1, tile_bytes // (4 * max(1, n_cols)))
    rows = min(rows, max(1, ((1 << 31) - 1) // max(1, n_cols)))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


class Tile(NamedTuple):
    """Rows ``start:stop`` of the distance matrix: ``dist`` (T, R), no gradient. For the
    cosine metric, ``blocked`` (T, R) marks where rounding put ``1 - cos`` outside [0, 2] and the
    clamp stopped the gradient (as ``torch.clamp``'s backward); None where no gradient is
    needed and, on the CPU, where nothing was clamped (the usual case)."""

    start: int
    stop: int
    dist: torch.Tensor
    blocked: torch.Tensor | None = None


class Entries(NamedTuple):
    """A sparse gradient of a tile: ``dL/dD[rows[k], cols[k]] = weights[k]`` (K,), ``rows``
    indexing the tile's rows; entries listed more than once add up, the rest are 0."""

    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor


class RowTiles:
    """The distance matrix ``pairwise(x, y, metric)`` (B, R) in tiles of rows, and the
    gradient of a scalar loss of it with respect to ``x`` (B, D) and ``y`` (R, D).

    ``y=None`` means ``x`` itself (R = B; the euclidean diagonal is exactly 0). Use::

        tiles = RowTiles(x, y, metric)
        total = 0
        for tile in tiles:
            value, grad = ...           # the loss's sum on tile.dist and its gradient (T, R)
            total += value
            tiles.backprop(tile, grad)  # nothing is done when no gradient is needed
        return tiles.loss(total / n, scale=1 / n)
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        metric: Metric = "euclidean",
        *,
        tile_bytes: int | None = None,
    ) -> None:
        check_metric(metric)
        self.inputs = (x,) if y is None else (x, y)
        self.metric = metric
        self.same = y is None
        self.tile_bytes = check_tile_bytes(tile_bytes) or default_tile_bytes(x.device)
        self.needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self.inputs)
        dtype = _compute_dtype(*self.inputs)
        with torch.no_grad(), _autocast_off(x.device):
            self.x = x.detach().to(dtype)
            self.y = self.x if y is None else y.detach().to(dtype)
            if metric == "cosine":  # the unit rows; their gradient is mapped back at the end
                self.x = F.normalize(self.x, dim=1)
                self.y = self.x if y is None else F.normalize(self.y, dim=1)
            else:
                self.x2 = (self.x * self.x).sum(dim=1)
                self.y2 = self.x2 if y is None else (self.y * self.y).sum(dim=1)
        self.grad_x = torch.zeros_like(self.x) if self.needs_grad else None
        self.grad_y = None if self.same or not self.needs_grad else torch.zeros_like(self.y)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.x), len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def blocks(self) -> Iterator[tuple[int, int]]:
        return row_blocks(len(self.x), len(self.y), self.tile_bytes)

    def __iter__(self) -> Iterator[Tile]:
        for start, stop in self.blocks():
            yield self.tile(start, stop)

    @torch.no_grad()
    def tile(self, start: int, stop: int) -> Tile:
        """Rows ``start:stop`` of the distance matrix."""
        x = self.x[start:stop]
        with _autocast_off(x.device):
            if self.metric == "cosine":
                d = torch.addmm(self.x.new_ones(()), x, self.y.T, alpha=-1.0)  # 1 - x y^T
                if d.device.type == "cpu":  # one pass instead of a clamp and its mask (on a
                    # GPU reading the range back would wait for the device; it clamps always)
                    low, high = torch.aminmax(d) if d.numel() else (d.new_zeros(()),) * 2
                    if low >= 0.0 and high <= 2.0:
                        return Tile(start, stop, d)
                blocked = ((d < 0.0) | (d > 2.0)) if self.needs_grad else None
                return Tile(start, stop, d.clamp_(0.0, 2.0), blocked)
            d = torch.addmm(self.y2[None, :], x, self.y.T, alpha=-2.0)
            d.add_(self.x2[start:stop, None]).clamp_min_(0.0)
            if self.same:
                d.diagonal(offset=start).zero_()
            return Tile(start, stop, d if self.metric == "squared_euclidean" else d.sqrt_())

    @torch.no_grad()
    def backprop(self, tile: Tile, grad: torch.Tensor | Entries) -> None:
        """Add the share of ``dL/dx`` and ``dL/dy`` of ``grad`` = ``dL/dD[rows]``: a (T, R)
        tensor (which may be overwritten), or :class:`Entries` when only a few entries of the
        tile have a gradient (O(K D) work instead of two (T, D) x (D, R) products while they
        are few enough: :data:`SPARSE_COST`)."""
        if not self.needs_grad:
            return
        if isinstance(grad, Entries):
            if SPARSE_COST * len(grad.rows) * self.x.shape[1] <= tile.dist.numel():
                self._backprop_entries(tile, grad)
                return
            dense = torch.zeros_like(tile.dist)
            weights = grad.weights.to(dense.dtype)
            grad = dense.index_put_((grad.rows, grad.cols), weights, accumulate=True)
        assert self.grad_x is not None
        x = self.x[tile.start : tile.stop]
        grad_y = self.grad_x if self.same else self.grad_y
        assert grad_y is not None
        with _autocast_off(x.device):
            if self.metric == "cosine":  # D = 1 - x y^T where the clamp lets it through
                w = grad if tile.blocked is None else grad.masked_fill_(tile.blocked, 0.0)
                self.grad_x[tile.start : tile.stop].addmm_(w, self.y, alpha=-1.0)
                grad_y.addmm_(w.T, x, alpha=-1.0)
                return
            if self.metric == "squared_euclidean":  # dL/dx = 2 (rowsum(G) x - G y)
                w, scale = grad, 2.0
            else:  # dL/dsq = G / (2 d), 0 where d == 0; the 1/2 folds into the scale
                w = grad.div_(tile.dist).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                scale = 1.0
            # In place: grad_y is (R, D), which at large R outweighs the tile's rows.
            rows = self.grad_x[tile.start : tile.stop]
            rows.addcmul_(w.sum(dim=1)[:, None], x, value=scale).addmm_(w, self.y, alpha=-scale)
            grad_y.addcmul_(w.sum(dim=0)[:, None], self.y, value=scale)
            grad_y.addmm_(w.T, x, alpha=-scale)

    def _backprop_entries(self, tile: Tile, grad: Entries) -> None:
        """:meth:`backprop` of a sparse gradient: the same formulas, entry by entry."""
        assert self.grad_x is not None
        rows = grad.rows + tile.start
        x, y = self.x[rows], self.y[grad.cols]  # (K, D)
        w = grad.weights.to(self.dtype)
        with _autocast_off(x.device):
            if self.metric == "cosine":  # dD/dx = -y, dD/dy = -x where the clamp lets it through
                if tile.blocked is not None:
                    w = w.masked_fill(tile.blocked[grad.rows, grad.cols], 0.0)
                to_x, to_y = -w[:, None] * y, -w[:, None] * x
            else:  # dD/dx = -dD/dy = 2 (x - y) (squared) or (x - y) / D, 0 where D == 0
                if self.metric == "squared_euclidean":
                    w = 2.0 * w
                else:
                    d = tile.dist[grad.rows, grad.cols]
                    w = torch.where(d > 0, w / d, 0.0)
                to_x = w[:, None] * (x - y)
                to_y = -to_x
            self.grad_x.index_add_(0, rows, to_x)
            grad_y = self.grad_x if self.same else self.grad_y
            assert grad_y is not None
            grad_y.index_add_(0, grad.cols, to_y)

    def loss(self, value: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        """The scalar ``value`` (0-d), differentiable with respect to the inputs: its gradient
        is ``scale`` times the gradient gathered by :meth:`backprop`."""
        value = value.detach().to(self.dtype)
        if not self.needs_grad:
            return value
        grads = [self.grad_x] if self.same else [self.grad_x, self.grad_y]
        pairs: list[torch.Tensor] = []
        for t, g in zip(self.inputs, grads):
            assert g is not None
            pairs += [t, self._to_input(t, g * scale)]
        return _WithInputGradients.apply(value, *pairs)

    def _to_input(self, t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to ``t`` itself: through the L2 normalisation for the
        cosine metric, in ``t``'s dtype."""
        if self.metric == "cosine":
            with torch.enable_grad(), _autocast_off(t.device):
                leaf = t.detach().to(grad.dtype).requires_grad_(True)
                (grad,) = torch.autograd.grad(F.normalize(leaf, dim=1), leaf, grad)
        return grad.to(t.dtype)


class _WithInputGradients(torch.autograd.Function):
    """``value`` with precomputed gradients: ``apply(value, x1, g1, x2, g2, ...)`` returns
    ``value``; backward gives ``grad_output * g_k`` to each ``x_k``. No double backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, *pairs: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(*pairs[1::2])
        return value.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        out: list[torch.Tensor | None] = [None]
        for g in ctx.saved_tensors:  # type: ignore[attr-defined]
            out += [grad_output.to(g.dtype) * g, None]
        return tuple(out)

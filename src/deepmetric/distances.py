"""Distances between embeddings.

``pairwise(x, y)`` gives the (N, M) matrix every loss and miner works on; ``paired(x, y)`` gives
the (N,) distances of row i of ``x`` to row i of ``y`` (explicit pairs and triplets).

Metrics:

- ``"euclidean"``: ``||x - y||``. The square root has an infinite derivative at 0, so where two
  embeddings coincide (the diagonal of ``pairwise(x)`` included) the gradient is defined as 0
  (a subgradient) instead of NaN.
- ``"squared_euclidean"``: ``||x - y||^2``.
- ``"cosine"``: ``1 - cos(x, y)``, in [0, 2]; a zero vector has distance 1 to everything.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

Metric = Literal["euclidean", "squared_euclidean", "cosine"]
METRICS: tuple[str, ...] = get_args(Metric)


def check_metric(metric: str) -> None:
    """Raise ``ValueError`` unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def check_embeddings(x: torch.Tensor, name: str = "embeddings") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite floating-point (N, D) tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt(sq) for sq >= 0, with gradient 0 (not inf or NaN) where sq == 0."""
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, 1.0)), 0.0)


class _EuclideanMatrix(torch.autograd.Function):
    """(N, M) euclidean or squared euclidean distances with a hand-written backward.

    Forward: ``sq = ||x||^2 + ||y||^2 - 2 x y^T`` clamped at 0, one matrix product and a few
    in-place passes. Backward: with ``W = dL/dsq`` (``dL/dd / (2 d)``, 0 where d = 0),
    ``dL/dx = 2 (rowsum(W) x - W y)`` and ``dL/dy = 2 (colsum(W) y - W^T x)``: two matrix
    products, where autograd through the same expression makes about ten (N, M) passes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        y: torch.Tensor | None,
        squared: bool,
    ) -> torch.Tensor:
        other = x if y is None else y
        x2 = (x * x).sum(dim=1)
        y2 = x2 if y is None else (other * other).sum(dim=1)
        d = torch.addmm(y2[None, :], x, other.T, alpha=-2.0).add_(x2[:, None]).clamp_min_(0.0)
        if y is None:
            d.diagonal().zero_()
        if not squared:
            d.sqrt_()
        ctx.save_for_backward(x, other, d)
        ctx.same, ctx.squared = y is None, squared  # type: ignore[attr-defined]
        return d

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, other, d = ctx.saved_tensors  # type: ignore[attr-defined]
        if ctx.squared:  # type: ignore[attr-defined]
            w, scale = grad, 2.0
        else:  # dL/dsq = grad / (2 d): fold the 1/2 into the scale; 0 where d == 0
            w, scale = torch.div(grad, d).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), 1.0
        need_x, need_y = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        grad_x = grad_y = None
        if ctx.same:  # type: ignore[attr-defined]  # x appears on both sides: W + W^T
            rows = w.sum(dim=1) + w.sum(dim=0)
            grad_x = scale * (rows[:, None] * x - w @ x - w.T @ x)
        if need_x and not ctx.same:  # type: ignore[attr-defined]
            grad_x = scale * (w.sum(dim=1)[:, None] * x - w @ other)
        if need_y:
            grad_y = scale * (w.sum(dim=0)[:, None] * other - w.T @ x)
        return grad_x, grad_y, None


def pairwise(
    x: torch.Tensor, y: torch.Tensor | None = None, metric: Metric = "euclidean"
) -> torch.Tensor:
    """Distance matrix ``D[i, j] = d(x_i, y_j)``.

    Args:
        x: (N, D) embeddings.
        y: (M, D) reference embeddings; ``None`` means ``x`` itself, and then the diagonal is
            exactly 0 for the euclidean metrics.
        metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.

    Returns:
        (N, M) tensor of ``x``'s dtype. Costs one (N, D) x (D, M) matrix product.
    """
    check_metric(metric)
    check_embeddings(x, "x")
    if y is not None:
        check_embeddings(y, "y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}"
            )
    same = y is None
    y = x if y is None else y

    if metric == "cosine":
        xn = F.normalize(x, dim=1)
        yn = xn if same else F.normalize(y, dim=1)
        return (1.0 - xn @ yn.T).clamp(0.0, 2.0)

    return _EuclideanMatrix.apply(x, None if same else y, metric == "squared_euclidean")


def paired(x: torch.Tensor, y: torch.Tensor, metric: Metric = "euclidean") -> torch.Tensor:
    """Row-wise distances ``d[i] = d(x_i, y_i)`` of two (N, D) tensors; returns (N,)."""
    check_metric(metric)
    check_embeddings(x, "x")
    check_embeddings(y, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"paired inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if metric == "cosine":
        return (1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-12)).clamp(0.0, 2.0)
    sq = ((x - y) ** 2).sum(dim=1)
    return sq if metric == "squared_euclidean" else _safe_sqrt(sq)

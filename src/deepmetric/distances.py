"""Distances between embeddings.

``pairwise(x, y)`` gives the (N, M) matrix every loss and miner works on; ``paired(x, y)`` gives
the (N,) distances of row i of ``x`` to row i of ``y`` (explicit pairs and triplets);
``paired_at(x, i, j)`` the distances of rows ``i[k]`` and ``j[k]`` of one set, in chunks (the
evaluation's pairs: never the (K, D) gathered copies).

Metrics:

- ``"euclidean"``: ``||x - y||``. The square root has an infinite derivative at 0, so where two
  embeddings coincide (the diagonal of ``pairwise(x)`` included) the gradient is defined as 0
  (a subgradient) instead of NaN.
- ``"squared_euclidean"``: ``||x - y||^2``.
- ``"cosine"``: ``1 - cos(x, y)``, in [0, 2]; a zero vector has distance 1 to everything.

Precision: distances are computed in float32 (float64 when an input is float64) whatever the
autocast state. Under ``torch.autocast`` (CPU bfloat16, CUDA float16) autocast is turned off
inside, and half / bfloat16 inputs (a layer's output under autocast) are cast up to float32, so
mixed-precision training gets float32-accurate distances; gradients come back in each input's
dtype.
"""

from __future__ import annotations

import contextlib
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


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context with autocast disabled on ``device``'s type (nothing to do for device types
    autocast does not know, such as ``meta``)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


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
    Both run with autocast off (a backward called inside an autocast region would otherwise
    lower its matrix products), on inputs of one dtype, float32 or float64.
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
        with _autocast_off(grad.device):
            return _EuclideanMatrix._backward(ctx, grad.to(d.dtype), x, other, d)

    @staticmethod
    def _backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad: torch.Tensor,
        x: torch.Tensor,
        other: torch.Tensor,
        d: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
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
        (N, M) tensor, float32 (float64 if an input is float64) whatever the autocast state.
        Costs one (N, D) x (D, M) matrix product.
    """
    check_metric(metric)
    check_embeddings(x, "x")
    if y is not None:
        check_embeddings(y, "y")
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}"
            )
    dtype = _compute_dtype(x) if y is None else _compute_dtype(x, y)
    with _autocast_off(x.device):
        x = x.to(dtype)
        y = None if y is None else y.to(dtype)
        if metric == "cosine":
            xn = F.normalize(x, dim=1)
            yn = xn if y is None else F.normalize(y, dim=1)
            return (1.0 - xn @ yn.T).clamp(0.0, 2.0)
        return _EuclideanMatrix.apply(x, y, metric == "squared_euclidean")


def paired(x: torch.Tensor, y: torch.Tensor, metric: Metric = "euclidean") -> torch.Tensor:
    """Row-wise distances ``d[i] = d(x_i, y_i)`` of two (N, D) tensors; returns (N,), float32
    (float64 if an input is float64) whatever the autocast state."""
    check_metric(metric)
    check_embeddings(x, "x")
    check_embeddings(y, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"paired inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    dtype = _compute_dtype(x, y)
    with _autocast_off(x.device):
        return _rowwise(x.to(dtype), y.to(dtype), metric)


def _rowwise(x: torch.Tensor, y: torch.Tensor, metric: Metric) -> torch.Tensor:
    """``d(x_i, y_i)`` of checked, same-shape, same-dtype (N, D) tensors: (N,)."""
    if metric == "cosine":
        return (1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-12)).clamp(0.0, 2.0)
    sq = ((x - y) ** 2).sum(dim=1)
    return sq if metric == "squared_euclidean" else _safe_sqrt(sq)


#: Gathered numbers per chunk of :func:`paired_at` (float32: 16 MiB per gathered side).
PAIRED_AT_CHUNK = 1 << 22


def paired_at(
    x: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    metric: Metric = "euclidean",
    *,
    chunk: int = PAIRED_AT_CHUNK,
) -> torch.Tensor:
    """``d[k] = d(x[i[k]], x[j[k]])`` for (K,) index tensors ``i``, ``j`` into the (N, D)
    embeddings ``x``: the values of ``paired(x[i], x[j], metric)``, computed ``chunk // D``
    pairs at a time, so memory is O(chunk), not O(K D), and ``x`` is checked once."""
    check_metric(metric)
    check_embeddings(x, "x")
    i, j = torch.as_tensor(i), torch.as_tensor(j)
    if i.dim() != 1 or i.shape != j.shape:
        raise ValueError(
            f"i and j must be (K,) index tensors of one shape, got {tuple(i.shape)} and "
            f"{tuple(j.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    i, j = i.to(x.device), j.to(x.device)
    step = max(1, chunk // max(1, x.shape[1]))
    dtype = _compute_dtype(x)
    with _autocast_off(x.device):
        parts = [
            _rowwise(x[i[s : s + step]].to(dtype), x[j[s : s + step]].to(dtype), metric)
            for s in range(0, len(i), step)
        ]
        return torch.cat(parts) if parts else x.new_zeros(0, dtype=dtype)

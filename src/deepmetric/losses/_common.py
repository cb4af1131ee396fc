"""What the losses share: argument checks, a zero loss that keeps the graph, and a scalar whose
gradient with respect to the distance matrix the caller computed in closed form."""

from __future__ import annotations

import torch

from deepmetric import mining as miners
from deepmetric.distances import check_embeddings


def check_margin(margin: float) -> float:
    margin = float(margin)
    if not margin >= 0 or margin == float("inf"):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    return margin


def check_batch(
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


def zero(embeddings: torch.Tensor) -> torch.Tensor:
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


def with_gradient(dist: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return _ScalarWithGradient.apply(dist, value.detach(), grad.detach())

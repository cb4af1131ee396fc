"""Cross-batch memory: the embeddings of the last M samples as extra positives and negatives."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from deepmetric.losses._common import check_batch


class CrossBatchMemory(nn.Module):
    """A batch loss that also compares the batch with the last ``size`` samples of earlier
    batches (Wang, Zhang, Huang and Scott, "Cross-Batch Memory for Embedding Learning", CVPR
    2020): the embeddings drift slowly once training settles, so those of recent batches are
    nearly as good as fresh ones, and mining sees far more negatives than one batch holds.

    ``memory(embeddings (B, D), labels (B,)) = loss(embeddings, labels)
    + weight * loss(embeddings, labels, ref_embeddings=M_e, ref_labels=M_y)``, where ``(M_e,
    M_y)`` are the embeddings (detached: no gradient reaches them) and labels of the last
    ``size`` samples of the *previous* calls, a ring buffer; then the batch is added to it. With
    an empty memory (the first call) this is ``loss(embeddings, labels)`` exactly. In eval mode
    (``.eval()``) the memory is neither read nor written: the plain loss. ``start``: the number
    of training calls (steps) before the memory is first read or written; the paper waits until
    the embeddings drift slowly (a memory filled while they move fast, or all sit near one point
    as at initialisation, holds stale points that push the whole batch the same way). ``loss``
    must accept ``ref_embeddings`` / ``ref_labels`` (``TripletLoss`` does). The memory is part of
    ``state_dict()``, so a resumed run continues with the same memory. In a distributed run the
    loss sees the gathered global batch, so the memory holds global batches.

    Example::

        loss = CrossBatchMemory(TripletLoss(margin=0.2), size=4096)
        loss(model(images), labels).backward()
    """

    def __init__(self, loss: nn.Module, *, size: int, weight: float = 1.0, start: int = 0) -> None:
        super().__init__()
        params = inspect.signature(loss.forward).parameters
        if not {"ref_embeddings", "ref_labels"} <= set(params):
            raise ValueError(
                f"{type(loss).__name__} does not take ref_embeddings / ref_labels: a cross-batch "
                "memory needs a loss that compares a batch with reference samples (TripletLoss)"
            )
        if int(size) < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        if not float(weight) >= 0:
            raise ValueError(f"memory weight must be >= 0, got {weight}")
        if int(start) < 0:
            raise ValueError(f"memory start must be >= 0 steps, got {start}")
        self.loss = loss
        self.start = int(start)
        self._calls = 0  # training calls so far
        self.size = int(size)
        self.weight = float(weight)
        self._embeddings = torch.zeros(0, 0)  # (size, D) once the first batch is seen
        self._labels = torch.zeros(0, dtype=torch.long)
        self._count = 0  # samples held, <= size
        self._next = 0  # the slot the next sample goes to

    def extra_repr(self) -> str:
        return f"size={self.size}, weight={self.weight}, start={self.start}"

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (n, D), labels (n,))`` held now, oldest first (n <= size)."""
        if self._count < self.size:
            return self._embeddings[: self._count], self._labels[: self._count]
        order = torch.arange(self._next, self._next + self.size) % self.size
        return self._embeddings[order], self._labels[order]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            raise ValueError(
                "CrossBatchMemory takes one class per item, labels (B,): the memory stores "
                "class labels, not multi-hot rows or a positive mask"
            )
        check_batch(embeddings, labels)
        value = self.loss(embeddings, labels)
        if not self.training:
            return value
        self._calls += 1
        if self._calls <= self.start:
            return value
        if self._count and self._embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]}, the memory holds "
                f"{self._embeddings.shape[1]}"
            )
        if self._count:
            ref = self._embeddings[: self._count].to(embeddings.device)
            ref_labels = self._labels[: self._count].to(embeddings.device)
            value = value + self.weight * self.loss(
                embeddings, labels, ref_embeddings=ref, ref_labels=ref_labels
            )
        self._enqueue(embeddings.detach(), labels.detach())
        return value

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if self._embeddings.shape != (self.size, embeddings.shape[1]):
            self._embeddings = embeddings.new_zeros(self.size, embeddings.shape[1])
            self._labels = torch.zeros(self.size, dtype=torch.long, device=labels.device)
        embeddings, labels = embeddings[-self.size :], labels[-self.size :]
        slots = (self._next + torch.arange(len(labels), device=labels.device)) % self.size
        # Out of place: the loss just computed saved the old memory for its backward.
        self._embeddings = self._embeddings.to(embeddings.device).index_copy(
            0, slots, embeddings.to(self._embeddings.dtype)
        )
        self._labels = self._labels.to(labels.device).index_copy(0, slots, labels.long())
        self._next = (self._next + len(labels)) % self.size
        self._count = min(self.size, self._count + len(labels))

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "embeddings": self._embeddings.cpu(),
            "labels": self._labels.cpu(),
            "count": self._count,
            "next": self._next,
            "calls": self._calls,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        embeddings, labels = state["embeddings"], state["labels"]
        count, next_slot = int(state["count"]), int(state["next"])
        if count and (embeddings.shape[0] != self.size or len(labels) != self.size):
            raise ValueError(
                f"the saved memory holds {embeddings.shape[0]} slots, this one {self.size}"
            )
        if not 0 <= count <= self.size or not 0 <= next_slot < max(self.size, 1):
            raise ValueError(f"corrupt memory state: count {count}, next {next_slot}")
        self._embeddings, self._labels = embeddings.clone(), labels.clone().long()
        self._count, self._next = count, next_slot
        self._calls = int(state.get("calls", 0))

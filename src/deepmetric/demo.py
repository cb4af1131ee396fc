"""A one-minute demonstration of the losses on synthetic data, open-set.

Each class is a Gaussian blob in 8 of 32 dimensions, hidden among loud nuisance dimensions. A
small MLP is trained with each loss on the first half of the classes; precision@1 (the nearest other
item has the same label) is measured on the *other* half, classes the model never saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from deepmetric.losses import ContrastiveLoss, LiftedStructuredLoss, TripletLoss
from deepmetric.neighbors import nearest_other

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_blobs(
    n_classes: int, per_class: int, dim: int, seed: int, informative: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_classes * per_class, dim) points and their labels.

    Identity lives in ``informative`` dimensions (class centres plus small noise); the other
    dimensions are loud nuisance noise, and a fixed random rotation mixes them all, so raw
    nearest neighbours are poor until a network learns which directions matter.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    centers = torch.randn(n_classes, informative, generator=g)
    signal = centers[labels] + 0.25 * torch.randn(len(labels), informative, generator=g)
    nuisance = 1.5 * torch.randn(len(labels), dim - informative, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7)))
    return torch.cat([signal, nuisance], dim=1) @ rotation, labels


def precision_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of items whose nearest other item has the same label."""
    return float(nearest_other(embeddings, labels)[1].float().mean())


def train(loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """Train a 2-layer MLP (32 -> 64 -> 16, L2-normalised output) on P x K batches."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 16))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    classes = y.unique()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = classes[torch.randperm(len(classes), generator=g)[:8]]  # P = 8 classes
        idx = torch.cat(
            [
                (y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:8]]
                for c in chosen
            ]
        )  # K = 8
        emb = nn.functional.normalize(net(x[idx]), dim=1)
        loss = loss_fn(emb, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def main(steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Train with each loss; print and return precision@1 on unseen classes."""
    x, y = make_blobs(n_classes=40, per_class=50, dim=32, seed=seed)
    seen = y < 20
    x_train, y_train, x_test, y_test = x[seen], y[seen], x[~seen], y[~seen]
    losses: dict[str, LossFn] = {
        "triplet batch_all": TripletLoss(margin=0.2, mining="batch_all"),
        "triplet batch_hard": TripletLoss(margin=0.2, mining="batch_hard"),
        "triplet semi_hard": TripletLoss(margin=0.2, mining="semi_hard"),
        "triplet soft batch_hard": TripletLoss(mining="batch_hard", soft=True),
        "contrastive": ContrastiveLoss(margin=1.0),
        "lifted structured": LiftedStructuredLoss(margin=1.0),
    }
    baseline = precision_at_1(x_test, y_test)
    print(f"precision@1 on 20 unseen classes, raw 32-d inputs: {baseline:.3f}")
    results = {}
    for name, loss_fn in losses.items():
        start = time.perf_counter()
        net = train(loss_fn, x_train, y_train, steps, seed)
        with torch.no_grad():
            p1 = precision_at_1(net(x_test), y_test)
        results[name] = p1
        print(f"{name:<24} precision@1 {p1:.3f}   ({time.perf_counter() - start:.1f} s)")
    return results

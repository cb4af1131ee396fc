"""Siamese ranking with torch's own MarginRankingLoss (RankIQA-style).

One shared network scores each input; for a pair (i, j) where i should rank above j the loss is
``relu(margin - (s_i - s_j))``. That is exactly ``torch.nn.MarginRankingLoss`` with target +1,
so deepmetric does not rewrite it. Here the inputs are synthetic "images" (64-d vectors) whose
hidden quality is a nonlinear function of a few directions; only pairwise orderings are given.

Run: ``python examples/siamese_ranking.py``.
"""

from __future__ import annotations

import torch
from torch import nn


def make_items(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 64) inputs and their hidden (n,) quality scores."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    quality = torch.tanh(x[:, 0]) + 0.5 * x[:, 1] ** 2 - 0.3 * x[:, 2]
    return x, quality


def ranking_accuracy(scorer: nn.Module, x: torch.Tensor, quality: torch.Tensor) -> float:
    """Share of all pairs (i, j) with quality_i > quality_j that the scorer orders correctly."""
    with torch.no_grad():
        s = scorer(x).squeeze(1)
    should = quality[:, None] > quality[None, :]
    return ((s[:, None] > s[None, :]) & should).sum().item() / should.sum().item()


def main(steps: int = 600, seed: int = 0) -> tuple[float, float]:
    """Train on pairs of training items; return the test ranking accuracy before and after."""
    torch.manual_seed(seed)
    x_train, q_train = make_items(2000, seed)
    x_test, q_test = make_items(500, seed + 1)
    scorer = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))  # shared by i and j
    loss_fn = nn.MarginRankingLoss(margin=0.1)
    opt = torch.optim.Adam(scorer.parameters(), lr=3e-3)
    before = ranking_accuracy(scorer, x_test, q_test)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i, j = torch.randint(0, len(x_train), (2, 128), generator=g)
        target = torch.sign(q_train[i] - q_train[j])  # +1: i above j, -1: j above i
        loss = loss_fn(scorer(x_train[i]).squeeze(1), scorer(x_train[j]).squeeze(1), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ranking_accuracy(scorer, x_test, q_test)
    print(f"pairwise ranking accuracy on unseen items: {before:.3f} before, {after:.3f} after")
    return before, after


if __name__ == "__main__":
    main()

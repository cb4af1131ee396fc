"""One tile of multi-similarity on the CPU: its elementwise work eager and as one
``torch.compile``d function (a lead measured for issue 23, not used by the losses: the eager
loss met the CPU target).

A (T, R) = (1,024, 16,384) tile of cosine similarities of random unit vectors (D = 128, K = 4
per class), the tile's matrix product for scale, the masks, the loss's eager ``_tile_sum`` and
the same formulas written as one function, run eager and compiled (``dynamic=False``); median of
``--repeats`` after a warm-up; the compiled value and gradient are compared with the eager ones.

    python benchmarks/compile_tile.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deepmetric import mining as miners
from deepmetric.losses.multi_similarity import MultiSimilarityLoss


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fused_tile_sum(
    s: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, offset: int, loss: MultiSimilarityLoss
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MultiSimilarityLoss._tile_sum`` with the class masks made inside (one function for
    the compiler to fuse): the value sum_i L_i and its gradient with respect to 1 - s."""
    alpha, beta, base, eps = loss.alpha, loss.beta, loss.base, loss.epsilon
    same = labels[:, None] == ref[None, :]
    rows = torch.arange(s.shape[0], device=s.device)[:, None] + offset
    self_pair = torch.arange(s.shape[1], device=s.device)[None, :] == rows
    pos, neg = same & ~self_pair, ~same
    hardest_pos = torch.where(pos, s, torch.inf).amin(dim=1, keepdim=True)
    hardest_neg = torch.where(neg, s, -torch.inf).amax(dim=1, keepdim=True)
    keep_neg = neg & (s + eps > hardest_pos)
    keep_pos = pos & (s - eps < hardest_neg)
    a_pos = torch.where(keep_pos, -alpha * (s - base), -torch.inf)
    a_neg = torch.where(keep_neg, beta * (s - base), -torch.inf)
    m_pos = a_pos.amax(dim=1, keepdim=True).clamp_min(0.0)  # log(1 + sum exp), stable
    m_neg = a_neg.amax(dim=1, keepdim=True).clamp_min(0.0)
    lse_pos = m_pos + torch.log(torch.exp(a_pos - m_pos).sum(1, keepdim=True) + torch.exp(-m_pos))
    lse_neg = m_neg + torch.log(torch.exp(a_neg - m_neg).sum(1, keepdim=True) + torch.exp(-m_neg))
    value = lse_pos.sum() / alpha + lse_neg.sum() / beta
    return value, torch.exp(a_pos - lse_pos) - torch.exp(a_neg - lse_neg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16_384)
    parser.add_argument("--rows", type=int, default=1024, help="rows of the tile")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(args.batch, args.dim), dim=1)
    labels = torch.arange(args.batch) // 4
    loss = MultiSimilarityLoss()
    t = args.rows
    s = x[:t] @ x.T
    masks = miners.tile_masks(labels[:t], labels, self_offset=0)
    eager_value, eager_grad = loss._tile_sum(1.0 - s, masks)
    compiled = torch.compile(fused_tile_sum, dynamic=False)
    start = time.perf_counter()
    value, grad = compiled(s, labels[:t], labels, 0, loss)
    compile_s = time.perf_counter() - start
    rows = [
        ("the tile's matrix product x[:T] @ x.T", _median_ms(lambda: x[:t] @ x.T, args.repeats)),
        (
            "masks (miners.tile_masks)",
            _median_ms(lambda: miners.tile_masks(labels[:t], labels, self_offset=0), args.repeats),
        ),
        (
            "_tile_sum, eager (the loss today)",
            _median_ms(lambda: loss._tile_sum(1.0 - s, masks), args.repeats),
        ),
        (
            "fused_tile_sum, eager (masks inside)",
            _median_ms(lambda: fused_tile_sum(s, labels[:t], labels, 0, loss), args.repeats),
        ),
        (
            "fused_tile_sum, torch.compile (masks inside)",
            _median_ms(lambda: compiled(s, labels[:t], labels, 0, loss), args.repeats),
        ),
    ]
    print(
        f"tile ({t:,}, {args.batch:,}), D = {args.dim}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; compile {compile_s:.1f} s; compiled vs eager: value "
        f"{abs(float(value - eager_value)) / abs(float(eager_value)):.1e} relative, gradient "
        f"{float((grad - eager_grad).abs().max()):.1e} max abs\n"
    )
    print("| step | ms (median) |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} |")


if __name__ == "__main__":
    main()

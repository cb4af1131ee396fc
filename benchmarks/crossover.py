"""Where the two exact mining methods cross over: direct (one pass per positive slot,
O(K B^2)) against sort (O(B^2 log B)), by samples per class K, at fixed B.

    python benchmarks/crossover.py                # B = 4096, K in 4 8 12 16 32 64
    python benchmarks/crossover.py --batch 2048 --ks 4 16

``deepmetric.mining.DIRECT_MAX_POSITIVES`` (P = K - 1 positives per anchor) is set from this.
Median forward + backward of TripletLoss, 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepmetric.losses import TripletLoss


def _median_ms(loss: TripletLoss, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        x.grad = None
        start = time.perf_counter()
        loss(x, y).backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])  # the first run warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    x = torch.nn.functional.normalize(torch.randn(b, 128, generator=g)).requires_grad_(True)
    print(f"B = {b}, D = 128, {args.threads} threads, median of {args.repeats}, ms\n")
    print("| K | batch_all direct | batch_all sort | semi_hard direct | semi_hard sort |")
    print("|---|---|---|---|---|")
    for k in args.ks:
        y = (torch.arange(b) // k)[torch.randperm(b, generator=g)]  # classes of K
        row = [
            _median_ms(TripletLoss(mining=m, method=method), x, y, args.repeats)
            for m in ("batch_all", "semi_hard")
            for method in ("direct", "sort")
        ]
        print(f"| {k} | " + " | ".join(f"{t:.0f}" for t in row) + " |")


if __name__ == "__main__":
    main()

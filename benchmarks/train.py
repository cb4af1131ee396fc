"""Training throughput and the share of step time spent in mining + loss.

Times full optimisation steps of the default CNN (forward, loss, backward, Adam step) on P x K
batches of 1x28x28 images, and separately the mining + loss part alone (distance matrix,
mining, loss, and their backward to the embeddings), for each triplet mining strategy.

    python benchmarks/train.py                  # B = 256 (P = 64, K = 4), 2 threads
    python benchmarks/train.py --batch 128 --k 4 --steps 30

Random images stand in for data (the cost of a step does not depend on pixel values); the
data loading of the real trainer is an in-memory index, not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepmetric.config import load_config
from deepmetric.losses import ContrastiveLoss, LiftedStructuredLoss, TripletLoss
from deepmetric.models import EmbeddingNet, SmallCNN


def _median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = load_config(None, [])  # the default model: SmallCNN -> 128-d, L2-normalised
    backbone = SmallCNN(batch_norm=config.model.batch_norm, padding=config.model.padding)
    net = EmbeddingNet(backbone, dim=config.model.dim, normalize=config.model.normalize)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    b, k = args.batch, args.k
    x = torch.rand(b, 1, 28, 28)
    y = torch.arange(b // k).repeat_interleave(k)[torch.randperm(b)]
    losses = {
        "triplet batch_hard": TripletLoss(margin=0.2, mining="batch_hard"),
        "triplet batch_all": TripletLoss(margin=0.2, mining="batch_all"),
        "triplet semi_hard": TripletLoss(margin=0.2, mining="semi_hard"),
        "contrastive": ContrastiveLoss(margin=1.0),
        "lifted": LiftedStructuredLoss(margin=1.0),
    }
    print(
        f"torch {torch.__version__}, {args.threads} threads; B = {b} (K = {k}), 1x28x28, "
        f"SmallCNN (padding {config.model.padding}) -> {config.model.dim}-d; "
        f"median of {args.steps} steps\n"
    )
    print("| loss | step ms | samples/s | mining + loss ms | share of step |")
    print("|---|---|---|---|---|")
    for name, loss_fn in losses.items():

        def step(loss_fn=loss_fn) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()

        emb = net(x).detach()

        def loss_only(loss_fn=loss_fn, emb=emb) -> None:
            e = emb.clone().requires_grad_(True)
            loss_fn(e, y).backward()

        step_ms = _median_ms(step, args.steps)
        loss_ms = _median_ms(loss_only, args.steps * 5)
        print(
            f"| {name} | {step_ms:.1f} | {1000 * b / step_ms:.0f} | {loss_ms:.2f} | "
            f"{100 * loss_ms / step_ms:.1f}% |"
        )


if __name__ == "__main__":
    main()

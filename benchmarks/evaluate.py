"""Time the full evaluation of a trained run, stage by stage.

    python benchmarks/evaluate.py RUN_DIR            # e.g. runs/fashion_mnist_demo
    python benchmarks/evaluate.py RUN_DIR --map      # include the 2-D embedding map

Stages: loading the model and the test split, embedding it, every metric (retrieval,
clustering, verification with the validation threshold, per-class table, triplet categories),
and the figures + report. The target for the 10,000 Fashion-MNIST test images is under 60 s on
2 CPU cores without the map.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from deepmetric.evaluate.run import evaluate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--map", action="store_true", help="also draw the 2-D embedding map")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    marks: list[tuple[str, float]] = [("start", time.perf_counter())]

    def progress(text: str) -> None:
        marks.append((text, time.perf_counter()))

    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate_run(args.run_dir, out=out, embedding_map=args.map, progress=progress)
    marks.append(("end", time.perf_counter()))
    print(
        f"{metrics['data']['items']:,} items of {metrics['data']['spec']}, "
        f"{args.threads} threads, map: {args.map}"
    )
    print("| stage | seconds |\n|---|---|")
    stages = ["load model + data", "embed (+ validation threshold) + metrics", "figures + report"]
    starts = [t for _, t in marks]
    # progress marks: embedding, metrics, figures, wrote; fold them into three stages.
    bounds = [starts[0], starts[1], starts[3], starts[-1]]
    for name, a, b in zip(stages, bounds, bounds[1:]):
        print(f"| {name} | {b - a:.1f} |")
    print(f"| total | {starts[-1] - starts[0]:.1f} |")
    print(f"precision@1 {metrics['precision_at_1']:.4f}, MAP@R {metrics['map_at_r']:.4f}")


if __name__ == "__main__":
    main()

"""The demos: ``demo-oneshot`` (one-shot identification of classes never trained on) and
``demo`` (each loss on synthetic data)."""

from __future__ import annotations

import argparse
from typing import Any

from deepmetric.cli.common import import_option


def add_parser(commands: Any) -> None:
    _add_oneshot(commands)
    demo = commands.add_parser("demo", help="train a small net with each loss on synthetic data")
    demo.add_argument("--steps", type=int, default=300, help="training steps per loss")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=demo_losses, bare=True)  # no --import, no --device, no catching


def demo_losses(args: argparse.Namespace) -> int:
    from deepmetric.demo import main as demo_main

    demo_main(steps=args.steps, seed=args.seed)
    return 0


def _add_oneshot(commands: Any) -> None:
    oneshot = commands.add_parser(
        "demo-oneshot",
        help="one-shot identification of classes never trained on",
        description="Train on Fashion-MNIST classes 0-5 (or reuse --run), enroll one test "
        "image of each unseen class, identify the other test images of those classes and "
        "strangers of the seen classes; print the accuracy and acceptance rates and write a "
        "figure into the run folder. key=value overrides go to the training config (e.g. "
        "data=idx:DIR epochs=1).",
    )
    oneshot.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=4")
    oneshot.add_argument("--run", default="runs/oneshot_0to5", help="the run folder")
    oneshot.add_argument(
        "--config",
        help="a YAML config setting train.classes (make demo-oneshot: configs/openset.yaml); "
        "default: the built-in defaults on classes 0-5",
    )
    oneshot.add_argument(
        "--strangers", type=int, default=1000, help="test images of the seen classes to query"
    )
    oneshot.add_argument(
        "--enroll", type=int, help="enroll this many unseen test classes (default: all)"
    )
    oneshot.add_argument(
        "--stranger-classes",
        type=int,
        help="strangers: every image of this many other unseen test classes (for data whose "
        "test classes are all unseen, e.g. the glyph set) instead of --strangers",
    )
    oneshot.add_argument(
        "--enroll-face", help="enroll the image of this face of each class (npz glyph sets)"
    )
    oneshot.add_argument(
        "--far",
        type=float,
        help="the gallery's threshold: the largest whose false accept rate on the run's "
        "validation pairs is at most this (default: the run's threshold)",
    )
    oneshot.add_argument(
        "--device",
        default="auto",
        help="where the network trains (train.device, unless an override sets it) and runs: "
        "auto (CUDA when available, else CPU), cpu, cuda, cuda:N",
    )
    import_option(oneshot)
    oneshot.set_defaults(handler=demo_oneshot)


def demo_oneshot(args: argparse.Namespace) -> int:
    from deepmetric.demo_oneshot import main as oneshot

    oneshot(
        args.overrides,
        run=args.run,
        strangers=args.strangers,
        config=args.config,
        device=args.device,
        enroll=args.enroll,
        stranger_classes=args.stranger_classes,
        enroll_face=args.enroll_face,
        far=args.far,
    )
    return 0

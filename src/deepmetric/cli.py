"""The ``deepmetric`` command line: ``deepmetric train``, ``deepmetric demo``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from deepmetric.config import load_config
    from deepmetric.training import resume_config, train

    if args.resume:
        if args.config:
            args.overrides.insert(0, args.config)  # `train --resume DIR epochs=5`
        config = resume_config(args.resume, args.overrides)
    else:
        config_path = args.config
        if config_path is not None and "=" in config_path:  # no file, only overrides
            args.overrides.insert(0, config_path)
            config_path = None
        config = load_config(config_path, args.overrides)
    summary = train(config, resume=bool(args.resume))
    test = ""
    if "test_precision_at_1" in summary:
        test = f", test precision@1 {summary['test_precision_at_1']:.3f}"
    if "unseen_classes_precision_at_1" in summary:
        test += f" (unseen classes {summary['unseen_classes_precision_at_1']:.3f})"
    print(
        f"done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']} s; "
        f"train loss {summary['train_loss']:.4f}, val precision@1 "
        f"{summary['val_precision_at_1']:.3f}{test}; run in {summary['run_dir']}"
    )
    print(json.dumps(summary))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from deepmetric.evaluate.run import evaluate_run

    def progress(text: str) -> None:
        print(text, file=sys.stderr)

    m = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        out=args.out,
        embedding_map=not args.no_map,
        device=args.device,
        progress=progress,
    )
    v = m["verification"]
    print(
        f"precision@1 {m['precision_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  "
        f"R-precision {m['r_precision']:.4f}  NMI {m['nmi']:.4f}  verification accuracy "
        f"{v['accuracy']:.4f} (threshold {v['threshold']:.4f}, {v['threshold_source']})  "
        f"ROC AUC {v['roc_auc']:.4f}  EER {v['eer']:.4f}  [{m['seconds']} s]"
    )
    if "unseen_classes" in m:
        u = m["unseen_classes"]
        print(f"unseen classes: precision@1 {u['precision_at_1']:.4f}  MAP@R {u['map_at_r']:.4f}")
    return 0


def _import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=[],
        help="import a Python module first (repeatable): the one that registers a run's model "
        "builder with deepmetric.models.register_model (runs trained by deepmetric.fit)",
    )


def _import_modules(names: list[str]) -> None:
    """Import each module named by ``--import`` (from the current folder too), or say why not."""
    if "" not in sys.path:
        sys.path.insert(0, "")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"--import {name}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepmetric", description="Train, evaluate and try metric-learning models."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train an embedding model",
        description="Train from a YAML config plus key=value overrides, e.g. "
        "`deepmetric train configs/fashion_mnist.yaml epochs=2 data=idx:DIR out=runs/x`.",
    )
    train.add_argument("config", nargs="?", help="a YAML file from configs/ (optional)")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=0.01")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    _import_option(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics, figures and an HTML report of a trained run",
        description="Writes metrics.json, report.html and the figures to RUN_DIR/eval (or "
        "--out, and nothing outside it). The verification threshold is chosen on the run's "
        "validation split and then saved as RUN_DIR/threshold.json (not with --out); with "
        "--data or no validation split, the pairs are scored by 10-fold cross-validation and "
        "no threshold is saved.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--data", help="another data set spec (default: the run's own)")
    evaluate.add_argument(
        "--split",
        default="test",
        choices=["train", "test"],
        help="split to score (train: without the run's validation items)",
    )
    evaluate.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    evaluate.add_argument("--no-map", action="store_true", help="skip the 2-D embedding map")
    evaluate.add_argument(
        "--device",
        default="auto",
        help="where the network runs: auto (CUDA when available, else CPU), cpu, cuda, cuda:1 "
        "(the run's train.device is not used)",
    )
    _import_option(evaluate)

    demo = commands.add_parser("demo", help="train a small net with each loss on synthetic data")
    demo.add_argument("--steps", type=int, default=300, help="training steps per loss")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from deepmetric.demo import main as demo_main

        demo_main(steps=args.steps, seed=args.seed)
        return 0
    from deepmetric.checkpoints import CheckpointError
    from deepmetric.data import DatasetError

    try:
        _import_modules(args.imports)
        return _evaluate(args) if args.command == "evaluate" else _train(args)
    except KeyboardInterrupt as stop:  # Ctrl-C: 130; SIGTERM (a checkpoint was saved): 143
        return 128 + getattr(stop, "signum", 2)
    except (ValueError, CheckpointError, DatasetError, FloatingPointError) as error:
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

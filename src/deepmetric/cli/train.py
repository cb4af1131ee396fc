"""``deepmetric train``: a YAML config plus key=value overrides (or ``--resume RUN_DIR``) to a
trained run, in this process or, with ``--nproc N``, in N local processes (torchrun)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from deepmetric.cli.common import import_option


def add_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train an embedding model",
        description="Train from a YAML config plus key=value overrides, e.g. "
        "`deepmetric train configs/fashion_mnist.yaml epochs=2 data=idx:DIR out=runs/x`.",
    )
    train.add_argument("config", nargs="?", help="a YAML file from configs/ (optional)")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=0.01")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train in N local processes (torch.distributed): nccl with one GPU per process "
        "(train.device=cuda, or auto with a GPU for each), else gloo on the CPU; each takes a "
        "slice of every global P x K batch; the result does not depend on N",
    )
    import_option(train)
    train.set_defaults(handler=run, take_extra=overrides_after_options)


def overrides_after_options(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """key=value overrides after an option (``train C --nproc 2 a=b``), which argparse leaves
    unparsed, join ``args.overrides``; returns the rest (unrecognized arguments)."""
    args.overrides += [word for word in extra if "=" in word and not word.startswith("-")]
    return [word for word in extra if word not in args.overrides]


def run(args: argparse.Namespace) -> int:
    from deepmetric import distributed

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    config = _config(args)
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return _launch_checked(args, config)
    summary = _train_here(args, config)
    if summary is not None:  # the main process
        _print_summary(summary)
    return 0


def _config(args: argparse.Namespace) -> Any:
    """The run's config: the resumed run's plus overrides, or the YAML file's (optional: a
    first word with ``=`` is an override) plus overrides."""
    from deepmetric.components import load_checked_config
    from deepmetric.training import resume_config

    if args.resume:
        if args.config:
            args.overrides.insert(0, args.config)  # `train --resume DIR epochs=5`
        return resume_config(args.resume, args.overrides)
    config_path = args.config
    if config_path is not None and "=" in config_path:  # no file, only overrides
        args.overrides.insert(0, config_path)
        config_path = None
    return load_checked_config(config_path, args.overrides)


def _launch_checked(args: argparse.Namespace, config: Any) -> int:
    """``--nproc N`` from the command line: the run folder and the GPUs checked here, in one
    line each, then the N processes started (the config was checked above)."""
    from deepmetric import distributed
    from deepmetric.training.fit import has_checkpoint

    if not args.resume and has_checkpoint(config.run_dir):
        raise ValueError(
            f"{config.run_dir} already holds a run: resume it (--resume {config.run_dir}) "
            "or set out=ANOTHER_DIR"
        )
    distributed.on_cuda(config.train.device, args.nproc)  # too few GPUs: one line, here
    return _launch(args.nproc, _without_nproc(args.argv))


def _launch(nproc: int, argv: list[str]) -> int:
    """Run ``deepmetric train`` (``argv`` without ``--nproc``) in ``nproc`` local processes
    through ``torch.distributed.run`` (torchrun's engine, a free port on loopback); the exit
    code is the first failed process's (each printed its own error line)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "deepmetric", *argv])
    except ChildFailedError as failed:
        return int(failed.get_first_failure()[1].exitcode) or 1
    except SignalException as stop:  # SIGTERM to this process: passed on to the workers,
        return 128 + int(stop.sigval)  # which stopped at the same batch and saved a checkpoint
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _train_here(args: argparse.Namespace, config: Any) -> dict[str, Any] | None:
    """Train in this process (one of torchrun's, or alone); the summary in the main process,
    ``None`` in the others."""
    from deepmetric import distributed
    from deepmetric.training import train

    if distributed.launched_by_torchrun():
        distributed.init_from_env(config.train.device)
    try:
        main = distributed.is_main()
        summary = train(config, resume=bool(args.resume))
    finally:
        distributed.shutdown()
    return summary if main else None


def _print_summary(summary: dict[str, Any]) -> None:
    """One line for people, then the summary as one JSON object."""
    from deepmetric.training.tuples import VALIDATION_KEYS

    shown = [(key, label) for keys in VALIDATION_KEYS.values() for key, label in keys]
    val = " ".join(f"{label} {summary[key]:.3f}" for key, label in shown if key in summary)
    test = ""
    if "test_precision_at_1" in summary:
        test = f", test precision@1 {summary['test_precision_at_1']:.3f}"
    if "unseen_classes_precision_at_1" in summary:
        test += f" (unseen classes {summary['unseen_classes_precision_at_1']:.3f})"
    print(
        f"done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']} s; "
        f"train loss {summary['train_loss']:.4f}, {val}{test}; run in {summary['run_dir']}"
    )
    print(json.dumps(summary))

"""The ``deepmetric`` command line: ``train``, ``evaluate``, ``embed``, ``verify``, ``export``,
``gallery`` (create / enroll / identify / list / remove / reindex / check / backup),
``serve``, ``demo``, ``demo-oneshot``. Thin: parse, call the API, print; an error is one line
and exit code 2.

One module per command group, each building its commands' parsers beside their handlers
(``add_parser(commands)``, ``set_defaults(handler=...)``): :mod:`~deepmetric.cli.train`,
:mod:`~deepmetric.cli.evaluate`, :mod:`~deepmetric.cli.models` (embed, verify, export),
:mod:`~deepmetric.cli.gallery`, :mod:`~deepmetric.cli.serve`, :mod:`~deepmetric.cli.demos`;
what they share is in :mod:`~deepmetric.cli.common`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deepmetric.cli import demos, evaluate, gallery, models, serve, train
from deepmetric.cli.common import check_device, import_modules, one_line_warnings

__all__ = ["main"]

GROUPS = (train, evaluate, models, gallery, serve, demos)  # in the order of --help


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "bare", False):  # demo: Python's own errors, as they are
        return args.handler(args)
    from deepmetric.checkpoints import CheckpointError
    from deepmetric.data import DatasetError
    from deepmetric.gallery.store import GalleryError

    try:
        import_modules(args.imports)
        check_device(getattr(args, "device", None))  # every command but train (train.device)
        with one_line_warnings():
            return args.handler(args)
    except KeyboardInterrupt as stop:  # Ctrl-C: 130; SIGTERM (a checkpoint was saved): 143
        return 128 + getattr(stop, "signum", 2)
    except (
        ValueError,
        CheckpointError,
        DatasetError,
        FloatingPointError,
        OSError,
        GalleryError,
    ) as error:
        print(f"deepmetric: error: {error}", file=sys.stderr)
        return 2


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; ``args.argv`` the words as given (``train --nproc`` passes
    them on). A command's ``take_extra`` may claim words argparse left over; any other is an
    error (exit 2, argparse's usage line)."""
    parser = argparse.ArgumentParser(
        prog="deepmetric", description="Train, evaluate and try metric-learning models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(commands)
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "take_extra", None) is not None:
        extra = args.take_extra(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    return args

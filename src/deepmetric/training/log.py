"""What a run writes as it goes: ``log.jsonl``, TensorBoard events, a one-line progress display,
and the per-step diagnostics (share of active triplets, mean distance, collapse warning)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from deepmetric import mining
from deepmetric.distances import Metric, pairwise
from deepmetric.files import write_text_atomically

LOG_FILE = "log.jsonl"


@dataclass
class StepStats:
    loss: float
    active: float = float("nan")  # share of valid triplets with a positive hinge
    mean_dist: float = float("nan")


@torch.no_grad()
def batch_stats(
    loss: float, emb: torch.Tensor, labels: torch.Tensor | None, *, metric: Metric, margin: float
) -> StepStats:
    """Diagnostics of a logged step: the mean pairwise distance of the (B, D) embeddings and,
    with labels, the share of valid triplets that are not easy at ``margin``."""
    emb = emb.detach().float()
    d = pairwise(emb, metric=metric)
    n = len(emb)
    stats = StepStats(loss=loss, mean_dist=float(d.sum() / max(1, n * (n - 1))))
    if labels is not None:
        cats = mining.triplet_categories(d, labels, margin=max(margin, 1e-12))
        stats.active = (cats.hard + cats.semi_hard) / cats.total if cats.total else 0.0
    return stats


def warn_collapse(stats: StepStats, margin: float | None) -> None:
    """Warn when the embeddings have (nearly) fallen onto one point: the mean pairwise distance
    is below a tenth of the margin (1e-3 without one), so every triplet sits at the margin.
    ``margin=None``: a loss without a distance margin (multi-similarity, the proxy and
    margin-softmax losses), for which only the 1e-3 floor and the learning-rate advice apply."""
    if stats.mean_dist < max(1e-3, 0.1 * (margin or 0.0)):
        advice = (
            f"(margin {margin}); try loss.mining=batch_all or semi_hard, a lower train.lr or a "
            "smaller margin"
            if margin is not None
            else "; try a lower train.lr"
        )
        warnings.warn(
            f"embeddings have collapsed: mean pairwise distance {stats.mean_dist:.2e}, loss "
            f"{stats.loss:.4f} {advice}",
            RuntimeWarning,
            stacklevel=2,
        )


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop the records after optimiser step ``step`` (and any summary) from ``log.jsonl``,
    atomically, so that a resumed run's curves continue from its checkpoint instead of
    doubling back over the steps that ran after it."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
        if record.get("kind") != "summary" and record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


class EventFile:
    """TensorBoard scalars, written synchronously into one events file opened once.

    ``torch.utils.tensorboard.SummaryWriter`` writes from a background thread that re-opens
    the file for every record: when the run folder turns read-only (or the disk fills) that
    thread dies printing its own traceback, and the error reaches the trainer later, if at all.
    Here each record is written and flushed by the caller, through a file held open like
    ``log.jsonl``, so a failure is an ``OSError`` in :meth:`RunLog.write`, which names the file.
    The records are TensorBoard's own (``tensorboard``'s protobufs and record framing); without
    the ``tensorboard`` package there is no events file."""

    _count = itertools.count()

    def __init__(self, folder: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event  # ImportError: no tensorboard
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = Event, Summary
        folder.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(self._count)}"
        )
        self.path = folder / name
        self._file = self.path.open("ab")
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding ``tag -> value`` at ``step``."""
        Value = self._summary.Value
        summary = self._summary(value=[Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())
        self._file.flush()

    def close(self) -> None:
        """Close the file; an error closing it (everything was flushed already) is ignored, so
        that it never hides the error a run is stopping for."""
        with contextlib.suppress(OSError):
            self._file.close()


class RunLog:
    """``log.jsonl`` lines, optional TensorBoard events (:class:`EventFile`, when the
    ``tensorboard`` package is installed) and a one-line progress display.

    With ``run_dir=None`` (``fit`` without ``out``) only the progress display is kept."""

    def __init__(self, run_dir: Path | None, stream: TextIO | None) -> None:
        self.stream = stream
        self.file = (run_dir / LOG_FILE).open("a") if run_dir is not None else None
        self.tensorboard: EventFile | None = None
        if run_dir is not None:
            try:
                self.tensorboard = EventFile(run_dir / "tensorboard")
            except ImportError:  # tensorboard is optional
                pass
            except OSError as error:
                self.close()
                raise _cannot_write(error, run_dir / "tensorboard") from None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as error:  # a full disk, a read-only folder: say which file
                raise _cannot_write(error, self.file.name) from None
        if self.tensorboard is not None:
            step = record.get("step", record.get("epoch", 0))
            values = {
                f"{record['kind']}/{key}": value
                for key, value in record.items()
                if isinstance(value, float) and math.isfinite(value)
            }
            if values:
                try:
                    self.tensorboard.scalars(values, step)
                except OSError as error:
                    raise _cannot_write(error, self.tensorboard.path) from None

    def progress(self, text: str, *, final: bool = False) -> None:
        if self.stream is None:
            return
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _cannot_write(error: OSError, path: str | Path) -> OSError:
    """``error`` saying which file: ``cannot write PATH: <reason>``."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}")

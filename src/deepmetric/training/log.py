"""What a run writes as it goes: ``log.jsonl``, TensorBoard events, a one-line progress display,
and the per-step diagnostics (share of active triplets, mean distance, collapse warning)."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from deepmetric import mining
from deepmetric.distances import Metric, pairwise

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
    tmp = path.with_name(LOG_FILE + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLog:
    """``log.jsonl`` lines, optional TensorBoard events and a one-line progress display.

    With ``run_dir=None`` (``fit`` without ``out``) only the progress display is kept."""

    def __init__(self, run_dir: Path | None, stream: TextIO | None) -> None:
        self.stream = stream
        self.file = (run_dir / LOG_FILE).open("a") if run_dir is not None else None
        self.tensorboard = None
        if run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as error:  # a full disk, a read-only folder: say which file
                raise OSError(
                    error.errno, f"cannot write {self.file.name}: {error.strerror}"
                ) from None
        if self.tensorboard is not None:
            step = record.get("step", record.get("epoch", 0))
            for key, value in record.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, step)

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

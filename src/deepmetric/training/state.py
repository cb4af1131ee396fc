"""Where a run stands and how it stops: the position in the schedule, the RNG state, and the
signal handling that turns Ctrl-C or SIGTERM into a checkpoint at a batch boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepmetric.checkpoints import load_latest, load_model_state, save_checkpoint


@dataclass
class Position:
    """Where training stands: the next batch to run is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimiser steps so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's batch losses so far


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequested(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, acted on at a batch boundary, where the state is consistent.

    ``signum`` is the signal received; the command line exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While installed, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, ``docker stop``,
    ``timeout``) only record the request; the loop calls :meth:`check` between batches, so a
    checkpoint never catches a half-done step. A second Ctrl-C interrupts at once.

    Signal handlers can only be installed from the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def check(self, agree: Callable[[int], int] | None = None) -> None:
        """Raise :class:`StopRequested` if a signal came. ``agree`` turns this process's signal
        number (0: none) into the one all processes act on (in a distributed run: the largest
        over ranks, so every rank stops at the same batch)."""
        signum = self.received or 0
        if agree is not None:
            signum = agree(signum)
        if signum:
            raise StopRequested(signum)

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


@dataclass
class RunState:
    """Everything a checkpoint holds: weights, optimiser, gradient scaler, RNG, position, and
    the loss's own state when it has one (the proxies of a proxy loss, a cross-batch memory)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pos: Position = field(default_factory=Position)
    loss: nn.Module | None = None

    def save(self, run_dir: Path | None, config_yaml: str) -> None:
        """Checkpoint ``epochNNNN-batchNNNNNN`` (nothing without a run folder)."""
        if run_dir is None:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "position": vars(self.pos),
        }
        loss_state = self.loss.state_dict() if self.loss is not None else {}
        if loss_state:
            state["loss"] = loss_state
        name = f"epoch{self.pos.epoch:04d}-batch{self.pos.batch:06d}"
        save_checkpoint(run_dir, name, self.model.state_dict(), state, config_yaml)

    def restore(self, run_dir: Path) -> None:
        """Load the newest checkpoint of ``run_dir`` that loads into this state (see
        :func:`~deepmetric.checkpoints.load_latest`: a fallback warns, and ``CheckpointError``
        names every damaged checkpoint when none loads)."""
        folder, model_state, state, _ = load_latest(run_dir)
        load_model_state(self.model, model_state, source=folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.loss is not None and "loss" in state:
            load_model_state(self.loss, state["loss"], source=folder)
        set_rng_state(state["rng"])
        self.pos = Position(**state["position"])

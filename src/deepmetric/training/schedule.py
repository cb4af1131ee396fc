"""The learning-rate plan: a pure function of the optimiser step and the planned total.

Nothing about the schedule is stored in a checkpoint: the rate at step ``s`` is
``lr * factor(s)`` with ``factor`` computed from the *current* config. Resuming with the same
config therefore continues exactly; resuming with more epochs (``--resume RUN epochs=N``)
re-plans the schedule over the new total: from its next step the run follows the curve a run
planned for N epochs from the start would follow (cosine: never back to the peak; a finished
2-epoch run extended to 4 continues at the middle of the new curve, half the peak rate, and
decays to 0 at epoch 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Schedule = Literal["none", "cosine", "step"]


@dataclass(frozen=True)
class LRPlan:
    """``factor(step)`` in [0, 1] for ``total`` optimiser steps of ``per_epoch`` steps each.

    - ``cosine``: ``0.5 (1 + cos(pi * s / total))``, stepped every batch, 1 -> 0;
    - ``step``: ``gamma ** floor(s / (step_size * per_epoch))``;
    - ``none``: 1.
    A linear warm-up over the first ``warmup`` steps multiplies any of them.
    """

    schedule: Schedule
    total: int
    per_epoch: int
    step_size: int = 1
    gamma: float = 0.1
    warmup: int = 0

    def factor(self, step: int) -> float:
        if self.schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / max(1, self.total)))
        elif self.schedule == "step":
            f = self.gamma ** (step // max(1, self.step_size * self.per_epoch))
        else:
            f = 1.0
        if self.warmup > 0 and step < self.warmup:
            f *= (step + 1) / (self.warmup + 1)
        return f


def set_lr(optimizer: torch.optim.Optimizer, plan: LRPlan, step: int) -> float:
    """Set every parameter group's rate to ``initial_lr * plan.factor(step)``; return the first."""
    factor = plan.factor(step)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]

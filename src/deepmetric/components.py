"""A config against the component tables: the checks that need the registered losses, mining
rules and backbones (:data:`deepmetric.losses.LOSSES`, :data:`deepmetric.mining.MINING_RULES`,
:data:`deepmetric.models.BACKBONES`).

:mod:`deepmetric.config` sits below those layers and checks types and values only; this module
sits above them and is called where a config becomes components: :func:`load_checked_config`
for what a user writes (``deepmetric train``, the demos), :func:`check_components` on a
saved run's config (:meth:`deepmetric.runs.Run.open`), in :func:`deepmetric.training.train`
and in ``fit``. Every error is a one-line :class:`~deepmetric.config.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepmetric.config import Config, ConfigError, LossConfig, load_config, show
from deepmetric.losses import LOSSES, SHARED_OPTIONS, LossEntry
from deepmetric.mining import MINING_RULES
from deepmetric.models import BACKBONES

__all__ = ["check_components", "check_loss_options", "check_names", "load_checked_config"]


def load_checked_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """:func:`deepmetric.config.load_config`, then every check of what a user wrote against
    the tables (:func:`check_components` with ``written=True``)."""
    config = load_config(path, overrides)
    check_components(config, written=True)
    return config


def check_components(config: Config, *, written: bool = False) -> None:
    """The checks of ``config`` that need the component tables: the mining rule is one of
    :data:`MINING_RULES`; a registered loss declares only ``loss.*`` options; a cross-batch
    memory, a P x K-only loss and ``model.conv_readout`` go with what their entries allow.

    ``written``: the config is what a user wrote (a file, overrides): also
    :func:`check_names` and :func:`check_loss_options`. A run folder's saved config is checked
    without them: evaluating a run needs no loss (its loss may be registered by code this
    process has not imported), and its config.yaml holds every key, the defaults included."""
    if written:
        check_names(config)
    c = config.loss
    _check_choice("loss.mining", c.mining, MINING_RULES)
    batch_modes = config.mode in ("batch", "joint")
    entry = LOSSES.get(c.name)  # None: a loss registered by code this process has not imported
    if entry is not None:
        _check_loss_entry(entry)
    if c.memory and entry is not None and not (batch_modes and entry.takes_memory):
        with_memory = " or ".join(name for name, e in LOSSES.items() if e.takes_memory)
        raise ConfigError(
            "loss.memory (a cross-batch memory) needs mode=batch or joint and "
            f"loss.name={with_memory}"
        )
    if entry is not None and entry.pk_only and not batch_modes:
        raise ConfigError(f"loss.name={c.name} trains on P x K batches: mode=batch or joint")
    m = config.model
    mapped = [name for name, e in BACKBONES.items() if e.map_readout]
    if m.conv_readout and not (m.projection_head and m.backbone in mapped):
        raise ConfigError(
            "model.conv_readout=true adds the last convolutional map to the features before the "
            f"head: it needs model.projection_head=true and backbone {' or '.join(mapped)}"
        )
    if written:
        check_loss_options(config)


def _check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` of ``key`` is one of ``choices`` (a table's names), else a ``ConfigError``
    listing them, worded as an unknown ``Literal`` value is."""
    choices = list(choices)
    if value not in choices:
        expected = " | ".join(map(repr, choices))
        raise ConfigError(f"{key}: expected one of {expected}, got {show(value)}")


def check_names(config: Config) -> None:
    """``loss.name`` and ``model.backbone`` name registered components (``ConfigError``
    listing the choices otherwise)."""
    _check_choice("loss.name", config.loss.name, LOSSES)
    _check_choice("model.backbone", config.model.backbone, BACKBONES)


def check_loss_options(config: Config) -> None:
    """An option ``loss.name`` does not take (see :data:`deepmetric.losses.LOSSES`; the
    :data:`~deepmetric.losses.SHARED_OPTIONS` go with any loss) set to anything but its
    default is a ``ConfigError`` naming the options that loss takes (what a user wrote only:
    a run folder's saved config holds every key)."""
    c, entry, default = config.loss, LOSSES[config.loss.name], LossConfig()
    for f in dataclasses.fields(LossConfig):
        value = getattr(c, f.name)
        if f.name in ("name", *entry.options, *SHARED_OPTIONS) or value == getattr(default, f.name):
            continue
        own = f"its options: {', '.join(entry.options)}" if entry.options else "it has none"
        raise ConfigError(
            f"loss.{f.name}={show(value)}: loss.name={c.name} takes no {f.name}; {own} "
            f"(with any loss: {', '.join(SHARED_OPTIONS)})"
        )


def _check_loss_entry(entry: LossEntry) -> None:
    """A registered loss declares only ``loss.*`` keys as its options."""
    keys = {f.name for f in dataclasses.fields(LossConfig)} - {"name"}
    foreign = [key for key in entry.options if key not in keys]
    if foreign:
        raise ConfigError(
            f"loss {entry.name} declares option(s) {', '.join(foreign)}, which are no loss.* "
            f"keys (those are: {', '.join(sorted(keys))})"
        )

"""Argument checks shared by every layer: one line naming the argument and the value.

``bool`` is refused where an integer is wanted (``True`` is an ``int`` to Python, never a
count to a user); numbers must be finite where a float is wanted.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer_at_least(name: str, value: Any, minimum: int = 1, *, also: str = "") -> int:
    """``value`` when it is an integer ``>= minimum``; else ``ValueError``: "NAME must be an
    integer >= MINIMUM[ also], got VALUE" (``also``: what else is allowed, e.g. "or 'all'")."""
    if not is_int(value) or value < minimum:
        more = f" {also}" if also else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{more}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` when it is an integer >= 1; else ``ValueError``: "NAME must be a positive
    integer, got VALUE"."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_number(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` unless it is finite and > 0."""
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def nonnegative_number(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` unless it is finite and >= 0."""
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def finite_number(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` unless it is finite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


__all__ = [
    "finite_number",
    "integer_at_least",
    "is_int",
    "nonnegative_number",
    "positive_int",
    "positive_number",
]

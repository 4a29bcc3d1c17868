"""Argument checks that fail fast with a message naming the parameter, its value and what is accepted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ValueError listing them. True and False match
    only themselves (Python has True == 1: ``adv_ratio=True`` or ``resume=1`` would slip through)."""
    choices = list(choices)
    if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {choices}")
    return value


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
) -> Any:
    """Return ``value`` if it is a number in [low, high] (or (low, high] with ``low_open``), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r} is not accepted; it must be {kind}")
    if value != value:  # NaN
        raise ValueError(f"{name}={value!r} is not accepted; it must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r} is not accepted; it must lie in {left}{lo}, {hi}]")
    return value

"""Checks for the plain-value arguments of the library: each returns the value or raises, naming it.

Every public function and config of the package checks its numbers and switches through these, so
a bad value reads the same wherever it is passed: ``steps: expected a positive int, got 0``.
Bools are refused where a number is expected (``True`` is an int to Python, never to a user).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["boolean", "non_negative_int", "number", "positive_float", "positive_int", "probability"]


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def _integer(name: str, value: object, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    return int(value)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 1; else TypeError/ValueError naming ``name``."""
    if _integer(name, value, "a positive int") < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 0."""
    if _integer(name, value, "an int >= 0") < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


def number(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a float if it is a finite real number between ``low`` and ``high`` (each bound
    included unless ``low_inclusive``/``high_inclusive`` say otherwise). NaN and infinities never pass."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {_describe(value)}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    too_high = value > high if high_inclusive else value >= high
    if not math.isfinite(value) or too_low or too_high:
        bounds = []
        if low > -math.inf:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low:g}")
        if high < math.inf:
            bounds.append(f"{'<=' if high_inclusive else '<'} {high:g}")
        expected = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def positive_float(name: str, value: object, *, none_allowed: bool = False) -> float | None:
    """``value`` as a float if it is a finite number > 0 (None passes too with ``none_allowed``)."""
    if none_allowed and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "None or a positive number" if none_allowed else "a positive number"
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def probability(name: str, value: object, *, allow_one: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (``[0, 1]`` with ``allow_one``): a dropout rate, a fraction."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in {interval}, got {_describe(value)}")
    value = float(value)
    if not (0.0 <= value < 1.0 or (allow_one and value == 1.0)):
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return value


def boolean(name: str, value: object) -> bool:
    """``value`` if it is a bool (not 0/1, not a one-element tensor): a switch means True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_describe(value)}")
    return value

"""Boundary checks of privacy parameters: each raises ``ValueError`` naming the parameter.

``math.isfinite`` comes first everywhere: NaN passes ``x <= 0``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "check_count",
    "check_delta",
    "check_finite",
    "check_non_negative",
    "check_positive",
    "check_sample_rate",
]


def check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_positive(name: str, value: float) -> None:
    check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_delta(name: str, value: float) -> None:
    check_finite(name, value)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def check_sample_rate(name: str, value: float) -> None:
    check_finite(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

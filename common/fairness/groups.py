"""Who a recommender serves well: a per-user metric summarised per user group.

Per-user accuracy (:mod:`common.metrics`) summarised per user group (gender, age bucket,
occupation, activity quartile) with percentile-bootstrap intervals (Efron & Tibshirani 1993) and
the gap between the best- and the worst-served group (:func:`group_table`). Pure numpy on the
arrays the evaluation already has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "AGE_BUCKETS",
    "ATTRIBUTES",
    "GAP_MIN_USERS",
    "GapStats",
    "GroupStats",
    "GroupTable",
    "activity_quartiles",
    "age_bucket",
    "bootstrap_ci",
    "group_order",
    "group_table",
    "user_groups",
]

FloatArray = npt.NDArray[np.floating]
StrArray = npt.NDArray[np.str_]

AGE_BUCKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
"""The ML-1M age buckets (``users.dat`` codes 1, 18, 25, 35, 45, 50, 56), youngest first."""

_AGE_LOWER = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)  # lower bound (years) of AGE_BUCKETS[1:]

ATTRIBUTES = ("gender", "age", "occupation")
"""User attributes :func:`user_groups` takes from the side information when present."""

GAP_MIN_USERS = 10
"""Test users a group needs to count in :func:`~common.fairness.metrics.assess`'s largest gap
(smaller groups are still listed, with their wide intervals): ML-100K's 100 test users include
occupations of one."""


class GroupStats(TypedDict):
    """One group's row of a :func:`group_table`."""

    n: int
    """Users with a finite value."""
    mean: float
    """Mean value over them."""
    ci: list[float]
    """``[lo, hi]`` percentile-bootstrap interval of the mean."""


class GapStats(TypedDict):
    """The difference between the best and the worst group of a :func:`group_table`."""

    value: float
    """``mean(high) - mean(low)``, >= 0."""
    high: str
    """Group with the highest mean (first in table order on ties)."""
    low: str
    """Group with the lowest mean (first in table order on ties)."""
    ci: list[float]
    """``[lo, hi]`` stratified bootstrap interval of the difference."""


class GroupTable(TypedDict):
    """Per-group means with intervals, JSON-ready."""

    groups: dict[str, GroupStats]
    """Label -> statistics, in :func:`group_table`'s order."""
    gap: GapStats | None
    """``None`` when fewer than two groups qualify."""


# --- user groups ----------------------------------------------------------------------------


def age_bucket(value: str) -> str:
    """The ML-1M age bucket of an age in years or of an ML-1M age code.

    ML-1M codes are the lower bounds of their buckets (1, 18, 25, 35, 45, 50, 56), so a single
    mapping of years serves both ML-100K raw ages and ML-1M codes: ``"24" -> "18-24"``,
    ``"25" -> "25-34"``, ``"1" -> "<18"``. Fractional years (``"25.0"``, ``"24.5"``) count
    from the whole year they are in.

    Parameters
    ----------
    value:
        Age as text; ``''``, unparsable text, non-finite and non-positive values are unknown.

    Returns
    -------
    str
        One of :data:`AGE_BUCKETS`, or ``''`` when the age is unknown.
    """
    try:
        years = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(years) or years <= 0:
        return ""
    bucket = int(np.searchsorted(_AGE_LOWER, years, side="right"))
    return AGE_BUCKETS[bucket]


def activity_quartiles(n_interactions: npt.ArrayLike) -> StrArray:
    """Activity quartile labels ``"Q1"`` (least active) .. ``"Q4"`` per user.

    Users are ranked by interaction count, ties broken by user index (a stable sort), and the
    user at rank ``r`` of ``U`` gets quartile ``floor(4 r / U)``. Group sizes therefore differ by
    at most one even when many users share a count; users with the same count may land in
    adjacent quartiles.

    Parameters
    ----------
    n_interactions:
        ``(U,)`` non-negative interaction counts.

    Returns
    -------
    numpy.ndarray
        ``(U,)`` str labels.
    """
    counts = np.asarray(n_interactions, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"n_interactions must be 1-D, got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("n_interactions must be finite and non-negative")
    n_users = counts.size
    order = np.argsort(counts, kind="stable")  # (U,) user at each rank
    rank = np.empty(n_users, dtype=np.intp)
    rank[order] = np.arange(n_users)
    quartile = (4 * rank) // max(n_users, 1)  # (U,) in 0..3
    return np.array(["Q1", "Q2", "Q3", "Q4"])[quartile]


def user_groups(
    features: Mapping[str, npt.ArrayLike], n_interactions: npt.ArrayLike
) -> dict[str, StrArray]:
    """Group labels per user attribute: ``gender``, ``age``, ``occupation`` and ``activity``.

    Parameters
    ----------
    features:
        Attribute name -> ``(U,)`` str values (``''`` = unknown), e.g. built from
        :class:`common.data.types.SideInfo`. Only :data:`ATTRIBUTES` are used; the rest (zip
        code) are ignored. Ages are bucketed with :func:`age_bucket`; gender and occupation are
        taken as they are (whitespace stripped).
    n_interactions:
        ``(U,)`` interaction counts, for the ``activity`` quartiles (:func:`activity_quartiles`).

    Returns
    -------
    dict[str, numpy.ndarray]
        Attribute -> ``(U,)`` str labels; ``''`` marks an unknown value, which
        :func:`group_table` leaves out. ``activity`` is always present.
    """
    activity = activity_quartiles(n_interactions)
    out: dict[str, StrArray] = {}
    for name in ATTRIBUTES:
        if name not in features:
            continue
        values = np.char.strip(np.asarray(features[name], dtype=str))
        if values.shape != activity.shape:
            raise ValueError(
                f"features[{name!r}] has shape {values.shape}, n_interactions {activity.shape}"
            )
        if name == "age":
            unique, inverse = np.unique(values, return_inverse=True)
            buckets = np.array([age_bucket(str(v)) for v in unique] + [""])  # '' keeps '<U' dtype
            values = buckets[inverse.reshape(values.shape)]
        out[name] = values
    out["activity"] = activity
    return out


# --- bootstrap ------------------------------------------------------------------------------


def _check_boot(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not math.isfinite(level) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _boot_means(x: FloatArray, n_boot: int, rng: np.random.Generator) -> FloatArray:
    """``(n_boot,)`` means of resamples of ``x`` with replacement, in memory-bounded chunks."""
    n = x.size
    chunk = max(1, (1 << 22) // max(n, 1))  # at most ~4M indices (32 MB) at a time
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _interval(samples: FloatArray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    values: npt.ArrayLike, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (Efron & Tibshirani 1993, section 13.3).

    Parameters
    ----------
    values:
        1-D values; ``NaN`` (and infinite) entries are ignored.
    n_boot:
        Resamples, >= 1 (default 1000).
    level:
        Coverage in (0, 1) (default 0.95: the 2.5 % and 97.5 % quantiles of the resampled means).
    seed:
        Seed of the resampling generator.

    Returns
    -------
    tuple[float, float]
        ``(lo, hi)``; ``(nan, nan)`` when no value is finite.
    """
    _check_boot(n_boot, level)
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    return _interval(_boot_means(x, n_boot, np.random.default_rng(seed)), level)


def _label_key(label: str) -> tuple[int, float, str]:
    """Table order: age buckets youngest first, then numeric labels by value, then the rest."""
    if label in AGE_BUCKETS:
        return 0, float(AGE_BUCKETS.index(label)), label
    try:
        number = float(label)
    except ValueError:
        return 2, 0.0, label
    return (1, number, label) if math.isfinite(number) else (2, 0.0, label)


def group_order(labels: npt.ArrayLike) -> list[str]:
    """The distinct known labels (not ``''``) in table order: :data:`AGE_BUCKETS` order, then
    numeric labels by value, then alphabetical."""
    return sorted({str(v) for v in np.unique(np.asarray(labels, dtype=str))} - {""}, key=_label_key)


def group_table(
    values: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_users: int = 1,
    gap_min_users: int = 1,
) -> GroupTable:
    """Mean of a per-user metric per group, with bootstrap intervals and the largest gap.

    Groups are every label except ``''`` (unknown) with at least ``min_users`` finite values,
    ordered by :data:`AGE_BUCKETS` position, then numerically (occupation codes), then
    alphabetically (``"F" < "M"``, ``"Q1" < "Q4"``). Each group's interval resamples its own
    users. The gap is ``max mean - min mean`` over the groups of at least ``gap_min_users``
    users (a group of one or two users is listed, but its mean is mostly noise); its interval
    is the percentile interval of the difference of the two groups' resampled means, resampling
    within each group independently (a stratified bootstrap; the group sizes stay fixed).

    Parameters
    ----------
    values:
        ``(U,)`` per-user metric; ``NaN`` (e.g. no held-out item) is left out.
    groups:
        ``(U,)`` str group labels.
    n_boot, level, seed:
        As in :func:`bootstrap_ci`; one generator seeded with ``seed`` serves the groups in
        table order.
    min_users:
        Smallest number of finite values for a group to be reported, >= 1.
    gap_min_users:
        Smallest number of finite values for a group to count in the largest gap, >= 1.

    Returns
    -------
    GroupTable
        ``{"groups": {label: {"n", "mean", "ci"}}, "gap": {"value", "high", "low", "ci"} or
        None}``, plain Python numbers and lists.
    """
    _check_boot(n_boot, level)
    if isinstance(min_users, bool) or int(min_users) != min_users or min_users < 1:
        raise ValueError(f"min_users must be a positive integer, got {min_users!r}")
    x = np.asarray(values, dtype=np.float64)
    labels = np.asarray(groups, dtype=str)
    if x.ndim != 1 or x.shape != labels.shape:
        raise ValueError(f"values {x.shape} and groups {labels.shape} must be equal 1-D shapes")
    finite = np.isfinite(x)
    rng = np.random.default_rng(seed)
    table: dict[str, GroupStats] = {}
    boots: dict[str, FloatArray] = {}
    for label in group_order(labels):
        xg = x[(labels == label) & finite]
        if xg.size < min_users:
            continue
        boots[label] = _boot_means(xg, n_boot, rng)
        lo, hi = _interval(boots[label], level)
        table[label] = {"n": int(xg.size), "mean": float(xg.mean()), "ci": [lo, hi]}
    gap: GapStats | None = None
    names = [g for g, e in table.items() if e["n"] >= gap_min_users]
    if len(names) >= 2:
        means = np.array([table[g]["mean"] for g in names])
        high, low = names[int(np.argmax(means))], names[int(np.argmin(means))]
        lo, hi = _interval(boots[high] - boots[low], level)
        value = table[high]["mean"] - table[low]["mean"]
        gap = {"value": float(value), "high": high, "low": low, "ci": [lo, hi]}
    return {"groups": table, "gap": gap}

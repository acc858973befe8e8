"""Who a recommender serves well, and what it does to the catalogue.

Three families of measurements, all pure numpy on the arrays the evaluation already has:

- **users**: per-user accuracy (:mod:`common.metrics`) summarised per user group (gender, age
  bucket, occupation, activity quartile) with percentile-bootstrap intervals (Efron & Tibshirani
  1993) and the gap between the best- and the worst-served group (:func:`group_table`);
- **items**: catalogue coverage, the Gini coefficient of exposure, the mean popularity of what is
  recommended and the share of long-tail items (Abdollahpouri et al. 2019);
- **genres**: intra-list diversity (Ziegler et al. 2005) and miscalibration, the KL divergence
  between the genre mix of a user's history and of their list (Steck 2018).

List-level functions take ``topk``, ``(B, k)`` item indices best first, and assume every entry is
a real recommendation (no ``-inf``-scored filler; that holds whenever each user has at least
``k`` items left after fold-in masking). :func:`assess` composes everything for one model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from common.metrics import coverage_at_k, ndcg_at_k, recall_at_k, topk_indices

__all__ = [
    "AGE_BUCKETS",
    "ATTRIBUTES",
    "COVERAGE_KS",
    "GAP_MIN_USERS",
    "LIST_K",
    "NDCG_K",
    "RECALL_K",
    "GapStats",
    "GroupStats",
    "GroupTable",
    "activity_quartiles",
    "age_bucket",
    "assess",
    "bootstrap_ci",
    "coverage",
    "exposure_gini",
    "genre_matrix",
    "genre_mix",
    "gini",
    "group_table",
    "intra_list_diversity",
    "long_tail_mask",
    "long_tail_share",
    "mean_popularity",
    "miscalibration",
    "per_user_metrics",
    "user_groups",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
StrArray = npt.NDArray[np.str_]
BoolArray = npt.NDArray[np.bool_]

AGE_BUCKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
"""The ML-1M age buckets (``users.dat`` codes 1, 18, 25, 35, 45, 50, 56), youngest first."""

_AGE_LOWER = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)  # lower bound (years) of AGE_BUCKETS[1:]

LIST_K = 20
"""Length of the list the item- and genre-level metrics of :func:`assess` look at."""

NDCG_K = 100
"""Cut-off of the per-group NDCG in :func:`assess` (Liang et al. 2018 report NDCG@100)."""

RECALL_K = 20
"""Cut-off of the per-group Recall in :func:`assess`."""

COVERAGE_KS = (20, 50, 100)
"""Cut-offs of the catalogue coverage in :func:`assess`."""

ATTRIBUTES = ("gender", "age", "occupation")
"""User attributes :func:`user_groups` takes from the side information when present."""

GAP_MIN_USERS = 10
"""Test users a group needs to count in :func:`assess`'s largest gap (smaller groups are still
listed, with their wide intervals): ML-100K's 100 test users include occupations of one."""


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
    for label in sorted({str(v) for v in np.unique(labels)} - {""}, key=_label_key):
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


# --- items: exposure and popularity ---------------------------------------------------------


def _check_topk(topk: npt.ArrayLike, n_items: int) -> IntArray:
    if n_items <= 0:
        raise ValueError(f"n_items must be > 0, got {n_items}")
    lists = np.asarray(topk)
    if lists.ndim != 2 or not np.issubdtype(lists.dtype, np.integer):
        raise ValueError(
            f"topk must be a 2-D integer array (B, k), got {lists.dtype} {lists.shape}"
        )
    if lists.size and (lists.min() < 0 or lists.max() >= n_items):
        raise ValueError(f"topk holds item indices outside [0, {n_items})")
    return lists


def coverage(topk: npt.ArrayLike, n_items: int) -> float:
    """Catalogue coverage: fraction of the ``n_items`` items in at least one list.

    Equals :func:`common.metrics.coverage_at_k` on the scores the lists came from (when every
    list has ``k`` real items).

    Parameters
    ----------
    topk:
        ``(B, k)`` item indices.
    n_items:
        Catalogue size, > 0.
    """
    lists = _check_topk(topk, n_items)
    seen = np.zeros(n_items, dtype=bool)
    seen[lists.ravel()] = True
    return float(seen.sum()) / n_items


def gini(x: npt.ArrayLike) -> float:
    """Gini coefficient of a non-negative vector: 0 when all equal, ``1 - 1/n`` when one holds all.

    ``G = sum_i (2 i - n - 1) x_(i) / (n sum_i x_i)`` with ``x_(1) <= ... <= x_(n)`` sorted
    ascending and ``i`` from 1 (the sorted-values form of the mean absolute difference,
    Damgaard & Weiner 2000). An all-zero vector is perfectly equal: 0.

    Parameters
    ----------
    x:
        1-D, finite, >= 0, at least one entry.
    """
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("x must have at least one entry")
    if not np.isfinite(v).all() or v[0] < 0:
        raise ValueError("x must be finite and non-negative")
    total = v.sum()
    if total == 0:
        return 0.0
    n = v.size
    weights = 2.0 * np.arange(1, n + 1) - n - 1  # (n,)
    return float(weights @ v / (n * total))


def exposure_gini(topk: npt.ArrayLike, n_items: int) -> float:
    """Gini coefficient of item exposure: how often each catalogue item appears in the lists.

    Items never recommended count with exposure 0, so a model that shows few items scores near 1.

    Parameters
    ----------
    topk:
        ``(B, k)`` item indices.
    n_items:
        Catalogue size, > 0.
    """
    lists = _check_topk(topk, n_items)
    return gini(np.bincount(lists.ravel(), minlength=n_items))


def _popularity(item_counts: npt.ArrayLike, n_users: int) -> FloatArray:
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"item_counts must be 1-D, got shape {counts.shape}")
    if n_users <= 0:
        raise ValueError(f"n_users must be > 0, got {n_users}")
    if not np.isfinite(counts).all() or (counts < 0).any() or (counts > n_users).any():
        raise ValueError(f"item_counts must be finite and in [0, n_users = {n_users}]")
    return counts / n_users


def mean_popularity(topk: npt.ArrayLike, item_counts: npt.ArrayLike, n_users: int) -> float:
    """Average over users of the mean popularity of the items in their list.

    An item's popularity is the fraction of training users who interacted with it,
    ``item_counts / n_users`` in [0, 1] (Abdollahpouri et al. 2019 call the per-list mean
    the average recommendation popularity).

    Parameters
    ----------
    topk:
        ``(B, k)`` item indices, B >= 1.
    item_counts:
        ``(I,)`` number of training users who interacted with each item.
    n_users:
        Number of training users, > 0.
    """
    pop = _popularity(item_counts, n_users)
    lists = _check_topk(topk, pop.size)
    if lists.size == 0:
        raise ValueError("topk is empty")
    return float(pop[lists].mean(axis=1).mean())


def long_tail_mask(item_counts: npt.ArrayLike, *, head_share: float = 0.2) -> BoolArray:
    """Long-tail items: all but the ``round(head_share * I)`` most popular (the head).

    Items are ranked by training count, most popular first, ties broken by item index (lower
    index in the head).

    Parameters
    ----------
    item_counts:
        ``(I,)`` training interaction counts.
    head_share:
        Fraction of the catalogue in the head, in [0, 1] (default 0.2, the 80/20 rule).

    Returns
    -------
    numpy.ndarray
        ``(I,)`` bool, True for long-tail items.
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1 or not np.isfinite(counts).all():
        raise ValueError("item_counts must be a finite 1-D array")
    if not math.isfinite(head_share) or not 0.0 <= head_share <= 1.0:
        raise ValueError(f"head_share must be in [0, 1], got {head_share!r}")
    n_items = counts.size
    n_head = math.floor(head_share * n_items + 0.5)
    order = np.lexsort((np.arange(n_items), -counts))  # most popular first, then by index
    tail = np.ones(n_items, dtype=bool)
    tail[order[:n_head]] = False
    return tail


def long_tail_share(topk: npt.ArrayLike, tail_mask: npt.ArrayLike) -> float:
    """Fraction of recommended slots (all users, all ranks) filled by long-tail items.

    Parameters
    ----------
    topk:
        ``(B, k)`` item indices, not empty.
    tail_mask:
        ``(I,)`` bool from :func:`long_tail_mask`.
    """
    mask = np.asarray(tail_mask, dtype=bool)
    lists = _check_topk(topk, mask.size)
    if lists.size == 0:
        raise ValueError("topk is empty")
    return float(mask[lists].mean())


# --- genres: diversity and calibration ------------------------------------------------------


def genre_matrix(item_genres: Sequence[Sequence[str]]) -> tuple[FloatArray, list[str]]:
    """Item-genre distributions ``p(g|i) = 1 / |genres(i)|`` (Steck 2018, section 2).

    Parameters
    ----------
    item_genres:
        Per item index, its genre names (duplicates and ``''`` ignored; empty: no genre).

    Returns
    -------
    tuple[numpy.ndarray, list[str]]
        ``(I, G)`` float rows summing to 1 (all-zero for an item with no genre), and the ``G``
        genre names in sorted order (the columns).
    """
    sets = [{g for g in gs if g} for gs in item_genres]
    names = sorted(set().union(*sets)) if sets else []
    column = {g: j for j, g in enumerate(names)}
    mat = np.zeros((len(sets), len(names)))
    for i, gs in enumerate(sets):
        for g in gs:
            mat[i, column[g]] = 1.0 / len(gs)
    return mat, names


def _check_genre_mat(genre_mat: npt.ArrayLike) -> FloatArray:
    mat = np.asarray(genre_mat, dtype=np.float64)
    if mat.ndim != 2:
        raise ValueError(f"genre_mat must be 2-D (I, G), got shape {mat.shape}")
    if not np.isfinite(mat).all() or (mat < 0).any():
        raise ValueError("genre_mat must be finite and non-negative")
    return mat


def genre_mix(
    items: sp.spmatrix | sp.sparray | npt.ArrayLike, genre_mat: npt.ArrayLike
) -> FloatArray:
    """Genre distribution of each user's items, ``p(g|u)`` (Steck 2018, eq. 1, uniform weights).

    The average of ``p(g|i)`` over the user's items that have at least one genre, so each row
    sums to 1; a user none of whose items has a genre gets an all-zero row.

    Parameters
    ----------
    items:
        Either a sparse ``(B, I)`` matrix (history; nonzero = interacted, values ignored) or a
        dense ``(B, k)`` integer array of item indices (lists).
    genre_mat:
        ``(I, G)`` from :func:`genre_matrix`.

    Returns
    -------
    numpy.ndarray
        ``(B, G)``.
    """
    mat = _check_genre_mat(genre_mat)
    has_genre = (mat.sum(axis=1) > 0).astype(np.float64)  # (I,)
    if sp.issparse(items):
        seen = sp.csr_matrix(items, dtype=np.float64, copy=True)
        if seen.shape[1] != mat.shape[0]:
            raise ValueError(f"items has {seen.shape[1]} columns, genre_mat {mat.shape[0]} rows")
        seen.data = (seen.data != 0).astype(np.float64)
        total = np.asarray(seen @ mat)  # (B, G)
        count = np.asarray(seen @ has_genre).ravel()  # (B,)
    else:
        lists = _check_topk(np.asarray(items), mat.shape[0])
        total = mat[lists].sum(axis=1)  # (B, G)
        count = has_genre[lists].sum(axis=1)  # (B,)
    out = np.zeros_like(total)
    np.divide(total, count[:, None], out=out, where=count[:, None] > 0)
    return out


def _check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")


def _kl(p: FloatArray, q: FloatArray, alpha: float) -> FloatArray:
    """``sum_g p log(p / q~)`` over the last axis, ``q~ = (1 - alpha) q + alpha p``; 0 log 0 = 0."""
    q_tilde = (1.0 - alpha) * q + alpha * p
    positive = p > 0
    # Where p > 0, q~ >= alpha p > 0: every logarithm is finite.
    ratio = np.where(positive, p, 1.0) / np.where(positive, q_tilde, 1.0)
    return np.asarray((p * np.log(ratio)).sum(axis=-1))


def miscalibration(
    history: sp.spmatrix | sp.sparray,
    topk: npt.ArrayLike,
    genre_mat: npt.ArrayLike,
    *,
    alpha: float = 0.01,
) -> FloatArray:
    """Miscalibration of each list, ``KL(p || q~)`` (Steck 2018, eq. 3-4).

    ``C_KL = sum_g p(g|u) log(p(g|u) / q~(g|u))`` with ``p`` the genre mix of the history,
    ``q`` that of the list (:func:`genre_mix`) and ``q~ = (1 - alpha) q + alpha p``, which keeps
    the divergence finite when the list misses a genre of the history. Genres with ``p = 0``
    contribute 0. A list without any genre has ``q = 0`` and scores ``log(1 / alpha)``.

    Parameters
    ----------
    history:
        ``(B, I)`` sparse, the user's known (fold-in) items.
    topk:
        ``(B, k)`` recommended item indices.
    genre_mat:
        ``(I, G)`` from :func:`genre_matrix`.
    alpha:
        Smoothing in (0, 1] (default 0.01, as in Steck 2018).

    Returns
    -------
    numpy.ndarray
        ``(B,)`` >= 0 (0 = perfectly calibrated); ``NaN`` for a user whose history has no genre.
    """
    _check_alpha(alpha)
    lists = np.asarray(topk)
    if history.shape[0] != lists.shape[0]:
        raise ValueError(f"history has {history.shape[0]} rows, topk {lists.shape[0]}")
    p = genre_mix(history, genre_mat)  # (B, G)
    q = genre_mix(lists, genre_mat)  # (B, G)
    out = np.maximum(_kl(p, q, alpha), 0.0)  # (B,), clip rounding below 0
    out[p.sum(axis=1) == 0] = np.nan
    return out


def intra_list_diversity(topk: npt.ArrayLike, genre_mat: npt.ArrayLike) -> FloatArray:
    """Mean pairwise genre distance within each list (Ziegler et al. 2005, intra-list similarity).

    Distance is ``1 - cos(v_i, v_j)`` of the items' genre vectors, in [0, 1] since genre
    vectors are non-negative. Items without a genre are left out of the pairs (their distance
    is undefined). With unit rows ``V``, the sum of the cosines over pairs ``i < j`` is
    ``(|sum_i v_i|^2 - sum_i |v_i|^2) / 2``.

    Parameters
    ----------
    topk:
        ``(B, k)`` item indices.
    genre_mat:
        ``(I, G)`` from :func:`genre_matrix`.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` in [0, 1] (0: all items share the same genre mix); ``NaN`` for a list with
        fewer than two items that have a genre.
    """
    mat = _check_genre_mat(genre_mat)
    lists = _check_topk(topk, mat.shape[0])
    norms = np.linalg.norm(mat, axis=1)  # (I,)
    unit = np.zeros_like(mat)
    np.divide(mat, norms[:, None], out=unit, where=norms[:, None] > 0)
    vecs = unit[lists]  # (B, k, G)
    n_real = (norms[lists] > 0).sum(axis=1).astype(np.float64)  # (B,) |v| = 1 each
    cos_sum = ((vecs.sum(axis=1) ** 2).sum(axis=1) - n_real) / 2.0  # (B,)
    n_pairs = n_real * (n_real - 1.0) / 2.0
    out = np.full(lists.shape[0], np.nan)
    np.divide(cos_sum, n_pairs, out=out, where=n_pairs > 0)
    return np.clip(1.0 - out, 0.0, 1.0)  # NaN stays NaN


# --- one model, all measurements ------------------------------------------------------------


def _check_assess_inputs(
    scores: FloatArray, heldout: sp.spmatrix | sp.sparray, foldin: sp.spmatrix | sp.sparray
) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (B, n_items), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN; the model has probably diverged")
    for name, m in (("heldout", heldout), ("foldin", foldin)):
        if m.shape != scores.shape:
            raise ValueError(f"{name} has shape {m.shape}, scores have shape {scores.shape}")
    fold = sp.coo_matrix(foldin)
    on_fold = scores[fold.row[fold.data != 0], fold.col[fold.data != 0]]
    if np.isfinite(on_fold).any():
        raise ValueError(
            "scores of fold-in items must be -inf (common.metrics.mask_foldin_inplace)"
        )


def _full_lists(scores: FloatArray, topk: IntArray) -> BoolArray:
    """``(B,)`` True where every item of the user's list has a finite score."""
    rows = np.arange(topk.shape[0])[:, None]  # (B, 1)
    return np.asarray(np.isfinite(scores[rows, topk]).all(axis=1))


def _real_lists(scores: FloatArray, k: int) -> IntArray:
    """Top-``k`` lists of the users with at least ``k`` finite scores, ``(B', k)``."""
    topk = topk_indices(scores, k)  # (B, min(k, I))
    full = _full_lists(scores, topk) & (topk.shape[1] == k)
    if not full.all():
        logger.warning(
            "assess: %d of %d users have fewer than %d candidates; left out of the top-%d "
            "item metrics",
            int((~full).sum()),
            full.size,
            k,
            k,
        )
    return topk[full]


def per_user_metrics(
    scores: FloatArray,
    heldout: sp.spmatrix | sp.sparray,
    foldin: sp.spmatrix | sp.sparray,
    *,
    genre_mat: npt.ArrayLike | None,
    alpha: float = 0.01,
) -> dict[str, FloatArray]:
    """Per-user accuracy and genre metrics of one model, for :func:`group_table`.

    Parameters
    ----------
    scores:
        ``(B, I)`` scores, fold-in items already ``-inf``.
    heldout:
        ``(B, I)`` sparse held-out items.
    foldin:
        ``(B, I)`` sparse fold-in items (the history for miscalibration).
    genre_mat:
        ``(I, G)`` from :func:`genre_matrix`, or ``None`` when items have no genres.
    alpha:
        Miscalibration smoothing, see :func:`miscalibration`.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``"ndcg@100"``, ``"recall@20"`` (``NaN`` without held-out items, as in
        :mod:`common.metrics`), ``"miscalibration@20"`` and ``"diversity@20"`` on the top
        :data:`LIST_K` (all ``NaN`` when ``genre_mat`` is ``None``, ``NaN`` for a user with
        fewer than :data:`LIST_K` candidates), each ``(B,)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    _check_assess_inputs(scores, heldout, foldin)
    n_users = scores.shape[0]
    out: dict[str, FloatArray] = {
        f"ndcg@{NDCG_K}": ndcg_at_k(scores, heldout, NDCG_K),
        f"recall@{RECALL_K}": recall_at_k(scores, heldout, RECALL_K),
        f"miscalibration@{LIST_K}": np.full(n_users, np.nan),
        f"diversity@{LIST_K}": np.full(n_users, np.nan),
    }
    if genre_mat is None or np.asarray(genre_mat).shape[1] == 0:
        return out
    topk = topk_indices(scores, LIST_K)  # (B, <= LIST_K)
    full = _full_lists(scores, topk) & (topk.shape[1] == LIST_K)
    fold = sp.csr_matrix(foldin)
    out[f"miscalibration@{LIST_K}"][full] = miscalibration(
        fold[np.flatnonzero(full)], topk[full], genre_mat, alpha=alpha
    )
    out[f"diversity@{LIST_K}"][full] = intra_list_diversity(topk[full], genre_mat)
    return out


def _nanmean(x: FloatArray) -> float | None:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else None


def assess(
    scores: FloatArray,
    heldout: sp.spmatrix | sp.sparray,
    foldin: sp.spmatrix | sp.sparray,
    *,
    groups: Mapping[str, npt.ArrayLike],
    item_counts: npt.ArrayLike | None,
    n_train_users: int,
    genre_mat: npt.ArrayLike | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.01,
    head_share: float = 0.2,
) -> dict[str, Any]:
    """Fairness, exposure and genre measurements of one model on the held-out users.

    Parameters
    ----------
    scores:
        ``(B, I)`` scores of the held-out users, fold-in items already ``-inf``.
    heldout, foldin:
        ``(B, I)`` sparse held-out and fold-in items of the same users.
    groups:
        Attribute -> ``(B,)`` str labels (:func:`user_groups`), rows aligned with ``scores``.
    item_counts:
        ``(I,)`` number of training users who interacted with each item (popularity and the
        long tail, :func:`long_tail_mask` with ``head_share``); ``None`` when unknown, which
        makes ``popularity@20`` and ``long_tail@20`` ``None``.
    n_train_users:
        Number of training users, > 0 (ignored without ``item_counts``).
    genre_mat:
        ``(I, G)`` from :func:`genre_matrix`, or ``None``.
    n_boot, seed:
        Bootstrap of :func:`group_table`.
    alpha:
        Miscalibration smoothing (:func:`miscalibration`).
    head_share:
        Head of the popularity ranking (:func:`long_tail_mask`).

    Returns
    -------
    dict
        JSON-ready (plain floats, lists, ``None`` for an undefined value)::

            {"users": {"ndcg@100": {attr: GroupTable}, "recall@20": {attr: GroupTable}},
             "items": {"coverage@20", "coverage@50", "coverage@100", "gini@20", "gini@100",
                       "popularity@20", "long_tail@20"},
             "genres": {"diversity@20", "miscalibration@20",
                        "miscalibration_by_group": {attr: GroupTable}} or None}

        Coverage is :func:`common.metrics.coverage_at_k` over all users; the other item
        metrics use the users whose top-k has k real items (all of them, unless a user has
        fewer than k items left after fold-in). Genre means are over users with a defined value.
    """
    scores = np.asarray(scores, dtype=np.float64)
    per_user = per_user_metrics(scores, heldout, foldin, genre_mat=genre_mat, alpha=alpha)
    n_users, n_items = scores.shape
    labels = {name: np.asarray(g, dtype=str) for name, g in groups.items()}
    for name, g in labels.items():
        if g.shape != (n_users,):
            raise ValueError(f"groups[{name!r}] has shape {g.shape}, expected ({n_users},)")
    counts = None if item_counts is None else np.asarray(item_counts, dtype=np.float64)
    if counts is not None and counts.shape != (n_items,):
        raise ValueError(f"item_counts has shape {counts.shape}, expected ({n_items},)")

    def tables(values: FloatArray) -> dict[str, GroupTable]:
        return {
            name: group_table(values, g, n_boot=n_boot, seed=seed, gap_min_users=GAP_MIN_USERS)
            for name, g in labels.items()
        }

    users = {key: tables(per_user[key]) for key in (f"ndcg@{NDCG_K}", f"recall@{RECALL_K}")}

    items: dict[str, float | None] = {
        f"coverage@{k}": coverage_at_k(scores, k) for k in COVERAGE_KS
    }
    top = {k: _real_lists(scores, k) for k in (LIST_K, 100)}
    for k, lists in top.items():
        items[f"gini@{k}"] = exposure_gini(lists, n_items) if lists.size else None
    lists = top[LIST_K]
    items[f"popularity@{LIST_K}"] = items[f"long_tail@{LIST_K}"] = None
    if counts is not None and lists.size:
        tail = long_tail_mask(counts, head_share=head_share)
        items[f"popularity@{LIST_K}"] = mean_popularity(lists, counts, n_train_users)
        items[f"long_tail@{LIST_K}"] = long_tail_share(lists, tail)

    genres: dict[str, Any] | None = None
    if genre_mat is not None and np.asarray(genre_mat).shape[1] > 0:
        mis = per_user[f"miscalibration@{LIST_K}"]
        genres = {
            f"diversity@{LIST_K}": _nanmean(per_user[f"diversity@{LIST_K}"]),
            f"miscalibration@{LIST_K}": _nanmean(mis),
            "miscalibration_by_group": tables(mis),
        }
    logger.debug("assess: %d users, %d items, items=%s", n_users, n_items, items)
    return {"users": users, "items": items, "genres": genres}

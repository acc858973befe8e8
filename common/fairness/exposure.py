"""What a recommender does to the catalogue: exposure and popularity of the recommended items.

Catalogue coverage, the Gini coefficient of exposure, the mean popularity of what is recommended
and the share of long-tail items (Abdollahpouri et al. 2019), pure numpy.

List-level functions take ``topk``, ``(B, k)`` item indices best first, and assume every entry is
a real recommendation (no ``-inf``-scored filler; that holds whenever each user has at least
``k`` items left after fold-in masking).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "coverage",
    "exposure_gini",
    "gini",
    "long_tail_mask",
    "long_tail_share",
    "mean_popularity",
]

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
BoolArray = npt.NDArray[np.bool_]


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

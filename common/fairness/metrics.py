"""Who a recommender serves well, and what it does to the catalogue: one model, all measurements.

:func:`assess` composes three families of measurements, all pure numpy on the arrays the
evaluation already has:

- **users** (:mod:`common.fairness.groups`): per-user accuracy (:mod:`common.metrics`)
  summarised per user group (gender, age bucket, occupation, activity quartile) with
  percentile-bootstrap intervals (Efron & Tibshirani 1993) and the gap between the best- and the
  worst-served group;
- **items** (:mod:`common.fairness.exposure`): catalogue coverage, the Gini coefficient of
  exposure, the mean popularity of what is recommended and the share of long-tail items
  (Abdollahpouri et al. 2019);
- **genres** (:mod:`common.fairness.genres`): intra-list diversity (Ziegler et al. 2005) and
  miscalibration, the KL divergence between the genre mix of a user's history and of their list
  (Steck 2018).

:func:`per_user_metrics` gives the per-user values that the user and genre tables summarise. The
item and genre metrics look at the top-k lists of the users with at least ``k`` items left after
fold-in masking (no ``-inf``-scored filler).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from common.fairness.exposure import exposure_gini, long_tail_mask, long_tail_share, mean_popularity
from common.fairness.genres import intra_list_diversity, miscalibration
from common.fairness.groups import GAP_MIN_USERS, GroupTable, group_table
from common.metrics import coverage_at_k, ndcg_at_k, recall_at_k, topk_indices

__all__ = [
    "COVERAGE_KS",
    "LIST_K",
    "NDCG_K",
    "RECALL_K",
    "assess",
    "per_user_metrics",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]
BoolArray = npt.NDArray[np.bool_]

LIST_K = 20
"""Length of the list the item- and genre-level metrics of :func:`assess` look at."""

NDCG_K = 100
"""Cut-off of the per-group NDCG in :func:`assess` (Liang et al. 2018 report NDCG@100)."""

RECALL_K = 20
"""Cut-off of the per-group Recall in :func:`assess`."""

COVERAGE_KS = (20, 50, 100)
"""Cut-offs of the catalogue coverage in :func:`assess`."""


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
    """Per-user accuracy and genre metrics of one model, for :func:`.groups.group_table`.

    Parameters
    ----------
    scores:
        ``(B, I)`` scores, fold-in items already ``-inf``.
    heldout:
        ``(B, I)`` sparse held-out items.
    foldin:
        ``(B, I)`` sparse fold-in items (the history for miscalibration).
    genre_mat:
        ``(I, G)`` from :func:`~common.fairness.genres.genre_matrix`, or ``None`` when items have
        no genres.
    alpha:
        Miscalibration smoothing, see :func:`~common.fairness.genres.miscalibration`.

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
        Attribute -> ``(B,)`` str labels (:func:`~common.fairness.groups.user_groups`), rows
        aligned with ``scores``.
    item_counts:
        ``(I,)`` number of training users who interacted with each item (popularity and the
        long tail, :func:`~common.fairness.exposure.long_tail_mask` with ``head_share``);
        ``None`` when unknown, which makes ``popularity@20`` and ``long_tail@20`` ``None``.
    n_train_users:
        Number of training users, > 0 (ignored without ``item_counts``).
    genre_mat:
        ``(I, G)`` from :func:`~common.fairness.genres.genre_matrix`, or ``None``.
    n_boot, seed:
        Bootstrap of :func:`~common.fairness.groups.group_table`.
    alpha:
        Miscalibration smoothing (:func:`~common.fairness.genres.miscalibration`).
    head_share:
        Head of the popularity ranking (:func:`~common.fairness.exposure.long_tail_mask`).

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

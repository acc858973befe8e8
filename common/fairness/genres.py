"""Genre diversity and calibration of recommended lists.

Intra-list diversity (Ziegler et al. 2005) and miscalibration, the KL divergence between the
genre mix of a user's history and of their list (Steck 2018), both on the item-genre
distributions of :func:`genre_matrix`; pure numpy and scipy.

List-level functions take ``topk``, ``(B, k)`` item indices best first, and assume every entry is
a real recommendation (no ``-inf``-scored filler; that holds whenever each user has at least
``k`` items left after fold-in masking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from common.fairness.exposure import _check_topk

__all__ = [
    "genre_matrix",
    "genre_mix",
    "intra_list_diversity",
    "miscalibration",
]

FloatArray = npt.NDArray[np.floating]


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

"""Re-ranking a user's candidates for genre diversity (MMR) or calibration (Steck 2018).

Both re-rankers take the ``candidates`` best-scored items of a user and build a list of ``k``
of them greedily, one item per step, trading relevance against a genre objective with ``lam``:

- :func:`mmr_rerank`: maximal marginal relevance (Carbonell & Goldstein 1998, eq. 1), which
  penalises an item's largest genre similarity to what is already in the list;
- :func:`calibrated_rerank`: Steck 2018, section 3, which penalises the KL divergence between
  the genre mix of the user's history and that of the list so far.

Relevance is the candidates' scores min-max normalised to [0, 1] within the user (the best
candidate 1, the worst 0), for both: it needs no assumption about what the scores are (Mult-VAE
logits, EASE scores, popularity counts) and puts relevance and the genre terms on comparable
scales. Ties are broken towards the better-scored candidate, so each re-ranker reproduces the
plain top-k at its pure-relevance end (``lam = 1`` for MMR, ``lam = 0`` for calibration).

The greedy steps are vectorised over candidates and over users: :func:`rerank_batch` re-ranks a
whole batch in ``k`` numpy steps, and :func:`tradeoff_curve` traces accuracy against
calibration and diversity over a grid of ``lam``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from common.fairness.genres import genre_mix, intra_list_diversity, miscalibration
from common.fairness.metrics import LIST_K
from common.metrics import ndcg_at_k, topk_indices

__all__ = [
    "RerankKind",
    "calibrated_rerank",
    "mmr_rerank",
    "rerank_batch",
    "tradeoff_curve",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

_FILLER = np.finfo(np.float64).min
"""Gain of a ``-inf``-scored candidate: below every real one, above the already chosen."""


class RerankKind(StrEnum):
    """Which re-ranker :func:`rerank_batch` applies."""

    DIVERSITY = "diversity"
    """Maximal marginal relevance over genres (:func:`mmr_rerank`)."""
    CALIBRATED = "calibrated"
    """Calibrated recommendations (:func:`calibrated_rerank`)."""


# --- checks and candidate pools -------------------------------------------------------------


def _check(k: int, lam: float, candidates: int, n_items: int) -> int:
    """Validate the common parameters; the candidate pool size ``min(candidates, n_items)``."""
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not math.isfinite(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if isinstance(candidates, bool) or int(candidates) != candidates or candidates < k:
        raise ValueError(f"candidates must be an integer >= k = {k}, got {candidates!r}")
    if k > n_items:
        raise ValueError(f"k = {k} exceeds the {n_items} items")
    return min(int(candidates), n_items)


def _check_scores(scores: FloatArray) -> FloatArray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (B, n_items), got shape {s.shape}")
    if np.isnan(s).any() or np.isposinf(s).any():
        raise ValueError("scores must be finite or -inf (fold-in items); found NaN or +inf")
    return s


def _check_genres(genre_mat: npt.ArrayLike, n_items: int) -> FloatArray:
    mat = np.asarray(genre_mat, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != n_items:
        raise ValueError(f"genre_mat must be (n_items = {n_items}, G), got shape {mat.shape}")
    if not np.isfinite(mat).all() or (mat < 0).any():
        raise ValueError("genre_mat must be finite and non-negative")
    return mat


def _one_user(scores: npt.ArrayLike) -> FloatArray:
    """A 1-D score vector as a checked ``(1, I)`` batch."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (n_items,), got shape {s.shape}")
    return _check_scores(s[None, :])


def _pool(scores: FloatArray, size: int) -> tuple[IntArray, BoolArray, FloatArray]:
    """The ``size`` best items per user, whether each is a real candidate, and its relevance.

    Returns ``pool (B, C)`` best first (as :func:`common.metrics.topk_indices`), ``valid
    (B, C)`` (finite score) and ``rel (B, C)``: scores min-max normalised over the valid
    candidates (all 1 when they tie; 0 for invalid ones).
    """
    pool = topk_indices(scores, size)  # (B, C)
    rows = np.arange(scores.shape[0])[:, None]  # (B, 1)
    s = scores[rows, pool]  # (B, C), non-increasing along C
    valid = np.isfinite(s)
    lo = np.where(valid, s, np.inf).min(axis=1, keepdims=True)  # (B, 1)
    hi = np.where(valid, s, -np.inf).max(axis=1, keepdims=True)  # (B, 1)
    span = hi - lo
    rel = np.ones_like(s)
    np.divide(s - lo, span, out=rel, where=valid & (span > 0))
    rel[~valid] = 0.0
    return pool, valid, rel


def _pick(gain: FloatArray, valid: BoolArray, taken: BoolArray) -> IntArray:
    """Per row, the best not-yet-taken candidate; ``-inf`` ones only once the real run out.

    ``argmax`` returns the first maximum, i.e. the better-scored candidate on a tie.
    """
    g = np.where(valid, gain, _FILLER)
    g[taken] = -np.inf
    return np.asarray(np.argmax(g, axis=1))


def _unit_rows(mat: FloatArray) -> FloatArray:
    """Rows scaled to unit length; all-zero rows (no genre) stay zero (cosine 0 with all)."""
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    unit = np.zeros_like(mat)
    np.divide(mat, norms, out=unit, where=norms > 0)
    return unit


# --- the two greedy re-rankers, batched -----------------------------------------------------


def _mmr(scores: FloatArray, genre_mat: FloatArray, k: int, lam: float, size: int) -> IntArray:
    """MMR (Carbonell & Goldstein 1998) for a batch: ``(B, k)`` item indices."""
    pool, valid, rel = _pool(scores, size)
    n_users = scores.shape[0]
    rows = np.arange(n_users)
    vecs = _unit_rows(genre_mat)[pool]  # (B, C, G)
    max_sim = np.zeros(rel.shape)  # (B, C), max cosine to the chosen items
    taken = np.zeros(rel.shape, dtype=bool)
    out = np.empty((n_users, k), dtype=np.intp)
    for step in range(k):
        gain = lam * rel - (1.0 - lam) * max_sim  # (B, C)
        pick = _pick(gain, valid, taken)  # (B,)
        out[:, step] = pick
        taken[rows, pick] = True
        if lam < 1.0:
            sim = np.einsum("bcg,bg->bc", vecs, vecs[rows, pick])  # (B, C)
            np.maximum(max_sim, sim, out=max_sim)
    return pool[rows[:, None], out]


def _calibrated(
    scores: FloatArray,
    history_mix: FloatArray,
    genre_mat: FloatArray,
    k: int,
    lam: float,
    alpha: float,
    size: int,
) -> IntArray:
    """Steck 2018 section 3 greedy for a batch: ``(B, k)`` item indices.

    The gain of adding candidate ``i`` to the list ``S`` is ``(1 - lam) rel(i) - lam
    KL(p || q~(S + i))``: the sum of relevance over ``S`` is the same for every candidate, so
    maximising the gain maximises Steck's objective one item at a time. ``q(S + i)`` is the genre
    mix of the list (:func:`common.fairness.genres.genre_mix`: the mean ``p(g|j)`` over its
    items with a genre), kept as a running genre sum and count.
    """
    pool, valid, rel = _pool(scores, size)
    n_users = scores.shape[0]
    rows = np.arange(n_users)
    p = history_mix  # (B, G)
    item_genres = genre_mat[pool]  # (B, C, G)
    has_genre = (item_genres.sum(axis=2) > 0).astype(np.float64)  # (B, C)
    positive = p > 0  # (B, G)
    p_log_p = np.where(positive, p * np.log(np.where(positive, p, 1.0)), 0.0).sum(axis=1)  # (B,)
    p_c = p[:, None, :]  # (B, 1, G)
    safe = ~positive[:, None, :]  # (B, 1, G): where log(q~) is not needed
    genre_sum = np.zeros(p.shape)  # (B, G), sum of p(g|j) over the chosen j
    count = np.zeros(n_users)  # (B,), chosen items with a genre
    taken = np.zeros(rel.shape, dtype=bool)
    out = np.empty((n_users, k), dtype=np.intp)
    for step in range(k):
        gain = (1.0 - lam) * rel  # (B, C)
        if lam > 0.0:
            n = count[:, None] + has_genre  # (B, C)
            q = (genre_sum[:, None, :] + item_genres) / np.maximum(n, 1.0)[:, :, None]  # (B, C, G)
            q_tilde = (1.0 - alpha) * q + alpha * p_c  # > 0 wherever p > 0
            cross = (p_c * np.log(np.where(safe, 1.0, q_tilde))).sum(axis=2)  # (B, C)
            gain = gain - lam * (p_log_p[:, None] - cross)
        pick = _pick(gain, valid, taken)  # (B,)
        out[:, step] = pick
        taken[rows, pick] = True
        genre_sum += item_genres[rows, pick]
        count += has_genre[rows, pick]
    return pool[rows[:, None], out]


# --- public API -----------------------------------------------------------------------------


def mmr_rerank(
    scores: npt.ArrayLike,
    genre_mat: npt.ArrayLike,
    *,
    k: int,
    lam: float,
    candidates: int = 100,
) -> IntArray:
    """Diversify one user's list by maximal marginal relevance over genres.

    Carbonell & Goldstein 1998, eq. 1: from the ``candidates`` best-scored items, pick greedily
    ``argmax_i lam * rel(i) - (1 - lam) * max_{j in S} sim(i, j)``, where ``rel`` is the score
    min-max normalised over the candidates and ``sim`` the cosine of the genre vectors (0 for an
    item without genres, which therefore counts as unlike everything).

    Parameters
    ----------
    scores:
        ``(I,)``, higher is better; ``-inf`` for items not to recommend (fold-in). They are
        never chosen while a finite-scored candidate is left.
    genre_mat:
        ``(I, G)`` item-genre rows (:func:`common.fairness.genres.genre_matrix`).
    k:
        List length, 1 <= k <= I.
    lam:
        Relevance weight in [0, 1]; 1 gives the plain top-k, 0 the most diverse list that
        starts from the best item.
    candidates:
        Pool size, >= k (default 100; capped at I).

    Returns
    -------
    numpy.ndarray
        ``(k,)`` item indices, in the order chosen.
    """
    s = _one_user(scores)
    size = _check(k, lam, candidates, s.shape[1])
    return _mmr(s, _check_genres(genre_mat, s.shape[1]), int(k), float(lam), size)[0]


def calibrated_rerank(
    scores: npt.ArrayLike,
    history_mix: npt.ArrayLike,
    genre_mat: npt.ArrayLike,
    *,
    k: int,
    lam: float,
    alpha: float = 0.01,
    candidates: int = 100,
) -> IntArray:
    """Calibrate one user's list to the genre mix of their history (Steck 2018, section 3).

    Greedily maximises ``(1 - lam) * sum_{i in S} rel(i) - lam * KL(p || q~(S))`` one item at a
    time over the ``candidates`` best-scored items, with ``q~ = (1 - alpha) q + alpha p`` as in
    :func:`common.fairness.genres.miscalibration`. Steck weighs relevance by the predicted
    probability; here ``rel`` is the score min-max normalised over the candidates (see the
    module docstring), so relevance per item is in [0, 1] whatever the model.

    Parameters
    ----------
    scores:
        ``(I,)``, higher is better; ``-inf`` for items not to recommend.
    history_mix:
        ``(G,)`` genre distribution ``p(g|u)`` of the user's history
        (:func:`common.fairness.genres.genre_mix`); all zeros gives the plain top-k.
    genre_mat:
        ``(I, G)`` item-genre rows.
    k:
        List length, 1 <= k <= I.
    lam:
        Calibration weight in [0, 1]; 0 gives the plain top-k.
    alpha:
        KL smoothing in (0, 1] (default 0.01).
    candidates:
        Pool size, >= k (default 100; capped at I).

    Returns
    -------
    numpy.ndarray
        ``(k,)`` item indices, in the order chosen.
    """
    s = _one_user(scores)
    size = _check(k, lam, candidates, s.shape[1])
    _check_alpha(alpha)
    mat = _check_genres(genre_mat, s.shape[1])
    p = np.asarray(history_mix, dtype=np.float64)
    if p.shape != (mat.shape[1],) or not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"history_mix must be (G = {mat.shape[1]},), finite and non-negative")
    return _calibrated(s, p[None, :], mat, int(k), float(lam), float(alpha), size)[0]


def _check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")


def rerank_batch(
    kind: RerankKind | str,
    scores: FloatArray,
    history: sp.spmatrix | sp.sparray | None,
    genre_mat: npt.ArrayLike,
    *,
    k: int,
    lam: float,
    candidates: int = 100,
    alpha: float = 0.01,
) -> IntArray:
    """Re-rank every user of a batch with :func:`mmr_rerank` or :func:`calibrated_rerank`.

    Same result row by row as the one-user functions, computed in ``k`` vectorised steps.

    Parameters
    ----------
    kind:
        :class:`RerankKind` or its value, ``"diversity"`` or ``"calibrated"``.
    scores:
        ``(B, I)``, fold-in items ``-inf``.
    history:
        ``(B, I)`` sparse history (fold-in) whose genre mix the calibrated lists match;
        unused (may be ``None``) for ``"diversity"``.
    genre_mat:
        ``(I, G)`` item-genre rows.
    k, lam, candidates, alpha:
        As in the one-user functions.

    Returns
    -------
    numpy.ndarray
        ``(B, k)`` item indices.
    """
    which = RerankKind(kind)
    s = _check_scores(scores)
    size = _check(k, lam, candidates, s.shape[1])
    mat = _check_genres(genre_mat, s.shape[1])
    if which is RerankKind.DIVERSITY:
        return _mmr(s, mat, int(k), float(lam), size)
    _check_alpha(alpha)
    if history is None or history.shape != s.shape:
        shape = None if history is None else history.shape
        raise ValueError(f"history must be sparse of shape {s.shape}, got {shape}")
    p = genre_mix(history, mat)  # (B, G)
    return _calibrated(s, p, mat, int(k), float(lam), float(alpha), size)


def _list_scores(lists: IntArray, n_items: int) -> FloatArray:
    """Scores that rank each row's ``lists`` first, in order: ``k, k-1, .., 1``, else ``-inf``."""
    n_users, k = lists.shape
    out = np.full((n_users, n_items), -np.inf)
    out[np.arange(n_users)[:, None], lists] = np.arange(k, 0, -1, dtype=np.float64)
    return out


def _fill(shown: IntArray, scores: FloatArray, k: int) -> IntArray:
    """``shown`` ``(B, m)`` followed by each user's best other items by score, ``(B, k)``."""
    if shown.shape[1] >= k:
        return shown[:, :k]
    rest_scores = scores.copy()
    rest_scores[np.arange(shown.shape[0])[:, None], shown] = -np.inf
    rest = topk_indices(rest_scores, k - shown.shape[1])
    return np.concatenate([shown, rest], axis=1)


def _nanmean(x: FloatArray) -> float | None:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else None


def tradeoff_curve(
    kind: RerankKind | str,
    scores: FloatArray,
    heldout: sp.spmatrix | sp.sparray,
    history: sp.spmatrix | sp.sparray,
    genre_mat: npt.ArrayLike,
    *,
    lams: Sequence[float],
    k: int = 100,
    candidates: int = 200,
    alpha: float = 0.01,
) -> list[dict[str, float | None]]:
    """Accuracy against calibration and diversity of a re-ranker over a grid of ``lam``.

    For each ``lam``, the top ``candidates`` of every user are re-ranked into the list a user is
    shown, its first :data:`~common.fairness.metrics.LIST_K` items (:func:`rerank_batch`); the
    rest of the ``k`` follow in score order (all of a catalogue smaller than ``k``). NDCG@k is
    measured on the whole ranking (so ``k = 100`` gives the NDCG@100 of Liang et al. 2018) and
    on the shown list, miscalibration and intra-list diversity on its first
    :data:`~common.fairness.metrics.LIST_K` items (or all ``k`` if fewer). Each value is the
    mean over the users for which it is defined.

    Parameters
    ----------
    kind:
        ``"diversity"`` or ``"calibrated"``.
    scores:
        ``(B, I)``, fold-in items ``-inf``.
    heldout:
        ``(B, I)`` sparse held-out items.
    history:
        ``(B, I)`` sparse fold-in items (the genre mix to calibrate to and to measure against).
    genre_mat:
        ``(I, G)`` item-genre rows.
    lams:
        Values of ``lam`` in [0, 1], in the order reported.
    k, candidates, alpha:
        As in :func:`rerank_batch` (defaults 100, 200, 0.01).

    Returns
    -------
    list[dict]
        One ``{"lam", "ndcg@100", "ndcg@20", "miscalibration@20", "diversity@20"}`` per ``lam``
        (keys follow ``k``), plain floats; ``None`` where no user has a defined value.
    """
    s = _check_scores(scores)
    if heldout.shape != s.shape or history.shape != s.shape:
        raise ValueError(
            f"heldout {heldout.shape} and history {history.shape} must match scores {s.shape}"
        )
    head = min(LIST_K, int(k))
    # A catalogue smaller than k: the lists rank all of it (NDCG@k of a shorter list).
    k_list = min(int(k), s.shape[1])
    top = min(head, k_list)
    pool = min(max(int(candidates), top), s.shape[1])
    curve: list[dict[str, float | None]] = []
    for lam in lams:
        start = time.perf_counter()
        shown = rerank_batch(
            kind, s, history, genre_mat, k=top, lam=lam, candidates=pool, alpha=alpha
        )
        lists = _fill(shown, s, k_list)
        ranked = _list_scores(lists, s.shape[1])
        point: dict[str, float | None] = {
            "lam": float(lam),
            f"ndcg@{k}": _nanmean(ndcg_at_k(ranked, heldout, k)),
            f"ndcg@{head}": _nanmean(ndcg_at_k(ranked, heldout, head)),
            f"miscalibration@{head}": _nanmean(
                miscalibration(history, lists[:, :head], genre_mat, alpha=alpha)
            ),
            f"diversity@{head}": _nanmean(intra_list_diversity(lists[:, :head], genre_mat)),
        }
        curve.append(point)
        logger.info(
            "tradeoff_curve %s lam=%.3f: %s (%.2f s)",
            RerankKind(kind).value,
            lam,
            point,
            time.perf_counter() - start,
        )
    return curve

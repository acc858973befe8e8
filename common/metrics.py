"""Top-k ranking metrics of the strong-generalisation protocol (Liang et al. 2018, section 4.2).

The formulas are those of the ``vae_cf`` reference notebook (``NDCG_binary_at_k_batch`` and
``Recall_at_k_batch``), with two deliberate differences:

- a user with no held-out item gets ``NaN`` (the reference divides 0 by 0 with a warning);
  :func:`evaluate` averages with ``nanmean``, i.e. over users with at least one held-out item;
- held-out matrices are binarised (``> 0``) first; the reference assumes they already are.

Scores of folded-in items must be ``-inf`` before ranking (the caller does it, or uses
:func:`mask_foldin_inplace`; :func:`evaluate` does it itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

__all__ = [
    "coverage_at_k",
    "evaluate",
    "mask_foldin_inplace",
    "ndcg_at_k",
    "recall_at_k",
    "topk_indices",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.floating]
ScoreFn = Callable[[sp.csr_matrix], FloatArray]


def _check_k(k: int) -> None:
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_scores(scores: FloatArray) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (B, n_items), got shape {scores.shape}")


def _binary_csr(m: sp.spmatrix | sp.sparray, shape: tuple[int, ...]) -> sp.csr_matrix:
    """``m > 0`` as a CSR matrix of ones without stored zeros, checked against ``shape``."""
    if m.shape != shape:
        raise ValueError(f"heldout has shape {m.shape}, scores have shape {shape}")
    out = sp.csr_matrix(m, dtype=np.float64, copy=True)
    out.data = (out.data > 0).astype(np.float64)
    out.eliminate_zeros()
    return out


def topk_indices(scores: FloatArray, k: int) -> npt.NDArray[np.intp]:
    """Item indices of each row's ``k`` highest scores, best first, ``(B, min(k, n_items))``.

    ``np.argpartition`` selects the top ``k`` in O(n_items), then only those are sorted (as the
    reference does with ``bn.argpartition``). Ties are broken arbitrarily.
    """
    _check_scores(scores)
    _check_k(k)
    n_users, n_items = scores.shape
    kk = min(k, n_items)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # (B, kk), unordered
    rows = np.arange(n_users)[:, None]  # (B, 1)
    order = np.argsort(-scores[rows, part], axis=1, kind="stable")  # (B, kk)
    return part[rows, order]  # (B, kk)


def _discounts(k: int) -> FloatArray:
    return 1.0 / np.log2(np.arange(2, k + 2))  # (k,), 1 / log2(rank + 2) for rank 0..k-1


def _ndcg_from_topk(topk: npt.NDArray[np.intp], heldout: sp.csr_matrix, k: int) -> FloatArray:
    rows = np.arange(topk.shape[0])[:, None]  # (B, 1)
    hits = np.asarray(heldout[rows, topk[:, :k]].toarray())  # (B, k)
    tp = _discounts(k)  # (k,)
    dcg = (hits * tp[: hits.shape[1]]).sum(axis=1)  # (B,)
    n_heldout = heldout.getnnz(axis=1)  # (B,)
    cum = np.concatenate([[0.0], np.cumsum(tp)])  # cum[n] = sum of the first n discounts
    idcg = cum[np.minimum(n_heldout, k)]  # (B,)
    out = np.full(dcg.shape, np.nan)
    np.divide(dcg, idcg, out=out, where=n_heldout > 0)
    return out


def _recall_from_topk(topk: npt.NDArray[np.intp], heldout: sp.csr_matrix, k: int) -> FloatArray:
    rows = np.arange(topk.shape[0])[:, None]  # (B, 1)
    hits = np.asarray(heldout[rows, topk[:, :k]].toarray()).sum(axis=1)  # (B,)
    n_heldout = heldout.getnnz(axis=1)  # (B,)
    out = np.full(hits.shape, np.nan)
    np.divide(hits, np.minimum(k, n_heldout), out=out, where=n_heldout > 0)
    return out


def ndcg_at_k(scores: FloatArray, heldout: sp.spmatrix | sp.sparray, k: int) -> FloatArray:
    """Binary NDCG@k per user, Liang et al. 2018 section 4.2 (reference NDCG_binary_at_k_batch).

    ``DCG = sum_{r<k} 1[item at rank r is held out] / log2(r + 2)``, divided by the ideal
    ``IDCG = sum_{r < min(k, n_heldout)} 1 / log2(r + 2)``.

    Parameters
    ----------
    scores:
        ``(B, n_items)``, higher is better; fold-in items already ``-inf``.
    heldout:
        ``(B, n_items)`` sparse, nonzero where the item is held out.
    k:
        Cut-off, > 0.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` in [0, 1]; ``NaN`` for users with no held-out item.
    """
    held = _binary_csr(heldout, scores.shape)
    return _ndcg_from_topk(topk_indices(scores, k), held, k)


def recall_at_k(scores: FloatArray, heldout: sp.spmatrix | sp.sparray, k: int) -> FloatArray:
    """Recall@k per user, Liang et al. 2018 section 4.2, eq. of Recall@R (reference
    Recall_at_k_batch): hits in the top ``k`` divided by ``min(k, n_heldout)``.

    Returns ``(B,)`` in [0, 1]; ``NaN`` for users with no held-out item. Parameters as in
    :func:`ndcg_at_k`.
    """
    held = _binary_csr(heldout, scores.shape)
    return _recall_from_topk(topk_indices(scores, k), held, k)


def _covered(topk: npt.NDArray[np.intp], scores: FloatArray, n_items: int) -> npt.NDArray[np.bool_]:
    rows = np.arange(topk.shape[0])[:, None]  # (B, 1)
    # A -inf item only fills the list of a user with fewer than k candidates; not a recommendation.
    real = scores[rows, topk] > -np.inf  # (B, k)
    seen = np.zeros(n_items, dtype=bool)
    seen[topk[real]] = True
    return seen


def coverage_at_k(scores: FloatArray, k: int, n_items: int | None = None) -> float:
    """Catalogue coverage@k: fraction of the ``n_items`` items in at least one user's top ``k``.

    Items scored ``-inf`` (folded in) never count, even when they fill a short list.

    Parameters
    ----------
    scores:
        ``(B, n_items)``, fold-in items ``-inf``.
    k:
        Cut-off, > 0.
    n_items:
        Catalogue size; default ``scores.shape[1]``.
    """
    _check_scores(scores)
    n = scores.shape[1] if n_items is None else n_items
    if n <= 0 or n < scores.shape[1]:
        raise ValueError(f"n_items must be >= scores.shape[1] = {scores.shape[1]}, got {n}")
    seen = _covered(topk_indices(scores, k), scores, scores.shape[1])
    return float(seen.sum()) / n


def mask_foldin_inplace(scores: FloatArray, foldin: sp.spmatrix | sp.sparray) -> None:
    """Set ``scores[u, i] = -inf`` wherever ``foldin[u, i] != 0`` (Liang et al. 2018 sec. 4.2).

    Items the user has already interacted with are not recommended again.
    """
    _check_scores(scores)
    if foldin.shape != scores.shape:
        raise ValueError(f"foldin has shape {foldin.shape}, scores have shape {scores.shape}")
    f = sp.csr_matrix(foldin, copy=True)
    f.eliminate_zeros()
    rows = np.repeat(np.arange(f.shape[0]), np.diff(f.indptr))  # (nnz,)
    scores[rows, f.indices] = -np.inf


def evaluate(
    score_fn: ScoreFn,
    foldin: sp.spmatrix | sp.sparray,
    heldout: sp.spmatrix | sp.sparray,
    *,
    ks: Sequence[int] = (20, 50, 100),
    batch_size: int = 1000,
) -> dict[str, float]:
    """Score held-out users in batches and average NDCG@k, Recall@k and coverage@k.

    For each batch of users, ``score_fn(foldin_batch)`` returns ``(B, n_items)`` scores; fold-in
    items are masked to ``-inf`` and the held-out items ranked (strong generalisation, Liang et
    al. 2018 section 4.2).

    Parameters
    ----------
    score_fn:
        Maps a CSR fold-in batch ``(B, n_items)`` to a dense ``(B, n_items)`` score array.
    foldin, heldout:
        ``(n_users, n_items)`` sparse matrices of the same shape.
    ks:
        Cut-offs; each gives ``ndcg@k``, ``recall@k`` and ``coverage@k``.
    batch_size:
        Users per ``score_fn`` call, > 0.

    Returns
    -------
    dict[str, float]
        ``"ndcg@k"`` and ``"recall@k"``: means over users with at least one held-out item;
        ``"coverage@k"``: over all users; ``"n_users"``: the number of users averaged over.

    Raises
    ------
    ValueError
        On mismatched shapes, bad ``ks`` / ``batch_size``, or no user with a held-out item.
    """
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    for k in ks:
        _check_k(k)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if foldin.shape != heldout.shape:
        raise ValueError(f"foldin shape {foldin.shape} != heldout shape {heldout.shape}")
    fold = sp.csr_matrix(foldin)
    held = _binary_csr(heldout, fold.shape)
    n_users, n_items = fold.shape
    k_max = max(ks)
    ndcg: dict[int, list[FloatArray]] = {k: [] for k in ks}
    recall: dict[int, list[FloatArray]] = {k: [] for k in ks}
    covered = {k: np.zeros(n_items, dtype=bool) for k in ks}
    for start in range(0, n_users, batch_size):
        stop = min(start + batch_size, n_users)
        raw = score_fn(fold[start:stop])
        # A copy: score_fn may return a read-only or shared array.
        scores = np.array(raw, dtype=np.float64)  # (B, I)
        if scores.shape != (stop - start, n_items):
            raise ValueError(
                f"score_fn returned shape {scores.shape}, expected {(stop - start, n_items)}"
            )
        if np.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores; the model has probably diverged")
        mask_foldin_inplace(scores, fold[start:stop])
        topk = topk_indices(scores, k_max)  # (B, k_max), sorted prefix serves every k
        held_b = held[start:stop]
        for k in ks:
            ndcg[k].append(_ndcg_from_topk(topk, held_b, k))
            recall[k].append(_recall_from_topk(topk, held_b, k))
            covered[k] |= _covered(topk[:, :k], scores, n_items)
    n_valid = int((held.getnnz(axis=1) > 0).sum())
    if n_valid == 0:
        raise ValueError("heldout has no user with a held-out item; nothing to evaluate")
    out: dict[str, float] = {}
    for k in sorted(ks):
        out[f"ndcg@{k}"] = float(np.nanmean(np.concatenate(ndcg[k])))
        out[f"recall@{k}"] = float(np.nanmean(np.concatenate(recall[k])))
        out[f"coverage@{k}"] = float(covered[k].sum()) / n_items
    out["n_users"] = float(n_valid)
    logger.debug("evaluate: %d users with held-out items, %s", n_valid, out)
    return out

"""Turn raw interaction rows into a binary user x item matrix, counting what is removed.

Implements the preprocessing of Liang et al. 2018 ("Variational Autoencoders for Collaborative
Filtering", section 4.1): ratings >= 4 are positives (binarization) and only users with at least
5 positives are kept. Before that, rows with an unusable rating are dropped and repeated
(user, item) pairs collapse to their latest row.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from common.data.types import CleaningReport, RawInteractions
from common.errors import DataError

__all__ = ["CleanMatrix", "clean"]

logger = logging.getLogger(__name__)

_DENSE_ID_FACTOR = 8  # integer ids up to 8x the row count are indexed by a lookup table


@dataclass(frozen=True)
class CleanMatrix:
    """The outcome of :func:`clean`."""

    user_ids: np.ndarray
    """``(U,)`` str original user ids, one per matrix row."""
    item_ids: np.ndarray
    """``(I,)`` str original item ids, one per matrix column."""
    matrix: sp.csr_matrix
    """``(U, I)`` float32 binary positives."""
    report: CleaningReport


def _encode(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids in sorted order and each row's index into them: ``(K,)``, ``(N,)`` int64.

    Non-negative integer ids that are not too sparse use a lookup table: O(N), no sort.
    """
    if ids.dtype == np.int64 and ids.size and int(ids.max()) <= _DENSE_ID_FACTOR * ids.size:
        present = np.zeros(int(ids.max()) + 1, dtype=bool)
        present[ids] = True
        uniques = np.flatnonzero(present)
        lookup = np.cumsum(present, dtype=np.int64) - 1  # id -> rank among present ids
        return uniques, lookup[ids]
    uniques, inverse = np.unique(ids, return_inverse=True)
    return uniques, inverse.astype(np.int64).reshape(-1)


def _latest_per_pair(keys: np.ndarray, timestamps: np.ndarray | None) -> np.ndarray:
    """Sorted indices of the row kept for each distinct key.

    The kept row has the largest timestamp (missing = oldest); ties and files without
    timestamps keep the last row, as a later line overrides an earlier one.
    """
    order = np.argsort(keys, kind="stable")  # equal keys stay in file order
    sorted_keys = keys[order]
    last = np.ones(keys.size, dtype=bool)
    last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    if last.all():
        return np.arange(keys.size)
    if timestamps is not None:
        ts = np.where(np.isnan(timestamps), -np.inf, timestamps)
        # Same key order (keys are the primary sort key), so ``last`` still marks group ends.
        order = np.lexsort((np.arange(keys.size), ts, keys))
    return np.sort(order[last])


def clean(
    raw: RawInteractions, *, min_rating: float | None, min_user_positives: int
) -> CleanMatrix:
    """Drop invalid ratings, collapse duplicates, binarize, and drop users with few positives.

    Parameters
    ----------
    raw:
        Rows as read from the interaction file.
    min_rating:
        A row is a positive if its rating is ``>= min_rating``. Ignored (every row is a
        positive) when the file has no rating column; must be finite otherwise.
    min_user_positives:
        Users with fewer positives are removed (Liang et al. 2018 use 5); at least 1.

    Returns
    -------
    CleanMatrix
        Users and items that keep at least one positive, sorted by id (numerically for integer
        ids), the binary matrix and the :class:`CleaningReport`.

    Raises
    ------
    ValueError
        If ``min_rating`` is not finite or ``min_user_positives`` < 1.
    DataError
        If no positive survives cleaning.
    """
    if raw.ratings is not None and (min_rating is None or not math.isfinite(min_rating)):
        raise ValueError(f"min_rating must be a finite number, got {min_rating!r}")
    if min_user_positives < 1:
        raise ValueError(f"min_user_positives must be >= 1, got {min_user_positives}")
    n_rows = raw.n_rows
    user_uniques, user_codes = _encode(raw.users)
    item_uniques, item_codes = _encode(raw.items)
    ratings, timestamps = raw.ratings, raw.timestamps

    rows = np.arange(n_rows)
    invalid = 0
    if ratings is not None:
        valid = ~np.isnan(ratings)
        invalid = int(n_rows - valid.sum())
        rows = rows[valid]
    keys = user_codes[rows] * np.int64(item_uniques.size) + item_codes[rows]  # (n,) pair key
    kept = _latest_per_pair(keys, None if timestamps is None else timestamps[rows])
    rows = rows[kept]
    duplicates = int(keys.size - kept.size)

    below = 0
    if ratings is not None:
        assert min_rating is not None
        positive = ratings[rows] >= min_rating
        below = int(rows.size - positive.sum())
        rows = rows[positive]

    positives_per_user = np.bincount(user_codes[rows], minlength=user_uniques.size)  # (K_u,)
    keep_user = positives_per_user >= min_user_positives
    users_dropped = int((~keep_user).sum())
    rows_of_dropped = int(positives_per_user[~keep_user].sum())
    rows = rows[keep_user[user_codes[rows]]]
    if rows.size == 0:
        raise DataError(
            f"no interactions left after cleaning ({n_rows} rows read, {invalid} with an "
            f"invalid rating, {below} below min_rating={min_rating}, {users_dropped} users "
            f"with < {min_user_positives} positives)",
            path=raw.path,
        )

    user_index, row_codes = np.unique(user_codes[rows], return_inverse=True)
    item_index, col_codes = np.unique(item_codes[rows], return_inverse=True)
    data = np.ones(rows.size, dtype=np.float32)
    matrix = sp.csr_matrix(
        (data, (row_codes.reshape(-1), col_codes.reshape(-1))),
        shape=(user_index.size, item_index.size),
        dtype=np.float32,
    )
    matrix.sort_indices()
    report = CleaningReport(
        rows_read=n_rows,
        duplicates_collapsed=duplicates,
        invalid_rating_dropped=invalid,
        below_threshold_dropped=below,
        users_dropped=users_dropped,
        rows_of_dropped_users=rows_of_dropped,
    )
    logger.info("cleaning: %s -> %d users x %d items", report.as_dict(), *matrix.shape)
    return CleanMatrix(
        user_ids=user_uniques[user_index].astype(str),
        item_ids=item_uniques[item_index].astype(str),
        matrix=matrix,
        report=report,
    )

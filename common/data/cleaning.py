"""Turn raw interaction rows into a binary user x item matrix, counting what is removed.

Implements the preprocessing of Liang et al. 2018 ("Variational Autoencoders for Collaborative
Filtering", section 4.1): ratings >= 4 are positives (binarization) and only users with at least
5 positives are kept. Before that, bad rows are dropped.

Bad rows
--------
One policy for every kind: a bad row is **dropped and counted by reason**, and the cleaning
report (:class:`~common.data.types.CleaningReport`, ``RUN_DIR/data/cleaning.json``,
``fedrec data stats``) lists each reason with its count and its first
:data:`~common.data.types.FIRST_LINES` locations as ``file:line``. With ``strict`` (``--strict``,
``data.strict = true``) the first bad row in reading order is refused instead, with one line
naming its file and line. A file with no good row fails either way. The reasons, checked in this
order (a row is counted once, under the first that applies):

``non_utf8``
    The line holds bytes that are not UTF-8. It is decoded with the bad bytes escaped, and
    dropped. (A NUL byte means the file is not text at all, and a first line that does not
    decode cannot say what the file is, header or delimiter: such files are refused.)
``field_count``
    The line has another number of fields than the header (or, without a header, than most
    of the first lines).
``empty_id``
    The user or item id is empty (after stripping spaces).
``bad_id``
    In an integer id column, an id that is not a canonical non-negative integer within int64:
    ``abc``, ``x y``, ``1.0``, ``-1``, ``007``, ``2**70``.
``bad_rating``
    The rating is missing, not a number, NaN or infinite.
``negative_rating``
    The rating is below 0: ratings must be finite and ``>= 0``.
``bad_timestamp``
    The timestamp is missing, not a number, NaN or infinite.
``duplicate``
    The row repeats the (user, item) pair of an earlier row. The pair keeps the rating of its
    latest row by timestamp (the last line among equal timestamps or without them); the lines
    listed are the repeats.

Ratings below ``min_rating`` and users with too few positives are not bad rows: they are the
protocol, counted separately (``below_threshold_dropped``, ``users_dropped``).

Ids are typed once per column, over all of a source's files, before any id is looked at:
integer for formats whose ids are integers (GroupLens ml-100k/ml-1m, MovieLens CSV, NCF), and
for RecBole and plain CSV files when at least 90% of the column's ids are canonical integers
(:data:`~common.data.table.INTEGER_ID_SHARE`); else string. Bad ids are dropped *before* the
matrix is built, so they cannot change how the others sort. Users and items are ordered by id:
integers in number order, then (in a string column) any other ids in text order, so the integer
ids of a mixed column keep their number order too. A row dropped for any reason therefore
changes neither the order of the remaining users nor a seeded split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from common.data.table import natural_order
from common.data.types import BadRowLog, CleaningReport, RawInteractions
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
    """Unique ids in order and each row's index into them: ``(K,)``, ``(N,)`` int64.

    Integer ids sort by value; str ids integers first by value, then the rest as text
    (:func:`~common.data.table.natural_order`). Non-negative integer ids that are not too
    sparse use a lookup table: O(N), no sort.
    """
    if ids.dtype == np.int64 and ids.size and int(ids.max()) <= _DENSE_ID_FACTOR * ids.size:
        present = np.zeros(int(ids.max()) + 1, dtype=bool)
        present[ids] = True
        uniques = np.flatnonzero(present)
        lookup = np.cumsum(present, dtype=np.int64) - 1  # id -> rank among present ids
        return uniques, lookup[ids]
    uniques, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(-1)
    if ids.dtype == np.int64:
        return uniques, inverse
    order = natural_order(uniques)  # (K,) position -> unique
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return uniques[order], rank[inverse]


def _latest_per_pair(keys: np.ndarray, timestamps: np.ndarray | None) -> np.ndarray:
    """Sorted indices of the row kept for each distinct key.

    The kept row has the largest timestamp; ties and files without timestamps keep the last
    row, as a later line overrides an earlier one.
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


def _repeats(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose key appeared on an earlier row, and for each that earlier (first) row."""
    order = np.argsort(keys, kind="stable")  # equal keys stay in file order
    sorted_keys = keys[order]
    new_group = np.ones(keys.size, dtype=bool)
    new_group[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_first = order[np.flatnonzero(new_group)][np.cumsum(new_group) - 1]  # (n,)
    repeat = ~new_group
    rows, firsts = order[repeat], group_first[repeat]
    by_row = np.argsort(rows, kind="stable")
    return rows[by_row], firsts[by_row]


class _Locator:
    """Lines and files of a ``RawInteractions``' rows, for the bad-row log."""

    def __init__(self, raw: RawInteractions, log: BadRowLog) -> None:
        n = raw.n_rows
        self.lines = np.arange(1, n + 1, dtype=np.int64) if raw.lines is None else raw.lines
        self.files = np.zeros(n, dtype=np.int64) if raw.file_index is None else raw.file_index
        self.log = log
        self.path = raw.path
        if not log.files:
            log.file(raw.path)

    def add(self, reason: str, rows: np.ndarray, describe: Callable[[int], str]) -> None:
        self.log.add(reason, self.lines[rows], describe, file_index=self.files[rows])

    def where(self, row: int) -> str:
        path, line = self.log.location((int(self.files[row]), int(self.lines[row])), self.path)
        return f"{path.name}:{line}"


def _drop_bad_values(raw: RawInteractions, at: _Locator) -> np.ndarray:
    """Rows whose rating and timestamp are good; the others are logged. ``(n,)`` int64."""
    good = np.ones(raw.n_rows, dtype=bool)
    if raw.ratings is not None:
        ratings = raw.ratings
        bad = np.flatnonzero(np.isnan(ratings))
        at.add("bad_rating", bad, lambda _: "rating is not a finite number")
        good[bad] = False
        negative = np.flatnonzero(good & (ratings < 0))
        at.add(
            "negative_rating",
            negative,
            lambda k: f"negative rating {ratings[negative[k]]:g} (ratings must be finite and >= 0)",
        )
        good[negative] = False
    if raw.timestamps is not None:
        bad = np.flatnonzero(good & np.isnan(raw.timestamps))
        at.add("bad_timestamp", bad, lambda _: "timestamp is not a finite number")
        good[bad] = False
    return np.flatnonzero(good)


def _refuse_first(log: BadRowLog) -> None:
    """Raise the earliest bad row of ``log`` (``strict``), if there is one."""
    found = log.first_bad()
    if found is not None:
        where, message = found
        file, line = log.location(where)
        raise DataError(f"{message}; strict reading refuses bad rows", path=file, line=line)


def clean(
    raw: RawInteractions,
    *,
    min_rating: float | None,
    min_user_positives: int,
    strict: bool = False,
) -> CleanMatrix:
    """Drop bad rows, collapse duplicates, binarize, and drop users with few positives.

    Parameters
    ----------
    raw:
        Rows as read from the interaction file(s), with the bad rows found while reading.
    min_rating:
        A row is a positive if its rating is ``>= min_rating``. Ignored (every row is a
        positive) when the file has no rating column or ``raw.implicit``; must be finite
        otherwise.
    min_user_positives:
        Users with fewer positives are removed (Liang et al. 2018 use 5); at least 1.
    strict:
        Refuse the first bad row (in reading order) instead of dropping the bad rows.

    Returns
    -------
    CleanMatrix
        Users and items that keep at least one positive, sorted by id (integers by value,
        then other ids as text), the binary matrix and the :class:`CleaningReport`.

    Raises
    ------
    ValueError
        If ``min_rating`` is not finite or ``min_user_positives`` < 1.
    DataError
        With ``strict``, at the first bad row (one line naming its file and line); if no row is
        good; or if no positive survives cleaning.
    """
    binarize = raw.ratings is not None and not raw.implicit
    if binarize and (min_rating is None or not math.isfinite(min_rating)):
        raise ValueError(f"min_rating must be a finite number, got {min_rating!r}")
    if min_user_positives < 1:
        raise ValueError(f"min_user_positives must be >= 1, got {min_user_positives}")
    log = raw.bad.copy()
    at = _Locator(raw, log)
    n_read = raw.n_rows + raw.bad.total
    user_uniques, user_codes = _encode(raw.users)
    item_uniques, item_codes = _encode(raw.items)
    ratings, timestamps = raw.ratings, raw.timestamps

    rows = _drop_bad_values(raw, at)
    if rows.size == 0:
        if strict:
            _refuse_first(log)
        raise DataError(
            f"no good row: all {n_read} data rows are bad ({log.summary(raw.path)})",
            path=raw.path,
        )
    keys = user_codes[rows] * np.int64(item_uniques.size) + item_codes[rows]  # (n,) pair key
    repeats, firsts = _repeats(keys)
    if repeats.size:
        at.add(
            "duplicate",
            rows[repeats],
            lambda k: (
                f"duplicate (user, item) row: the pair of {at.where(int(rows[firsts[k]]))} again"
            ),
        )
    if strict:
        _refuse_first(log)
    kept = _latest_per_pair(keys, None if timestamps is None else timestamps[rows])
    rows = rows[kept]

    below = 0
    if binarize:
        assert ratings is not None and min_rating is not None
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
            f"no interactions left after cleaning ({n_read} rows read, {log.total} bad, "
            f"{below} below min_rating={min_rating}, {users_dropped} users with < "
            f"{min_user_positives} positives)",
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
        rows_read=n_read,
        below_threshold_dropped=below,
        users_dropped=users_dropped,
        rows_of_dropped_users=rows_of_dropped,
        bad_rows=log.report(raw.path),
        id_types={
            "user": "integer" if raw.users.dtype == np.int64 else "string",
            "item": "integer" if raw.items.dtype == np.int64 else "string",
        },
    )
    if log.total:
        logger.warning("%s: dropped %d bad rows: %s", raw.path, log.total, log.summary(raw.path))
    logger.info("cleaning: %s -> %d users x %d items", report.as_dict(), *matrix.shape)
    return CleanMatrix(
        user_ids=user_uniques[user_index].astype(str),
        item_ids=item_uniques[item_index].astype(str),
        matrix=matrix,
        report=report,
    )

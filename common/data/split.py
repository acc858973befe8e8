"""Strong-generalization split of Liang et al. 2018 and its export to CSV.

"Variational Autoencoders for Collaborative Filtering" (Liang, Krishnan, Hoffman, Jebara,
WWW 2018), section 4.2 and the authors' ``vae_cf`` notebook: users are shuffled; two groups of
``n_heldout_users`` become validation and test users, the rest train. The item set is the items
train users interacted with. Each held-out user with at least 5 items has
``int(holdout_fraction * n)`` of them drawn (without replacement) as the holdout to predict; the
rest is folded in. Users with fewer than 5 items are folded in entirely (empty holdout).

A split depends only on the cleaned dataset (its users in id order, its matrix) and the seed:
rows that cleaning dropped, whatever their ids looked like, cannot change it (see
:mod:`common.data.cleaning`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from common.data.types import Dataset, Split
from common.io import atomic_write_text

__all__ = ["MIN_ITEMS_FOR_HOLDOUT", "SPLIT_FILES", "export_split", "split_strong_generalization"]

logger = logging.getLogger(__name__)

MIN_ITEMS_FOR_HOLDOUT = 5
"""Held-out users with fewer items keep them all in fold-in (``vae_cf``: ``n_items_u >= 5``)."""

SMALL_DATASET_USERS = 2000
"""Datasets with at most this many users hold out 100 users per side (ML-100K)."""

SPLIT_FILES = (
    "train",
    "validation_foldin",
    "validation_holdout",
    "test_foldin",
    "test_holdout",
)
"""Interaction files written by :func:`export_split` (``<name>.csv``)."""


def _n_heldout(n_users: int, n_heldout_users: int | None, heldout_fraction: float) -> int:
    if n_heldout_users is None:
        if not (math.isfinite(heldout_fraction) and 0.0 < heldout_fraction < 0.5):
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {heldout_fraction}")
        n_heldout_users = (
            100 if n_users <= SMALL_DATASET_USERS else round(heldout_fraction * n_users)
        )
    if n_heldout_users < 0 or 2 * n_heldout_users >= n_users:
        raise ValueError(
            f"n_heldout_users must be >= 0 and leave training users: got {n_heldout_users} "
            f"per side for {n_users} users"
        )
    return int(n_heldout_users)


def _fold_in_holdout(
    rows: sp.csr_matrix, rng: np.random.Generator, holdout_fraction: float
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Divide each row's items into fold-in and holdout (vae_cf split_train_test_proportion).

    Draws from ``rng`` in row order, one ``choice`` per row with enough items.
    """
    holdout = np.zeros(rows.nnz, dtype=bool)  # (nnz,) per stored entry
    for u in range(rows.shape[0]):
        start, stop = int(rows.indptr[u]), int(rows.indptr[u + 1])
        n = stop - start
        if n >= MIN_ITEMS_FOR_HOLDOUT:
            idx = np.zeros(n, dtype=bool)
            idx[rng.choice(n, size=int(holdout_fraction * n), replace=False)] = True
            holdout[start:stop] = idx
    coo = rows.tocoo()
    shape = rows.shape

    def part(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(
            (coo.data[mask], (coo.row[mask], coo.col[mask])), shape=shape, dtype=np.float32
        )

    return part(~holdout), part(holdout)


def split_strong_generalization(
    ds: Dataset,
    *,
    seed: int = 0,
    n_heldout_users: int | None = None,
    heldout_fraction: float = 0.1,
    holdout_fraction: float = 0.2,
) -> Split:
    """Split users into train / validation / test, and held-out rows into fold-in / holdout.

    Parameters
    ----------
    ds:
        The cleaned dataset.
    seed:
        Seeds one ``np.random.default_rng``: first the user permutation, then the holdout draws
        of validation users, then of test users (each group in dataset row order).
    n_heldout_users:
        Users per held-out side (validation, and test). Default: 100 when the dataset has at most
        2000 users (ML-100K: 100 each), else ``round(heldout_fraction * U)``.
    heldout_fraction:
        Fraction of users per held-out side when ``n_heldout_users`` is not given, in (0, 0.5).
    holdout_fraction:
        Fraction of a held-out user's items to predict, in (0, 1); default 0.2.

    Returns
    -------
    Split
        Users of each group sorted by dataset row; columns are the items of train users, in
        dataset column order (``Split.item_index``).

    Raises
    ------
    ValueError
        For fractions out of range or more held-out users than the dataset allows.
    """
    if not (math.isfinite(holdout_fraction) and 0.0 < holdout_fraction < 1.0):
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n_users = ds.n_users
    n_held = _n_heldout(n_users, n_heldout_users, heldout_fraction)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_users)  # (U,)
    n_train = n_users - 2 * n_held
    train_rows = np.sort(perm[:n_train])
    validation_rows = np.sort(perm[n_train : n_train + n_held])
    test_rows = np.sort(perm[n_train + n_held :])

    train_all = ds.matrix[train_rows]
    item_index = np.flatnonzero(train_all.getnnz(axis=0) > 0).astype(np.int64)  # (I',)
    train = sp.csr_matrix(train_all[:, item_index], dtype=np.float32)
    validation = sp.csr_matrix(ds.matrix[validation_rows][:, item_index], dtype=np.float32)
    test = sp.csr_matrix(ds.matrix[test_rows][:, item_index], dtype=np.float32)
    for m in (validation, test):
        m.sort_indices()
    validation_foldin, validation_holdout = _fold_in_holdout(validation, rng, holdout_fraction)
    test_foldin, test_holdout = _fold_in_holdout(test, rng, holdout_fraction)
    logger.info(
        "split seed=%d: %d train, %d validation, %d test users; %d of %d items",
        seed,
        train_rows.size,
        validation_rows.size,
        test_rows.size,
        item_index.size,
        ds.n_items,
    )
    return Split(
        seed=seed,
        item_ids=ds.item_ids[item_index],
        item_index=item_index,
        train_users=ds.user_ids[train_rows],
        train=train,
        validation_users=ds.user_ids[validation_rows],
        validation_foldin=validation_foldin,
        validation_holdout=validation_holdout,
        test_users=ds.user_ids[test_rows],
        test_foldin=test_foldin,
        test_holdout=test_holdout,
    )


def _pairs_csv(users: np.ndarray, items: np.ndarray, matrix: sp.csr_matrix) -> str:
    """``user_id,item_id`` lines of a matrix's entries, in row order."""
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, coo.row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["user_id", "item_id"])
    writer.writerows(
        zip(users[coo.row[order]].tolist(), items[coo.col[order]].tolist(), strict=True)
    )
    return buf.getvalue()


def export_split(split: Split, ds: Dataset, out_dir: Path) -> list[Path]:
    """Write the split as CSV files in original ids, each file atomically.

    Files: ``train.csv``, ``validation_foldin.csv``, ``validation_holdout.csv``,
    ``test_foldin.csv``, ``test_holdout.csv`` (header ``user_id,item_id``) and ``items.csv``
    (``item_id,title,genres``, genres joined by ``|``) for the split's items.

    Returns
    -------
    list[Path]
        The written files, in the order above.
    """
    out_dir = Path(out_dir)
    groups = {
        "train": (split.train_users, split.train),
        "validation_foldin": (split.validation_users, split.validation_foldin),
        "validation_holdout": (split.validation_users, split.validation_holdout),
        "test_foldin": (split.test_users, split.test_foldin),
        "test_holdout": (split.test_users, split.test_holdout),
    }
    written: list[Path] = []
    for name in SPLIT_FILES:
        users, matrix = groups[name]
        path = out_dir / f"{name}.csv"
        atomic_write_text(path, _pairs_csv(users, split.item_ids, matrix))
        written.append(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["item_id", "title", "genres"])
    for item, col in zip(split.item_ids.tolist(), split.item_index.tolist(), strict=True):
        writer.writerow([item, str(ds.item_titles[col]), "|".join(ds.item_genres[col])])
    path = out_dir / "items.csv"
    atomic_write_text(path, buf.getvalue())
    written.append(path)
    logger.info("exported split seed=%d to %s", split.seed, out_dir)
    return written

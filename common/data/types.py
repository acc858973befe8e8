"""The data layer's value types: a cleaned dataset, its cleaning report, and a split of it.

All three are frozen dataclasses; arrays inside them are treated as read-only by convention.
Raw, not-yet-cleaned interactions (:class:`RawInteractions`) and side information
(:class:`SideInfo`) are what the format readers hand to the cleaning step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = ["CleaningReport", "Dataset", "RawInteractions", "SideInfo", "Split"]


@dataclass(frozen=True)
class CleaningReport:
    """What cleaning removed from an interaction file, row by row.

    The counts partition the rows read: ``rows_read == invalid_rating_dropped +
    duplicates_collapsed + below_threshold_dropped + rows_of_dropped_users + matrix.nnz``.
    Rows with an invalid rating are dropped first, then repeated (user, item) pairs collapse,
    then ratings below the threshold are dropped, then users with too few positives.
    """

    rows_read: int
    """Data rows in the interaction file (header and blank lines excluded)."""
    duplicates_collapsed: int
    """Rows removed because their (user, item) pair repeats; the latest by timestamp is kept
    (the last row among equal or missing timestamps)."""
    invalid_rating_dropped: int
    """Rows whose rating is missing, non-numeric, NaN or infinite."""
    below_threshold_dropped: int
    """Rows whose rating is below ``min_rating``: not positives."""
    users_dropped: int
    """Users in the file with fewer than ``min_user_positives`` positives (possibly none)."""
    rows_of_dropped_users: int
    """Positive rows removed together with those users."""

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain ``{field: count}`` dict, in declaration order."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class Dataset:
    """A cleaned implicit-feedback dataset: a binary user x item matrix plus side information.

    Rows are users and columns are items, each in the order of their original ids (numeric order
    when every id is an integer, else lexicographic). Only users and items that keep at least one
    positive after cleaning are present.
    """

    name: str
    """The embedded data set's name (``"ml-100k"``, ``"ml-1m"``, ``"pinterest-20"``), else the
    file's or folder's stem."""
    sha256: str
    """SHA-256 of the interaction file's bytes (hex); for a source of several interaction files
    (NCF's train and test) of their bytes concatenated in reading order."""
    source: Path
    """The (first) interaction file."""
    user_ids: np.ndarray
    """``(U,)`` str: original user ids; index = matrix row."""
    item_ids: np.ndarray
    """``(I,)`` str: original item ids; index = matrix column."""
    matrix: sp.csr_matrix
    """``(U, I)`` float32, 1.0 where the user has a positive interaction with the item."""
    user_features: dict[str, np.ndarray]
    """Feature name (e.g. ``"gender"``, ``"age"``, ``"occupation"``) -> ``(U,)`` str, ``''`` when
    unknown. Empty when the source has no user file."""
    item_titles: np.ndarray
    """``(I,)`` str, ``''`` when unknown."""
    item_genres: tuple[tuple[str, ...], ...]
    """``(I,)`` genres per item, ``()`` when unknown."""
    report: CleaningReport
    """What cleaning removed."""
    min_rating: float | None
    """Rating threshold for a positive; ``None`` for implicit data without ratings."""

    @property
    def n_users(self) -> int:
        """Number of users (matrix rows)."""
        return int(self.matrix.shape[0])

    @property
    def n_items(self) -> int:
        """Number of items (matrix columns)."""
        return int(self.matrix.shape[1])


@dataclass(frozen=True)
class Split:
    """A strong-generalization split (Liang et al. 2018): disjoint train, validation, test users.

    Columns of every matrix are the split's items ``item_ids`` (the items that train users
    interacted with). Held-out users' rows are divided into a fold-in part (given to the model)
    and a holdout part (to be predicted); ``foldin + holdout`` is the user's full row restricted
    to those items. Users with fewer than 5 such items have an empty holdout.
    """

    seed: int
    """Seed of the user permutation and the fold-in/holdout draw."""
    item_ids: np.ndarray
    """``(I',)`` str: original ids of the split's items."""
    item_index: np.ndarray
    """``(I',)`` int64: the dataset column of each split column."""
    train_users: np.ndarray
    """``(U_tr,)`` str: original ids of the training users."""
    train: sp.csr_matrix
    """``(U_tr, I')`` float32 training interactions."""
    validation_users: np.ndarray
    """``(U_va,)`` str: original ids of the validation users."""
    validation_foldin: sp.csr_matrix
    """``(U_va, I')`` float32: validation users' observed items."""
    validation_holdout: sp.csr_matrix
    """``(U_va, I')`` float32: validation users' items to predict."""
    test_users: np.ndarray
    """``(U_te,)`` str: original ids of the test users."""
    test_foldin: sp.csr_matrix
    """``(U_te, I')`` float32: test users' observed items."""
    test_holdout: sp.csr_matrix
    """``(U_te, I')`` float32: test users' items to predict."""


@dataclass
class RawInteractions:
    """Interaction rows as read from a file, before any cleaning.

    Ids are ``int64`` arrays when every id in the file is a canonical decimal integer (faster to
    index), else ``str`` arrays.
    """

    path: Path
    """The interaction file."""
    users: np.ndarray
    """``(N,)`` int64 or str user ids."""
    items: np.ndarray
    """``(N,)`` int64 or str item ids."""
    ratings: np.ndarray | None
    """``(N,)`` float64 ratings, NaN where missing or not a finite number; ``None`` when the
    file has no rating column (every row is a positive)."""
    timestamps: np.ndarray | None
    """``(N,)`` float64 timestamps, NaN where missing; ``None`` when the file has none."""

    @property
    def n_rows(self) -> int:
        """Number of data rows."""
        return int(self.users.shape[0])


@dataclass
class SideInfo:
    """Optional user and item attributes keyed by original id (str)."""

    user_features: dict[str, dict[str, str]] = field(default_factory=dict)
    """Feature name -> {user id -> value}."""
    item_titles: dict[str, str] = field(default_factory=dict)
    """Item id -> title."""
    item_genres: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Item id -> genres."""

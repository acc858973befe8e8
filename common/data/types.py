"""The data layer's value types: a cleaned dataset, its cleaning report, and a split of it.

All three are frozen dataclasses; arrays inside them are treated as read-only by convention.
Raw, not-yet-cleaned interactions (:class:`RawInteractions`) and side information
(:class:`SideInfo`) are what the format readers hand to the cleaning step; the bad rows found on
the way are recorded in a :class:`BadRowLog` (the policy is in :mod:`common.data.cleaning`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "BAD_ROW_REASONS",
    "FIRST_LINES",
    "BadRowLog",
    "BadRows",
    "CleaningReport",
    "Dataset",
    "RawInteractions",
    "SideInfo",
    "Split",
]

BAD_ROW_REASONS: dict[str, str] = {
    "non_utf8": "non-UTF-8 bytes",
    "field_count": "wrong field count",
    "empty_id": "empty id",
    "bad_id": "bad id",
    "bad_rating": "non-numeric, NaN or infinite rating",
    "negative_rating": "negative rating",
    "bad_timestamp": "non-numeric timestamp",
    "duplicate": "duplicate (user, item) row",
}
"""Why a row is bad, ``key -> description``, in the order the checks run: a row with several
problems is counted once, under the first."""

FIRST_LINES = 5
"""Locations (``file:line``) listed per reason in a cleaning report."""


@dataclass(frozen=True)
class BadRows:
    """The rows dropped for one reason."""

    count: int
    """How many rows."""
    first: tuple[str, ...]
    """The first :data:`FIRST_LINES` of them as ``file:line`` (file name, 1-based line), in
    reading order."""


class BadRowLog:
    """Bad rows found while reading and cleaning: a count per reason and where the first are.

    Locations are ``(file index, line)``: the index into :attr:`files` (files in reading order)
    and the 1-based line. For ``strict`` reading, the log also keeps what is wrong with the
    first bad row of each reason.
    """

    def __init__(self, files: list[Path] | None = None) -> None:
        self.files: list[Path] = list(files or [])
        self.counts: dict[str, int] = {}
        self.first: dict[str, list[tuple[int, int]]] = {}
        self.earliest: dict[str, tuple[tuple[int, int], str]] = {}

    def file(self, path: Path) -> int:
        """The index of ``path`` in :attr:`files`, added if new."""
        if path not in self.files:
            self.files.append(path)
        return self.files.index(path)

    def add(
        self,
        reason: str,
        lines: np.ndarray,
        describe: Callable[[int], str] | str,
        *,
        file_index: np.ndarray | int = 0,
    ) -> None:
        """Record the rows at ``lines`` (``(n,)`` int) of ``file_index`` as bad for ``reason``.

        ``describe(k)`` says what is wrong with the row at ``lines[k]``, in a few words; it is
        called once, for the earliest row. A str says it of ``lines[0]``, for rows given in
        reading order.
        """
        if reason not in BAD_ROW_REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        lines = np.asarray(lines, dtype=np.int64).reshape(-1)
        if lines.size == 0:
            return
        files = np.broadcast_to(np.asarray(file_index, dtype=np.int64), lines.shape)
        order = np.lexsort((lines, files))[:FIRST_LINES]
        found = [(int(files[k]), int(lines[k])) for k in order.tolist()]
        self.counts[reason] = self.counts.get(reason, 0) + int(lines.size)
        self.first[reason] = sorted(self.first.get(reason, []) + found)[:FIRST_LINES]
        earliest = self.earliest.get(reason)
        if earliest is None or found[0] < earliest[0]:
            message = describe if isinstance(describe, str) else describe(int(order[0]))
            self.earliest[reason] = (found[0], message)

    @property
    def total(self) -> int:
        """Bad rows of every reason."""
        return sum(self.counts.values())

    def copy(self) -> BadRowLog:
        """An independent copy."""
        other = BadRowLog(self.files)
        other.counts = dict(self.counts)
        other.first = {r: list(v) for r, v in self.first.items()}
        other.earliest = dict(self.earliest)
        return other

    def location(self, where: tuple[int, int], default: Path | None = None) -> tuple[Path, int]:
        """``(path, line)`` of a location."""
        index, line = where
        if index < len(self.files):
            return self.files[index], line
        if default is None:
            raise ValueError(f"no file {index} in the log")
        return default, line

    def first_bad(self) -> tuple[tuple[int, int], str] | None:
        """The earliest bad row in reading order and what is wrong with it, or None."""
        if not self.earliest:
            return None
        return min(self.earliest.values(), key=lambda entry: entry[0])

    def summary(self, default: Path | None = None) -> str:
        """``reason count (first file:line), ...`` of the reasons found, for one line."""
        parts = []
        for reason, description in BAD_ROW_REASONS.items():
            if self.counts.get(reason):
                path, line = self.location(self.first[reason][0], default)
                parts.append(f"{description} {self.counts[reason]} (first {path.name}:{line})")
        return ", ".join(parts)

    def report(self, default: Path | None = None) -> dict[str, BadRows]:
        """Every reason of :data:`BAD_ROW_REASONS`, in order, with its rows (possibly none)."""
        out = {}
        for reason in BAD_ROW_REASONS:
            where = [self.location(w, default) for w in self.first.get(reason, [])]
            out[reason] = BadRows(
                count=self.counts.get(reason, 0),
                first=tuple(f"{path.name}:{line}" for path, line in where),
            )
        return out


def _no_bad_rows() -> dict[str, BadRows]:
    return {reason: BadRows(0, ()) for reason in BAD_ROW_REASONS}


@dataclass(frozen=True)
class CleaningReport:
    """What cleaning removed from an interaction file, row by row.

    The counts partition the rows read: ``rows_read == bad_rows_dropped +
    below_threshold_dropped + rows_of_dropped_users + matrix.nnz``. Bad rows are dropped first
    (:data:`BAD_ROW_REASONS`, duplicates last), then ratings below the threshold, then users
    with too few positives.
    """

    rows_read: int
    """Data rows in the interaction file(s), bad ones included (header and blank lines
    excluded)."""
    below_threshold_dropped: int
    """Rows whose rating is below ``min_rating``: not positives (not bad rows)."""
    users_dropped: int
    """Users in the file with fewer than ``min_user_positives`` positives (possibly none)."""
    rows_of_dropped_users: int
    """Positive rows removed together with those users."""
    bad_rows: dict[str, BadRows] = field(default_factory=_no_bad_rows)
    """Every reason of :data:`BAD_ROW_REASONS`, in that order, with the rows dropped for it."""
    id_types: dict[str, str] = field(default_factory=dict)
    """``{"user": ..., "item": ...}``: ``"integer"`` or ``"string"``, how each id column was
    typed (see :mod:`common.data.cleaning`)."""

    @property
    def bad_rows_dropped(self) -> int:
        """Bad rows of every reason."""
        return sum(b.count for b in self.bad_rows.values())

    @property
    def duplicates_collapsed(self) -> int:
        """Rows that repeat an earlier row's (user, item) pair (the latest by timestamp is kept,
        the last row among equal timestamps)."""
        bad = self.bad_rows.get("duplicate")
        return 0 if bad is None else bad.count

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able values: counts, and per reason ``{"count", "first"}``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "bad_rows":
                out["bad_rows_dropped"] = self.bad_rows_dropped
                value = {r: {"count": b.count, "first": list(b.first)} for r, b in value.items()}
            elif f.name == "id_types":
                value = dict(value)
            else:
                value = int(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class Dataset:
    """A cleaned implicit-feedback dataset: a binary user x item matrix plus side information.

    Rows are users and columns are items, each in the order of their original ids: integer ids in
    number order, then any other ids in text order. Only users and items that keep at least one
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
    """Interaction rows as read from a file, before cleaning; rows found bad are already out.

    Ids are ``int64`` arrays when the id column is typed integer (see
    :mod:`common.data.cleaning`), else ``str`` arrays.
    """

    path: Path
    """The (first) interaction file."""
    users: np.ndarray
    """``(N,)`` int64 or str user ids."""
    items: np.ndarray
    """``(N,)`` int64 or str item ids."""
    ratings: np.ndarray | None
    """``(N,)`` float64 ratings, NaN where missing or not a finite number; ``None`` when the
    file has no rating column (every row is a positive)."""
    timestamps: np.ndarray | None
    """``(N,)`` float64 timestamps, NaN where missing or not a finite number; ``None`` when the
    file has none."""
    lines: np.ndarray | None = None
    """``(N,)`` int64 1-based line of each row in its file; ``None``: rows 1..N."""
    file_index: np.ndarray | None = None
    """``(N,)`` int64 index into ``bad.files`` of each row's file; ``None``: all in ``path``."""
    bad: BadRowLog = field(default_factory=BadRowLog)
    """Rows already dropped while reading (not among the N)."""
    implicit: bool = False
    """Every row is a positive although the file has a rating column (NCF files): ratings are
    checked like any other but not compared with ``min_rating``."""

    @property
    def n_rows(self) -> int:
        """Number of (not yet dropped) data rows."""
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

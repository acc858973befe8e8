"""Assign training users (rows of the binary ``train`` matrix) to federated clients.

Three layouts, chosen by :class:`common.run.config.Partition`:

* ``per-user``: one client per user, the cross-device setting.
* ``silos``: K silos, either one per value of a user attribute (e.g. occupation) or a seeded
  random split into K nearly equal parts.
* ``dirichlet``: K non-IID silos with label skew over each user's dominant genre (Hsu, Qi and
  Brown 2019).

The result is a :class:`ClientPartition`: a CSR-like pair ``offsets``/``rows`` plus one label per
client, saved as ``.npz`` so that server and clients read the same assignment.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from common.io import atomic_write_bytes
from common.run.config import Partition

__all__ = ["ClientPartition", "describe", "dominant_genres", "partition_users"]

_UNKNOWN = "unknown"


@dataclass(frozen=True)
class ClientPartition:
    """Rows of ``train`` held by each client.

    The arrays are copied to ``int64`` and made read-only on construction.
    """

    offsets: np.ndarray
    """(n_clients + 1,) int64; client ``c`` holds ``rows[offsets[c]:offsets[c + 1]]``."""
    rows: np.ndarray
    """(n_assigned,) int64 row indices into ``train``, each at most once."""
    labels: tuple[str, ...]
    """(n_clients,) a human label per client, e.g. ``"user 196"`` or ``"silo 3"``."""

    def __post_init__(self) -> None:
        offsets = np.array(self.offsets, dtype=np.int64)
        rows = np.array(self.rows, dtype=np.int64)
        labels = tuple(str(label) for label in self.labels)
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if np.any(np.diff(offsets) < 0) or offsets[-1] != rows.size:
            raise ValueError("offsets must be non-decreasing and end at len(rows)")
        if rows.ndim != 1 or (rows.size and rows.min() < 0):
            raise ValueError("rows must be a 1-D array of non-negative indices")
        if np.unique(rows).size != rows.size:
            raise ValueError("rows must not repeat a user")
        if len(labels) != offsets.size - 1:
            raise ValueError(f"labels has {len(labels)} entries for {offsets.size - 1} clients")
        offsets.flags.writeable = False
        rows.flags.writeable = False
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "labels", labels)

    @property
    def n_clients(self) -> int:
        """Number of clients."""
        return int(self.offsets.size - 1)

    def client_rows(self, c: int) -> np.ndarray:
        """Row indices (int64, read-only view) of client ``c``."""
        if not 0 <= c < self.n_clients:
            raise IndexError(f"client {c} out of range [0, {self.n_clients})")
        return self.rows[self.offsets[c] : self.offsets[c + 1]]

    def sizes(self) -> np.ndarray:
        """(n_clients,) int64 number of users per client."""
        return np.diff(self.offsets)

    def save(self, path: Path) -> None:
        """Write the partition to ``path`` as ``.npz``, atomically."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            offsets=self.offsets,
            rows=self.rows,
            labels=np.array(self.labels, dtype=np.str_),
        )
        atomic_write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> ClientPartition:
        """Read a partition written by :meth:`save` (no pickles are loaded)."""
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(
                offsets=data["offsets"],
                rows=data["rows"],
                labels=tuple(str(label) for label in data["labels"]),
            )


def describe(p: ClientPartition) -> dict[str, float]:
    """Summary for logs: ``n_clients`` and min / median / max users per client."""
    sizes = p.sizes()
    if sizes.size == 0:
        return {"n_clients": 0, "min_users": 0, "median_users": 0.0, "max_users": 0}
    return {
        "n_clients": p.n_clients,
        "min_users": int(sizes.min()),
        "median_users": float(np.median(sizes)),
        "max_users": int(sizes.max()),
    }


def partition_users(
    train: sp.csr_matrix,
    kind: Partition,
    *,
    seed: int,
    n_silos: int = 10,
    user_attribute: np.ndarray | None = None,
    item_genres: Sequence[tuple[str, ...]] | None = None,
    alpha: float = 0.5,
    user_labels: np.ndarray | None = None,
    max_clients: int | None = None,
    attribute_name: str = "",
) -> ClientPartition:
    """Assign the rows of ``train`` to clients.

    Parameters
    ----------
    train:
        (U, I) binary user-item matrix; only its shape and non-zero pattern are used.
    kind:
        ``PER_USER``, ``SILOS`` or ``DIRICHLET``.
    seed:
        Seed (>= 0) of the one ``np.random.default_rng`` used for every random choice.
    n_silos:
        Number of silos K for random ``SILOS`` and ``DIRICHLET``; ignored for ``PER_USER`` and
        attribute silos. Default 10. Must be <= U so that no silo is empty.
    user_attribute:
        (U,) str per user; when given, ``SILOS`` makes one silo per distinct value (sorted),
        with ``''`` grouped as ``"unknown"``.
    item_genres:
        (I,) tuple of genres per column; required for ``DIRICHLET``.
    alpha:
        Dirichlet concentration (finite, > 0); smaller is more skewed. Default 0.5.
    user_labels:
        (U,) external user ids for the ``"user <id>"`` labels; default the row index.
    max_clients:
        Keep only this many clients: the first ones for ``PER_USER``, a seeded random subset
        (in their original order) for silos. Default keeps all.
    attribute_name:
        Name of ``user_attribute`` for labels (``"silo occupation=doctor"``); default none
        (``"silo doctor"``).

    Returns
    -------
    ClientPartition
        Every kept client is non-empty; without ``max_clients`` every row is in exactly one.
    """
    kind = Partition(kind)
    train = _check_train(train)
    n_users, n_items = train.shape
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n_silos < 1:
        raise ValueError(f"n_silos must be >= 1, got {n_silos}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"max_clients must be >= 1 or None, got {max_clients}")
    if user_labels is not None and len(user_labels) != n_users:
        raise ValueError(f"user_labels has {len(user_labels)} entries for {n_users} users")
    if user_attribute is not None and len(user_attribute) != n_users:
        raise ValueError(f"user_attribute has {len(user_attribute)} entries for {n_users} users")
    if item_genres is not None and len(item_genres) != n_items:
        raise ValueError(f"item_genres has {len(item_genres)} entries for {n_items} items")
    rng = np.random.default_rng(seed)

    groups: list[np.ndarray]
    labels: list[str]
    if kind is Partition.PER_USER:
        ids = np.arange(n_users) if user_labels is None else np.asarray(user_labels)
        n_keep = n_users if max_clients is None else min(max_clients, n_users)
        groups = [np.array([r]) for r in range(n_keep)]
        labels = [f"user {ids[r]}" for r in range(n_keep)]
        return _pack(groups, labels)

    if kind is Partition.SILOS and user_attribute is not None:
        groups, labels = _attribute_silos(user_attribute, attribute_name)
    else:
        if n_silos > n_users:
            raise ValueError(
                f"n_silos={n_silos} exceeds the {n_users} users: a silo would be empty"
            )
        if kind is Partition.SILOS:
            groups = _random_silos(n_users, n_silos, rng)
        else:
            if item_genres is None:
                raise ValueError("dirichlet partition needs item genres")
            dominant = dominant_genres(train, item_genres)
            groups = _dirichlet_silos(dominant, n_silos, alpha, rng)
        labels = [f"silo {k}" for k in range(len(groups))]

    if max_clients is not None and max_clients < len(groups):
        keep = np.sort(rng.choice(len(groups), size=max_clients, replace=False))
        groups = [groups[k] for k in keep]
        labels = [labels[k] for k in keep]
    return _pack(groups, labels)


def dominant_genres(train: sp.csr_matrix, item_genres: Sequence[tuple[str, ...]]) -> np.ndarray:
    """(U,) str: each user's most frequent genre over their items' genres.

    Ties go to the alphabetically first genre; a user whose items carry no genre gets
    ``"unknown"``. An item with several genres counts once for each.
    """
    train = _check_train(train)
    vocab = sorted({g for genres in item_genres for g in genres})
    if not vocab:
        return np.full(train.shape[0], _UNKNOWN, dtype=object)
    index = {g: j for j, g in enumerate(vocab)}
    item_idx = [i for i, genres in enumerate(item_genres) for _ in genres]
    genre_idx = [index[g] for genres in item_genres for g in genres]
    item_genre = sp.csr_matrix(
        (np.ones(len(item_idx)), (item_idx, genre_idx)), shape=(len(item_genres), len(vocab))
    )  # (I, G)
    pattern = (train != 0).astype(np.float64)  # (U, I) binary even if train holds weights
    counts = np.asarray((pattern @ item_genre).todense())  # (U, G)
    best = np.argmax(counts, axis=1)  # first maximum = alphabetically first genre
    out = np.array(vocab, dtype=object)[best]
    out[counts.max(axis=1) == 0] = _UNKNOWN
    return out


def _check_train(train: sp.csr_matrix) -> sp.csr_matrix:
    if not sp.issparse(train) or len(train.shape) != 2:
        raise ValueError("train must be a 2-D scipy.sparse matrix")
    return sp.csr_matrix(train)


def _pack(groups: list[np.ndarray], labels: list[str]) -> ClientPartition:
    sizes = [len(g) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, dtype=np.int64)
    return ClientPartition(offsets=offsets, rows=rows, labels=tuple(labels))


def _attribute_silos(
    user_attribute: np.ndarray, attribute_name: str
) -> tuple[list[np.ndarray], list[str]]:
    """One silo per distinct attribute value, sorted; ``''`` becomes ``"unknown"``."""
    values = np.array([str(v) if str(v) != "" else _UNKNOWN for v in user_attribute], dtype=object)
    groups: list[np.ndarray] = []
    labels: list[str] = []
    prefix = f"{attribute_name}=" if attribute_name else ""
    for value in sorted(set(values.tolist())):
        groups.append(np.flatnonzero(values == value))
        labels.append(f"silo {prefix}{value}")
    return groups, labels


def _random_silos(n_users: int, n_silos: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation cut into ``n_silos`` parts whose sizes differ by at most one."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n_users), n_silos)]


def _dirichlet_silos(
    label: np.ndarray, n_silos: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skew silos (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical data
    distribution for federated visual classification", Sec. 3).

    For each label (sorted, so the draws are reproducible) the users holding it are shuffled and
    cut by proportions ``p ~ Dirichlet(alpha * ones(n_silos))``. This is the per-class form used by
    Yurochkin et al. 2019 and most later work; Hsu et al. draw per client, the skew is the same
    kind. Small ``alpha`` puts each label in few silos.

    A tiny ``alpha`` can leave a silo empty. Rather than re-drawing (which may loop for long at
    ``alpha`` near 0), each empty silo takes one user, the last, from the currently largest silo;
    this needs ``n_silos <= U``, which the caller checks, and changes at most ``n_silos - 1``
    assignments.
    """
    silos: list[list[int]] = [[] for _ in range(n_silos)]
    for value in sorted(set(label.tolist())):
        members = rng.permutation(np.flatnonzero(label == value))
        p = rng.dirichlet(alpha * np.ones(n_silos))  # (K,)
        cuts = (np.cumsum(p)[:-1] * members.size).astype(np.int64)  # (K-1,) non-decreasing
        for k, part in enumerate(np.split(members, cuts)):
            silos[k].extend(part.tolist())
    for k in range(n_silos):
        if not silos[k]:
            largest = max(range(n_silos), key=lambda j: len(silos[j]))
            silos[k].append(silos[largest].pop())
    return [np.sort(np.array(s, dtype=np.int64)) for s in silos]

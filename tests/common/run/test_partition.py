"""Client partitions: every user in exactly one client, and each layout does what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from common.run.config import Partition
from common.run.partition import ClientPartition, describe, dominant_genres, partition_users


def _csr(dense: list[list[int]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(dense, dtype=np.float32))


def _genre_blocks(n_users: int, n_genres: int) -> tuple[sp.csr_matrix, list[tuple[str, ...]]]:
    """User u likes the two items of genre ``u % n_genres`` (one genre per pair of columns)."""
    item_genres: list[tuple[str, ...]] = [(f"g{j // 2}",) for j in range(2 * n_genres)]
    dense = np.zeros((n_users, 2 * n_genres), dtype=np.float32)
    for u in range(n_users):
        g = u % n_genres
        dense[u, 2 * g : 2 * g + 2] = 1
    return sp.csr_matrix(dense), item_genres


def _assert_exact_cover(p: ClientPartition, n_users: int) -> None:
    assert sorted(p.rows.tolist()) == list(range(n_users))
    assert all(p.client_rows(c).size >= 1 for c in range(p.n_clients))
    assert p.sizes().sum() == n_users


@pytest.mark.parametrize("kind", list(Partition))
def test_every_user_in_exactly_one_client(kind: Partition) -> None:
    # Prepare
    train, genres = _genre_blocks(n_users=23, n_genres=3)
    # Execute
    p = partition_users(train, kind, seed=0, n_silos=4, item_genres=genres)
    # Assert
    _assert_exact_cover(p, 23)
    assert len(p.labels) == p.n_clients


def test_per_user_keeps_row_order_and_labels() -> None:
    # Prepare
    train = _csr([[1, 0], [0, 1], [1, 1]])
    ids = np.array([196, 7, 42])
    # Execute
    p = partition_users(train, Partition.PER_USER, seed=3, user_labels=ids)
    first_two = partition_users(train, Partition.PER_USER, seed=3, max_clients=2)
    # Assert
    assert p.rows.tolist() == [0, 1, 2]
    assert p.offsets.tolist() == [0, 1, 2, 3]
    assert p.labels == ("user 196", "user 7", "user 42")
    assert first_two.rows.tolist() == [0, 1]
    assert first_two.labels == ("user 0", "user 1")


def test_attribute_silos_group_exactly_by_value() -> None:
    # Prepare
    train = _csr([[1, 0]] * 6)
    occupation = np.array(["doctor", "", "artist", "doctor", "", "artist"])
    # Execute
    p = partition_users(
        train,
        Partition.SILOS,
        seed=0,
        n_silos=99,  # ignored with an attribute
        user_attribute=occupation,
        attribute_name="occupation",
    )
    # Assert: sorted values, '' grouped as "unknown"
    assert p.labels == (
        "silo occupation=artist",
        "silo occupation=doctor",
        "silo occupation=unknown",
    )
    assert [p.client_rows(c).tolist() for c in range(3)] == [[2, 5], [0, 3], [1, 4]]


def test_random_silos_are_balanced_and_seeded() -> None:
    # Prepare
    train = _csr([[1]] * 10)
    # Execute
    a = partition_users(train, Partition.SILOS, seed=1, n_silos=3)
    b = partition_users(train, Partition.SILOS, seed=1, n_silos=3)
    c = partition_users(train, Partition.SILOS, seed=2, n_silos=3)
    # Assert: 10 users in 3 silos -> sizes 4, 3, 3
    assert sorted(a.sizes().tolist()) == [3, 3, 4]
    assert a.labels == ("silo 0", "silo 1", "silo 2")
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.rows, c.rows)


def test_max_clients_keeps_a_seeded_subset_of_silos() -> None:
    # Prepare
    train = _csr([[1]] * 12)
    # Execute
    p = partition_users(train, Partition.SILOS, seed=5, n_silos=6, max_clients=2)
    q = partition_users(train, Partition.SILOS, seed=5, n_silos=6, max_clients=2)
    # Assert
    assert p.n_clients == 2
    assert p.sizes().tolist() == [2, 2]
    assert p.labels == q.labels and np.array_equal(p.rows, q.rows)
    assert set(p.labels) <= {f"silo {k}" for k in range(6)}


def test_dominant_genre_ties_and_unknown() -> None:
    # Prepare: items 0:(b,) 1:(a,) 2:(a, b) 3:()
    train = _csr([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0]])
    item_genres = [("b",), ("a",), ("a", "b"), ()]
    # Execute
    dominant = dominant_genres(train, item_genres)
    # Assert: user0 a=1 b=1 tie -> a; user1 b=2; user2 no genre; user3 a=2
    assert dominant.tolist() == ["a", "b", "unknown", "a"]


def _mean_max_label_share(p: ClientPartition, label: np.ndarray) -> float:
    shares = []
    for c in range(p.n_clients):
        _, counts = np.unique(label[p.client_rows(c)], return_counts=True)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    # Prepare: 400 users spread evenly over 4 dominant genres, 4 silos
    train, genres = _genre_blocks(n_users=400, n_genres=4)
    label = dominant_genres(train, genres)
    # Execute
    skewed = partition_users(
        train, Partition.DIRICHLET, seed=0, n_silos=4, item_genres=genres, alpha=0.01
    )
    even = partition_users(
        train, Partition.DIRICHLET, seed=0, n_silos=4, item_genres=genres, alpha=100.0
    )
    # Assert: alpha=0.01 silos are dominated by one genre (a silo may still get two whole
    # genres); alpha=100 silos hold about a quarter of each genre
    _assert_exact_cover(skewed, 400)
    _assert_exact_cover(even, 400)
    skewed_share = _mean_max_label_share(skewed, label)
    even_share = _mean_max_label_share(even, label)
    assert skewed_share > even_share + 0.3
    assert even_share < 0.4


def test_dirichlet_fills_every_silo_and_is_seeded() -> None:
    # Prepare: one genre only, tiny alpha puts almost everyone in one silo
    train, genres = _genre_blocks(n_users=8, n_genres=1)
    # Execute
    p = partition_users(
        train, Partition.DIRICHLET, seed=4, n_silos=8, item_genres=genres, alpha=0.01
    )
    q = partition_users(
        train, Partition.DIRICHLET, seed=4, n_silos=8, item_genres=genres, alpha=0.01
    )
    # Assert
    assert p.sizes().tolist() == [1] * 8
    assert np.array_equal(p.rows, q.rows)


def test_save_load_round_trip(tmp_path: Path) -> None:
    # Prepare
    train = _csr([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1]])
    p = partition_users(train, Partition.SILOS, seed=0, n_silos=2)
    path = tmp_path / "run" / "partition.npz"
    # Execute
    p.save(path)
    loaded = ClientPartition.load(path)
    # Assert
    assert np.array_equal(loaded.offsets, p.offsets) and loaded.offsets.dtype == np.int64
    assert np.array_equal(loaded.rows, p.rows) and loaded.rows.dtype == np.int64
    assert loaded.labels == p.labels
    assert [q.name for q in path.parent.iterdir()] == ["partition.npz"]


def test_describe() -> None:
    # Prepare
    p = ClientPartition(offsets=np.array([0, 1, 4, 6]), rows=np.arange(6), labels=("a", "b", "c"))
    # Execute
    summary = describe(p)
    # Assert: sizes 1, 3, 2
    assert summary == {"n_clients": 3, "min_users": 1, "median_users": 2.0, "max_users": 3}


def test_partition_arrays_are_read_only() -> None:
    p = ClientPartition(offsets=np.array([0, 2]), rows=np.array([1, 0]), labels=("x",))
    with pytest.raises(ValueError):
        p.rows[0] = 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": Partition.SILOS, "n_silos": 0}, "n_silos"),
        ({"kind": Partition.SILOS, "n_silos": 5}, "n_silos"),
        ({"kind": Partition.DIRICHLET, "n_silos": 2}, "dirichlet partition needs item genres"),
        ({"kind": Partition.DIRICHLET, "alpha": 0.0}, "alpha"),
        ({"kind": Partition.DIRICHLET, "alpha": float("nan")}, "alpha"),
        ({"kind": Partition.DIRICHLET, "alpha": float("inf")}, "alpha"),
        ({"kind": Partition.SILOS, "user_attribute": np.array(["a"])}, "user_attribute"),
        ({"kind": Partition.DIRICHLET, "item_genres": [("a",)]}, "item_genres"),
        ({"kind": Partition.PER_USER, "user_labels": np.arange(2)}, "user_labels"),
        ({"kind": Partition.PER_USER, "max_clients": 0}, "max_clients"),
        ({"kind": Partition.PER_USER, "seed": -1}, "seed"),
        ({"kind": "federated"}, "federated"),
    ],
)
def test_bad_inputs_raise(kwargs: dict[str, object], match: str) -> None:
    # Prepare: 3 users, 2 items
    train = _csr([[1, 0], [0, 1], [1, 1]])
    args: dict[str, object] = {"seed": 0, **kwargs}
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        partition_users(train, **args)  # type: ignore[arg-type]


def test_train_must_be_sparse() -> None:
    with pytest.raises(ValueError, match="train"):
        partition_users(np.ones((2, 2)), Partition.PER_USER, seed=0)


@pytest.mark.parametrize(
    ("offsets", "rows", "labels"),
    [
        ([1, 2], [0, 1], ("a",)),  # offsets must start at 0
        ([0, 3], [0, 1], ("a",)),  # must end at len(rows)
        ([0, 2], [0, 0], ("a",)),  # a user twice
        ([0, 2], [0, 1], ("a", "b")),  # a label per client
    ],
)
def test_inconsistent_partition_is_rejected(
    offsets: list[int], rows: list[int], labels: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError):
        ClientPartition(offsets=np.array(offsets), rows=np.array(rows), labels=labels)

"""Strong generalization (Liang et al. 2018): disjoint users, 80/20 fold-in/holdout, seeded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from common.data import (
    CleaningReport,
    Dataset,
    export_split,
    load_dataset,
    split_strong_generalization,
)


def make_dataset(n_users: int, n_items: int = 40, seed: int = 1) -> Dataset:
    """User u has 3 + (u % 20) distinct random items (some below the 5-item holdout minimum)."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n_users, n_items), dtype=np.float32)
    for u in range(n_users):
        dense[u, rng.choice(n_items, size=3 + u % 20, replace=False)] = 1.0
    report = CleaningReport(int(dense.sum()), 0, 0, 0)
    return Dataset(
        name="toy",
        sha256="0" * 64,
        source=Path("toy.csv"),
        user_ids=np.array([f"u{u}" for u in range(n_users)]),
        item_ids=np.array([f"i{i}" for i in range(n_items)]),
        matrix=sp.csr_matrix(dense),
        user_features={},
        item_titles=np.array([f"T{i}" for i in range(n_items)]),
        item_genres=tuple(("A", "B") if i % 2 else () for i in range(n_items)),
        report=report,
        min_rating=4.0,
    )


def test_split_sizes_disjoint_and_rows_preserved() -> None:
    # Prepare
    ds = make_dataset(30)
    # Execute
    s = split_strong_generalization(ds, seed=3, n_heldout_users=5)
    # Assert
    assert (s.train_users.size, s.validation_users.size, s.test_users.size) == (20, 5, 5)
    groups = [set(s.train_users), set(s.validation_users), set(s.test_users)]
    assert set.union(*groups) == set(ds.user_ids) and sum(map(len, groups)) == 30
    train_rows = np.searchsorted(ds.user_ids, s.train_users, sorter=np.argsort(ds.user_ids))
    in_train = np.flatnonzero(ds.matrix[np.argsort(ds.user_ids)[train_rows]].getnnz(axis=0))
    assert s.item_index.tolist() == in_train.tolist()
    assert s.item_ids.tolist() == ds.item_ids[s.item_index].tolist()
    row_of = {u: k for k, u in enumerate(ds.user_ids)}
    for users, foldin, holdout in (
        (s.validation_users, s.validation_foldin, s.validation_holdout),
        (s.test_users, s.test_foldin, s.test_holdout),
    ):
        assert foldin.shape == holdout.shape == (5, s.item_ids.size)
        assert foldin.multiply(holdout).nnz == 0
        for k, user in enumerate(users):
            full = ds.matrix[row_of[user]].toarray()[0, s.item_index]
            assert np.array_equal((foldin[k] + holdout[k]).toarray()[0], full)
            n = int(full.sum())
            assert holdout[k].nnz == (int(0.2 * n) if n >= 5 else 0)


def test_split_is_deterministic_per_seed() -> None:
    ds = make_dataset(30)
    a = split_strong_generalization(ds, seed=7, n_heldout_users=5)
    b = split_strong_generalization(ds, seed=7, n_heldout_users=5)
    c = split_strong_generalization(ds, seed=8, n_heldout_users=5)
    assert a.test_users.tolist() == b.test_users.tolist()
    assert (a.test_holdout != b.test_holdout).nnz == 0
    assert (a.validation_holdout != b.validation_holdout).nnz == 0
    assert a.test_users.tolist() != c.test_users.tolist()


def test_default_heldout_counts() -> None:
    assert split_strong_generalization(make_dataset(300)).test_users.size == 100
    big = split_strong_generalization(make_dataset(2001, n_items=25))
    assert (big.validation_users.size, big.test_users.size) == (200, 200)
    assert (
        split_strong_generalization(
            make_dataset(2001, n_items=25), heldout_fraction=0.05
        ).test_users.size
        == 100
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"n_heldout_users": 15}, {"holdout_fraction": 1.0}, {"holdout_fraction": float("nan")}],
)
def test_bad_split_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"n_heldout_users|holdout_fraction"):
        split_strong_generalization(make_dataset(30), **kwargs)  # type: ignore[arg-type]


def test_default_heldout_needs_enough_users() -> None:
    with pytest.raises(ValueError, match="n_heldout_users"):
        split_strong_generalization(make_dataset(30))


def test_export_split_round_trips(tmp_path: Path) -> None:
    # Prepare
    ds = make_dataset(30)
    s = split_strong_generalization(ds, seed=0, n_heldout_users=5)
    # Execute
    paths = export_split(s, ds, tmp_path / "out")
    # Assert
    names = [p.name for p in paths]
    assert names == [
        "train.csv",
        "validation_foldin.csv",
        "validation_holdout.csv",
        "test_foldin.csv",
        "test_holdout.csv",
        "items.csv",
    ]
    with open(paths[4], newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["user_id", "item_id"] and len(rows) - 1 == s.test_holdout.nnz
    assert {r[0] for r in rows[1:]} <= set(s.test_users)
    with open(paths[5], newline="") as fh:
        items = list(csv.DictReader(fh))
    assert [r["item_id"] for r in items] == s.item_ids.tolist()
    assert {r["genres"] for r in items} == {"", "A|B"}
    train = load_dataset(paths[0], min_user_positives=1)
    assert train.min_rating is None and train.matrix.nnz == s.train.nnz
    assert sorted(train.user_ids) == sorted(s.train_users)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)

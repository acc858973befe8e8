"""The synthetic generator: seeded, power-law popularity, at least 5 items per user."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.data import load_dataset, synthesize


def test_synthesize_is_deterministic_and_readable(tmp_path: Path) -> None:
    a = synthesize(300, 200, seed=4, out_dir=tmp_path / "a")
    b = synthesize(300, 200, seed=4, out_dir=tmp_path / "b")
    c = synthesize(300, 200, seed=5, out_dir=tmp_path / "c")
    assert a.name == "interactions.csv"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    ds = load_dataset(tmp_path / "a")
    assert ds.n_users == 300 and ds.report.users_dropped == 0
    assert ds.report.duplicates_collapsed == 0 and ds.report.below_threshold_dropped == 0
    assert ds.user_features["group"][0].startswith("g")


def test_synthetic_counts_and_popularity(tmp_path: Path) -> None:
    ds = load_dataset(synthesize(2000, 500, seed=0, out_dir=tmp_path), min_user_positives=1)
    per_user = np.diff(ds.matrix.indptr)
    assert per_user.min() >= 5
    assert per_user.max() > 4 * np.median(per_user)  # heavy tail
    per_item = np.sort(ds.matrix.getnnz(axis=0))[::-1]
    top, bottom = per_item[:25].mean(), per_item[-250:].mean()
    assert top > 10 * bottom  # top 5% of items are far more popular than the bottom half

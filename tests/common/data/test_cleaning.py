"""Cleaning counts every removed row; the counts add up to the rows read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import load_dataset
from common.data.cleaning import clean
from common.data.types import RawInteractions


def raw(
    users: list[int], items: list[int], ratings: list[float] | None, times: list[float] | None
) -> RawInteractions:
    return RawInteractions(
        path=Path("x.csv"),
        users=np.array(users, dtype=np.int64),
        items=np.array(items, dtype=np.int64),
        ratings=None if ratings is None else np.array(ratings, dtype=np.float64),
        timestamps=None if times is None else np.array(times, dtype=np.float64),
    )


def test_duplicates_keep_latest_by_timestamp_then_last_row() -> None:
    # item 1: 5 at t=3 beats 1 at t=2 (older); item 2: 1 then 5 at equal t (last row wins)
    r = raw([1, 1, 1, 1], [1, 1, 2, 2], [5, 1, 1, 5], [3, 2, 7, 7])
    out = clean(r, min_rating=4, min_user_positives=1)
    assert out.matrix.toarray().tolist() == [[1.0, 1.0]]
    assert out.report.duplicates_collapsed == 2


def test_duplicates_without_timestamps_keep_last_row() -> None:
    out = clean(raw([1, 1, 1], [1, 1, 2], [5, 1, 5], None), min_rating=4, min_user_positives=1)
    assert out.item_ids.tolist() == ["2"]
    assert out.report.duplicates_collapsed == 1 and out.report.below_threshold_dropped == 1


def test_counts_partition_the_rows(tmp_path: Path) -> None:
    # Prepare: user 1 has 5 positives; user 2 has 2, a 3 and junk ratings; user 3 junk only
    lines = [f"1,{i},5,{i}" for i in range(5)]
    lines += ["2,1,4,1", "2,2,4.5,2", "2,3,3,3", "2,4,abc,4", "2,5,,5", "2,6,inf,6", "3,1,nan,1"]
    lines += ["1,0,5,99"]  # duplicate of (1, 0)
    path = tmp_path / "x.csv"
    path.write_text("\n".join(lines) + "\n")
    # Execute
    ds = load_dataset(path, min_rating=4.0, min_user_positives=3)
    # Assert
    report = ds.report.as_dict()
    bad = {reason: b for reason, b in report.pop("bad_rows").items() if b["count"]}
    assert report == {
        "rows_read": 13,
        "below_threshold_dropped": 1,
        "users_dropped": 2,
        "rows_of_dropped_users": 2,
        "bad_rows_dropped": 5,
        "id_types": {"user": "integer", "item": "integer"},
    }
    assert bad == {
        "bad_rating": {"count": 4, "first": ["x.csv:9", "x.csv:10", "x.csv:11", "x.csv:12"]},
        "duplicate": {"count": 1, "first": ["x.csv:13"]},
    }
    assert ds.report.duplicates_collapsed == 1
    dropped = sum(report[k] for k in ("bad_rows_dropped", "below_threshold_dropped"))
    dropped += report["rows_of_dropped_users"]
    assert dropped + ds.matrix.nnz == report["rows_read"]
    assert ds.user_ids.tolist() == ["1"] and ds.matrix.nnz == 5


def test_threshold_is_inclusive_and_items_without_positives_vanish() -> None:
    out = clean(
        raw([1, 1, 1], [1, 2, 3], [4.0, 3.99, 5.0], None), min_rating=4, min_user_positives=1
    )
    assert out.item_ids.tolist() == ["1", "3"]


@pytest.mark.parametrize(("min_rating", "min_pos"), [(float("nan"), 5), (4.0, 0)])
def test_bad_parameters_raise_value_error(min_rating: float, min_pos: int) -> None:
    with pytest.raises(ValueError, match="min_"):
        clean(raw([1], [1], [5], None), min_rating=min_rating, min_user_positives=min_pos)

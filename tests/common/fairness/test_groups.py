"""Tests for common.fairness.groups: hand-worked user groups, bootstrap intervals and gaps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.fairness.groups import (
    AGE_BUCKETS,
    activity_quartiles,
    age_bucket,
    bootstrap_ci,
    group_table,
    user_groups,
)

# --- user groups ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bucket"),
    [
        # ML-1M codes (users.dat): each is the lower bound of its bucket
        ("1", "<18"),
        ("18", "18-24"),
        ("25", "25-34"),
        ("35", "35-44"),
        ("45", "45-49"),
        ("50", "50-55"),
        ("56", "56+"),
        # ML-100K raw ages, including the bucket edges
        ("7", "<18"),
        ("17", "<18"),
        ("24", "18-24"),
        ("24.5", "18-24"),
        ("25.0", "25-34"),
        ("34", "25-34"),
        ("44", "35-44"),
        ("49", "45-49"),
        ("55", "50-55"),
        ("73", "56+"),
        (" 30 ", "25-34"),
        # unknown
        ("", ""),
        ("abc", ""),
        ("nan", ""),
        ("inf", ""),
        ("0", ""),
        ("-3", ""),
    ],
)
def test_age_bucket(value: str, bucket: str) -> None:
    assert age_bucket(value) == bucket


def test_age_buckets_are_the_seven_ml1m_groups() -> None:
    assert AGE_BUCKETS == ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


def test_activity_quartiles_on_eight_users() -> None:
    # Stable order by count: user 1 (1), 6 (2), 3 (3), 4 (3), 0 (5), 7 (7), 2 (8), 5 (10),
    # ranks 0..7; quartile = floor(4 r / 8) = r // 2.
    counts = np.array([5, 1, 8, 3, 3, 10, 2, 7])
    labels = activity_quartiles(counts)
    assert labels.tolist() == ["Q3", "Q1", "Q4", "Q2", "Q2", "Q4", "Q1", "Q3"]


def test_activity_quartiles_ties_split_by_index_into_equal_groups() -> None:
    labels = activity_quartiles(np.full(8, 4))
    assert labels.tolist() == ["Q1", "Q1", "Q2", "Q2", "Q3", "Q3", "Q4", "Q4"]
    # U = 5: ranks 0..4 -> floor(4 r / 5) = 0, 0, 1, 2, 3
    assert activity_quartiles(np.arange(5)).tolist() == ["Q1", "Q1", "Q2", "Q3", "Q4"]


def test_activity_quartiles_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="n_interactions"):
        activity_quartiles(np.array([1, -1]))


def test_user_groups_buckets_ages_and_skips_other_attributes() -> None:
    features = {
        "gender": np.array(["M", "F", "", "F"]),
        "age": np.array(["1", "35", "", "24"]),
        "zip_code": np.array(["1", "2", "3", "4"]),
    }
    groups = user_groups(features, np.array([10, 20, 30, 40]))
    assert set(groups) == {"gender", "age", "activity"}
    assert groups["gender"].tolist() == ["M", "F", "", "F"]
    assert groups["age"].tolist() == ["<18", "35-44", "", "18-24"]
    assert groups["activity"].tolist() == ["Q1", "Q2", "Q3", "Q4"]


def test_user_groups_rejects_misaligned_features() -> None:
    with pytest.raises(ValueError, match="occupation"):
        user_groups({"occupation": np.array(["1", "2"])}, np.array([1, 2, 3]))


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_ci_of_two_values_by_hand() -> None:
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    # 95 %: the 2.5 % quantile is 0 and the 97.5 % quantile is 1.
    # 40 %: the 30 % and 70 % quantiles both fall in the middle half: 0.5.
    assert bootstrap_ci(np.array([0.0, 1.0]), n_boot=4000) == (0.0, 1.0)
    assert bootstrap_ci(np.array([0.0, 1.0]), n_boot=4000, level=0.4) == (0.5, 0.5)


def test_bootstrap_ci_ignores_nan_and_is_deterministic() -> None:
    x = np.random.default_rng(1).random(50)
    with_nan = np.concatenate([x, [np.nan, np.nan]])
    assert bootstrap_ci(with_nan, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    assert bootstrap_ci(np.full(5, 0.3)) == pytest.approx((0.3, 0.3))
    lo, hi = bootstrap_ci(np.array([np.nan]))
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # The width of the interval of a mean scales as 1/sqrt(n): 10x narrower for 100x the users.
    assert (hi_l - lo_l) < 0.2 * (hi_s - lo_s)


@pytest.mark.parametrize(("n_boot", "level"), [(0, 0.95), (10, 0.0), (10, 1.0), (10, math.nan)])
def test_bootstrap_ci_rejects_bad_parameters(n_boot: int, level: float) -> None:
    with pytest.raises(ValueError, match=r"n_boot|level"):
        bootstrap_ci(np.ones(3), n_boot=n_boot, level=level)


def test_group_table_means_gap_and_interval() -> None:
    # a: 0.2, 0.4, 0.6 (mean 0.4); b: 0.1 (a single user: interval [0.1, 0.1]);
    # '' (unknown) and NaN are left out. Gap = 0.4 - 0.1 = 0.3, a high, b low.
    values = np.array([0.2, 0.4, 0.6, 0.1, 0.9, np.nan])
    groups = np.array(["a", "a", "a", "b", "", "b"])
    table = group_table(values, groups, n_boot=500)
    assert list(table["groups"]) == ["a", "b"]
    a, b = table["groups"]["a"], table["groups"]["b"]
    assert (a["n"], b["n"]) == (3, 1)
    assert a["mean"] == pytest.approx(0.4) and b["mean"] == pytest.approx(0.1)
    assert a["ci"][0] < 0.4 < a["ci"][1] and b["ci"] == pytest.approx([0.1, 0.1])
    gap = table["gap"]
    assert gap is not None
    assert (gap["high"], gap["low"]) == ("a", "b")
    assert gap["value"] == pytest.approx(0.3)
    # b is fixed, so the gap's interval is a's interval shifted by -0.1.
    assert gap["ci"] == pytest.approx([a["ci"][0] - 0.1, a["ci"][1] - 0.1])
    assert gap["ci"][0] < 0.3 < gap["ci"][1]
    json.dumps(table, allow_nan=False)  # JSON-ready: plain numbers


def test_group_table_order_min_users_and_single_group() -> None:
    values = np.ones(7)
    ages = np.array(["18-24", "<18", "56+", "18-24", "<18", "25-34", "18-24"])
    table = group_table(values, ages, n_boot=10)
    assert list(table["groups"]) == ["<18", "18-24", "25-34", "56+"]  # age order, not "1" < "<"
    occupations = np.array(["10", "2", "0", "2", "10", "10", "x"])
    table = group_table(values, occupations, n_boot=10, min_users=2)
    assert list(table["groups"]) == ["2", "10"]  # numeric order; "0" and "x" have 1 user
    table = group_table(values, np.array(["M"] * 7), n_boot=10)
    assert list(table["groups"]) == ["M"] and table["gap"] is None


def test_group_table_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="groups"):
        group_table(np.ones(3), np.array(["a", "b"]))


def test_the_largest_gap_leaves_out_groups_too_small_to_count() -> None:
    # a: 10 users at 0.5; b: 10 at 0.3; c: one user at 1.0 (listed, but not in the gap)
    values = np.array([0.5] * 10 + [0.3] * 10 + [1.0])
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"])
    table = group_table(values, labels, n_boot=50, gap_min_users=10)
    assert set(table["groups"]) == {"a", "b", "c"}
    assert table["gap"] is not None
    assert (table["gap"]["high"], table["gap"]["low"]) == ("a", "b")
    assert table["gap"]["value"] == pytest.approx(0.2)
    assert group_table(values, labels, n_boot=50)["gap"]["high"] == "c"

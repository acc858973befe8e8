"""Tests for common.fairness.metrics: hand-worked groups, exposure, diversity and calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from common.fairness.metrics import (
    AGE_BUCKETS,
    activity_quartiles,
    age_bucket,
    assess,
    bootstrap_ci,
    coverage,
    exposure_gini,
    genre_matrix,
    genre_mix,
    gini,
    group_table,
    intra_list_diversity,
    long_tail_mask,
    long_tail_share,
    mean_popularity,
    miscalibration,
    per_user_metrics,
    user_groups,
)
from common.metrics import coverage_at_k, mask_foldin_inplace, ndcg_at_k, topk_indices


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    m = np.zeros((len(rows), n_items))
    for u, items in enumerate(rows):
        m[u, items] = 1.0
    return sp.csr_matrix(m)


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


# --- items ----------------------------------------------------------------------------------


def test_coverage_of_two_lists_over_five_items() -> None:
    # Items 0, 1, 3 appear; 2 and 4 never: 3 / 5.
    assert coverage(np.array([[0, 1], [1, 3]]), 5) == pytest.approx(0.6)


def test_coverage_agrees_with_common_metrics() -> None:
    scores = np.random.default_rng(0).normal(size=(30, 50))
    for k in (1, 5, 20):
        assert coverage(topk_indices(scores, k), 50) == pytest.approx(coverage_at_k(scores, k))


def test_coverage_rejects_out_of_range_items() -> None:
    with pytest.raises(ValueError, match="topk"):
        coverage(np.array([[0, 5]]), 5)


def test_gini_by_hand() -> None:
    # [0, 0, 0, 1]: n = 4, weights 2i - n - 1 = -3, -1, 1, 3: G = 3 * 1 / (4 * 1) = 0.75
    assert gini(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert gini(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.75)  # order does not matter
    # Equal values: the weights sum to 0.
    assert gini(np.full(4, 2.0)) == pytest.approx(0.0)
    # [1, 2, 3]: weights -2, 0, 2: G = (-2 + 0 + 6) / (3 * 6) = 2/9
    assert gini(np.array([3.0, 1.0, 2.0])) == pytest.approx(2.0 / 9.0)
    assert gini(np.zeros(3)) == 0.0


def test_gini_rejects_negative_or_empty() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        gini(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="at least one"):
        gini(np.array([]))


def test_exposure_gini_counts_unrecommended_items_as_zero() -> None:
    # Exposure over 4 items: [2, 1, 1, 0]; sorted [0, 1, 1, 2], weights -3, -1, 1, 3:
    # G = (0 - 1 + 1 + 6) / (4 * 4) = 0.375
    assert exposure_gini(np.array([[0, 1], [0, 2]]), 4) == pytest.approx(0.375)
    # Every item shown once: perfectly equal.
    assert exposure_gini(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)


def test_mean_popularity_on_five_items() -> None:
    # 4 training users: popularity [4, 2, 1, 1, 0] / 4 = [1, 0.5, 0.25, 0.25, 0].
    # List means: (1 + 0.5) / 2 = 0.75 and (0.25 + 0) / 2 = 0.125; average 0.4375.
    counts = np.array([4, 2, 1, 1, 0])
    assert mean_popularity(np.array([[0, 1], [2, 4]]), counts, 4) == pytest.approx(0.4375)
    with pytest.raises(ValueError, match="n_users"):
        mean_popularity(np.array([[0, 1]]), counts, 3)  # item 0 has more users than exist


def test_long_tail_mask_and_share_on_five_items() -> None:
    counts = np.array([4, 2, 1, 1, 0])
    # head = round(0.2 * 5) = 1 item: item 0.
    tail = long_tail_mask(counts)
    assert tail.tolist() == [False, True, True, True, True]
    # Slots 0, 1, 2, 4: three of four are long-tail.
    assert long_tail_share(np.array([[0, 1], [2, 4]]), tail) == pytest.approx(0.75)
    # head = round(0.4 * 5) = 2: items 1 and 2 (the two 3s).
    assert long_tail_mask(np.array([1, 3, 3, 0, 0]), head_share=0.4).tolist() == [
        True,
        False,
        False,
        True,
        True,
    ]
    # A tie at the head boundary goes to the lower index.
    assert long_tail_mask(np.array([3, 3, 1, 0, 0])).tolist() == [False, True, True, True, True]
    with pytest.raises(ValueError, match="head_share"):
        long_tail_mask(counts, head_share=1.5)


# --- genres ---------------------------------------------------------------------------------


def test_genre_matrix_rows_and_sorted_names() -> None:
    mat, names = genre_matrix([("Drama", "Comedy"), ("Drama", "Drama"), (), ("",)])
    assert names == ["Comedy", "Drama"]
    assert mat.tolist() == [[0.5, 0.5], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


# Items 0, 2, 3: genre A; item 1: genre B; item 4: no genre.
GENRES, _ = genre_matrix([("A",), ("B",), ("A",), ("A",), ()])


def test_genre_mix_of_history_and_lists() -> None:
    # User 0 has items 0, 1, 4: item 4 has no genre, so p = mean over items 0 and 1 = (0.5, 0.5).
    history = _csr([[0, 1, 4], [4]], 5)
    assert genre_mix(history, GENRES).tolist() == [[0.5, 0.5], [0.0, 0.0]]
    assert genre_mix(np.array([[2, 3], [1, 2]]), GENRES).tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_miscalibration_two_genres_by_hand() -> None:
    # History {0, 1}: p = (0.5, 0.5). List [2, 3]: q = (1, 0).
    # q~ = 0.99 q + 0.01 p = (0.995, 0.005).
    # KL = 0.5 ln(0.5 / 0.995) + 0.5 ln(0.5 / 0.005) = 0.5 (-0.688135) + 0.5 (4.605170)
    #    = 1.958518
    history = _csr([[0, 1]], 5)
    kl = miscalibration(history, np.array([[2, 3]]), GENRES)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.995) + 0.5 * math.log(100.0))
    assert kl[0] == pytest.approx(1.958518, abs=1e-6)


def test_miscalibration_zero_when_calibrated_nan_without_history_genres() -> None:
    # Row 0: list [1, 2] has q = p = (0.5, 0.5): KL 0. Row 1: history only item 4: NaN.
    # Row 2: history all A (p = (1, 0)), list all B: only the A term, ln(1 / q~_A) = ln(1/0.01).
    history = _csr([[0, 1], [4], [0]], 5)
    kl = miscalibration(history, np.array([[1, 2], [0, 1], [1, 1]]), GENRES)
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(kl[1])
    assert kl[2] == pytest.approx(math.log(100.0))
    with pytest.raises(ValueError, match="alpha"):
        miscalibration(history, np.array([[1, 2], [0, 1], [1, 1]]), GENRES, alpha=0.0)


def test_intra_list_diversity_identical_orthogonal_and_mixed() -> None:
    mat, _ = genre_matrix([("A",), ("A",), ("B",), ("A", "B"), ()])
    lists = np.array(
        [
            [0, 1, 0],  # all A: distance 0
            [0, 2, 2],  # A, B, B: pairs (A,B) 1, (A,B) 1, (B,B) 0: mean 2/3
            [0, 4, 2],  # the genre-less item is left out: one pair (A, B): 1
            [0, 3, 4],  # A and (A, B): cosine 1/sqrt(2)
            [4, 4, 0],  # one item with a genre: no pair, NaN
        ]
    )
    ild = intra_list_diversity(lists, mat)
    assert ild[:4] == pytest.approx([0.0, 2.0 / 3.0, 1.0, 1.0 - 1.0 / math.sqrt(2.0)])
    assert math.isnan(ild[4])
    assert intra_list_diversity(np.array([[0, 2]]), mat)[0] == pytest.approx(1.0)  # orthogonal


# --- assess ---------------------------------------------------------------------------------

# 24 items, 0..11 genre A, 12..23 genre B. Every user ranks items by index (item 0 best), so a
# user's top 20 is the first 20 items not folded in.
N_ITEMS = 24
TOY_GENRES, _ = genre_matrix([("A",)] * 12 + [("B",)] * 12)
FOLDIN = _csr([[0, 1], [12, 13], [0, 12], [22, 23]], N_ITEMS)
HELDOUT = _csr([[2, 23], [5], [], [0, 21]], N_ITEMS)


def _toy_scores() -> np.ndarray:
    scores = np.tile(-np.arange(N_ITEMS, dtype=np.float64), (4, 1))
    mask_foldin_inplace(scores, FOLDIN)
    return scores


def test_assess_end_to_end_on_a_toy() -> None:
    scores = _toy_scores()
    groups = {"gender": np.array(["F", "F", "M", ""])}
    counts = np.arange(N_ITEMS) % 5  # 0..4 of 4 training users
    result = assess(
        scores,
        HELDOUT,
        FOLDIN,
        groups=groups,
        item_counts=counts,
        n_train_users=4,
        genre_mat=TOY_GENRES,
        n_boot=200,
    )
    json.dumps(result, allow_nan=False)

    # Recall@20: user 0 hits item 2 of {2, 23}: 1/2; user 1 hits 5: 1; user 2 has no held-out
    # item (NaN, left out); user 3 (unknown gender) is in no group.
    recall = result["users"]["recall@20"]["gender"]
    assert list(recall["groups"]) == ["F"]  # M's only user has no held-out item
    assert recall["groups"]["F"]["mean"] == pytest.approx(0.75)
    assert recall["groups"]["F"]["n"] == 2
    ndcg = result["users"]["ndcg@100"]["gender"]["groups"]["F"]["mean"]
    assert ndcg == pytest.approx(float(np.nanmean(ndcg_at_k(scores[:2], HELDOUT[:2], 100))))

    # Lists: user 0 items 2..21, user 1 0..11 + 14..21, user 2 1..11 + 13..21,
    # user 3 0..19: all 24 items but 22 and 23 are in a top 20.
    items = result["items"]
    assert items["coverage@20"] == pytest.approx(22 / 24)
    assert items["coverage@100"] == pytest.approx(1.0)
    top20 = topk_indices(scores, 20)
    assert items["gini@20"] == pytest.approx(exposure_gini(top20, N_ITEMS))
    assert items["gini@100"] is None  # no user has 100 candidates among 24 items
    assert items["popularity@20"] == pytest.approx(mean_popularity(top20, counts, 4))
    assert items["long_tail@20"] == pytest.approx(long_tail_share(top20, long_tail_mask(counts)))

    genres = result["genres"]
    assert genres is not None
    # User 1: history all B, p = (0, 1); list 12 A + 8 B, q = (0.6, 0.4);
    # q~_B = 0.99 * 0.4 + 0.01 = 0.406: KL = ln(1 / 0.406).
    per_user = per_user_metrics(scores, HELDOUT, FOLDIN, genre_mat=TOY_GENRES)
    assert per_user["miscalibration@20"][1] == pytest.approx(math.log(1 / 0.406))
    assert genres["miscalibration@20"] == pytest.approx(per_user["miscalibration@20"].mean())
    assert genres["diversity@20"] == pytest.approx(per_user["diversity@20"].mean())
    by_gender = genres["miscalibration_by_group"]["gender"]["groups"]
    assert list(by_gender) == ["F", "M"]
    assert by_gender["M"]["mean"] == pytest.approx(per_user["miscalibration@20"][2])


def test_assess_without_genres_and_unmasked_scores() -> None:
    scores = _toy_scores()
    result = assess(
        scores,
        HELDOUT,
        FOLDIN,
        groups={},
        item_counts=None,
        n_train_users=0,
        genre_mat=None,
        n_boot=10,
    )
    assert result["genres"] is None and result["users"]["ndcg@100"] == {}
    assert result["items"]["popularity@20"] is None and result["items"]["long_tail@20"] is None
    assert result["items"]["coverage@20"] == pytest.approx(22 / 24)
    per_user = per_user_metrics(scores, HELDOUT, FOLDIN, genre_mat=None)
    assert np.isnan(per_user["diversity@20"]).all()
    with pytest.raises(ValueError, match="fold-in"):
        per_user_metrics(np.zeros((4, N_ITEMS)), HELDOUT, FOLDIN, genre_mat=None)


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

"""Tests for common.fairness.exposure: hand-worked coverage, Gini, popularity and long tail."""

from __future__ import annotations

import numpy as np
import pytest

from common.fairness.exposure import (
    coverage,
    exposure_gini,
    gini,
    long_tail_mask,
    long_tail_share,
    mean_popularity,
)
from common.metrics import coverage_at_k, topk_indices


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

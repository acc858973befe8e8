"""Tests for common.fairness.genres: hand-worked genre mixes, diversity and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from common.fairness.genres import genre_matrix, genre_mix, intra_list_diversity, miscalibration


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    m = np.zeros((len(rows), n_items))
    for u, items in enumerate(rows):
        m[u, items] = 1.0
    return sp.csr_matrix(m)


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

"""Tests for simulations.baselines: popularity order and EASE against an explicit inverse."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from simulations.baselines import EASE, Popularity

# 4 users x 3 items; item counts: item 0 -> 3, item 1 -> 1, item 2 -> 2
TRAIN = sp.csr_matrix(
    np.array(
        [
            [1, 0, 1],
            [1, 1, 0],
            [1, 0, 1],
            [0, 0, 0],
        ],
        dtype=np.float64,
    )
)


def test_popularity_counts_and_order() -> None:
    model = Popularity().fit(TRAIN)
    scores = model.score(sp.csr_matrix(np.zeros((2, 3))))
    assert scores.shape == (2, 3)
    assert scores[0].tolist() == [3.0, 1.0, 2.0]
    assert np.argsort(-scores[1]).tolist() == [0, 2, 1]
    scores[0, 0] = -np.inf  # the returned array is the caller's to mask
    assert model.score(TRAIN[:1])[0, 0] == 3.0


def test_popularity_state_round_trip() -> None:
    model = Popularity().fit(TRAIN)
    again = Popularity.from_state(model.state_dict())
    np.testing.assert_array_equal(again.score(TRAIN), model.score(TRAIN))


def test_ease_matches_explicit_inverse() -> None:
    # Prepare: G = X^T X + lam I with X^T X = [[3,1,2],[1,1,0],[2,0,2]], lam = 1
    lam = 1.0
    G = np.array([[4.0, 1.0, 2.0], [1.0, 2.0, 0.0], [2.0, 0.0, 3.0]])
    P = np.linalg.inv(G)
    expected = -P / np.diag(P)  # B_ij = -P_ij / P_jj (broadcast over columns)
    np.fill_diagonal(expected, 0.0)
    # Execute
    model = EASE(lam=lam).fit(TRAIN)
    # Assert
    assert model.weights is not None
    np.testing.assert_allclose(model.weights, expected, atol=1e-12)
    assert np.all(np.diag(model.weights) == 0.0)
    x = np.array([[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(model.score(sp.csr_matrix(x)), x @ expected, atol=1e-12)


def test_ease_closed_form_hand_value() -> None:
    # Hand check of one entry: det(G) = 4*(6-0) - 1*(3-0) + 2*(0-4) = 13;
    # P = adj(G)/13 with P_00 = 6/13, P_10 = -3/13 (cofactor), so B_10 = -P_10 / P_00 = 3/6 = 0.5
    model = EASE(lam=1.0).fit(TRAIN)
    assert model.weights is not None
    assert model.weights[1, 0] == pytest.approx(0.5)


def test_ease_state_and_errors() -> None:
    model = EASE(lam=2.0).fit(TRAIN)
    again = EASE.from_state(model.state_dict())
    assert again.lam == 2.0
    np.testing.assert_array_equal(again.score(TRAIN), model.score(TRAIN))
    with pytest.raises(ValueError, match="lam"):
        EASE(lam=0.0)
    with pytest.raises(ValueError, match="before fit"):
        EASE().score(TRAIN)
    with pytest.raises(ValueError, match="items"):
        model.score(sp.csr_matrix(np.zeros((1, 4))))

"""Tests for common.metrics: hand-worked cases and agreement with the vae_cf reference code."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import scipy.sparse as sp

from common.metrics import (
    coverage_at_k,
    evaluate,
    mask_foldin_inplace,
    ndcg_at_k,
    recall_at_k,
    topk_indices,
)

# One user, 5 items. Ranking by score: item 0 (rank 0), 2 (rank 1), 4 (rank 2), 3 (rank 3), 1.
SCORES = np.array([[0.9, 0.1, 0.8, 0.3, 0.5]])
LOG2_3 = math.log2(3.0)


def _csr(rows: list[list[int]], n_items: int = 5) -> sp.csr_matrix:
    m = np.zeros((len(rows), n_items))
    for u, items in enumerate(rows):
        m[u, items] = 1.0
    return sp.csr_matrix(m)


def test_topk_indices_sorted_best_first() -> None:
    assert topk_indices(SCORES, 3).tolist() == [[0, 2, 4]]
    assert topk_indices(SCORES, 10).tolist() == [[0, 2, 4, 3, 1]]  # k > n_items: whole ranking


def test_ndcg_and_recall_hand_computed() -> None:
    heldout = _csr([[2, 3]])
    # k=3: top 3 = (0, 2, 4), one hit at rank 1.
    #   DCG = 1/log2(3); IDCG = 1/log2(2) + 1/log2(3) = 1 + 1/log2(3)
    #   NDCG = (1/log2 3) / (1 + 1/log2 3) = 0.6309 / 1.6309 = 0.3869
    #   Recall = 1 / min(3, 2) = 0.5
    assert ndcg_at_k(SCORES, heldout, 3)[0] == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))
    assert recall_at_k(SCORES, heldout, 3)[0] == pytest.approx(0.5)
    # k=4: hits at ranks 1 and 3: DCG = 1/log2(3) + 1/log2(5); IDCG as above; Recall = 2/2
    expected = (1 / LOG2_3 + 1 / math.log2(5)) / (1 + 1 / LOG2_3)
    assert ndcg_at_k(SCORES, heldout, 4)[0] == pytest.approx(expected)
    assert recall_at_k(SCORES, heldout, 4)[0] == pytest.approx(1.0)
    # k=1: top 1 = (0), no hit
    assert ndcg_at_k(SCORES, heldout, 1)[0] == 0.0
    assert recall_at_k(SCORES, heldout, 1)[0] == 0.0


def test_fewer_heldout_than_k_uses_min_denominator() -> None:
    # One held-out item (4) at rank 2, k=3: Recall = 1 / min(3, 1) = 1 (not 1/3);
    # NDCG = (1/log2(4)) / (1/log2(2)) = 0.5
    heldout = _csr([[4]])
    assert recall_at_k(SCORES, heldout, 3)[0] == pytest.approx(1.0)
    assert ndcg_at_k(SCORES, heldout, 3)[0] == pytest.approx(0.5)


def test_foldin_items_are_masked() -> None:
    # Fold-in items 0 and 2 (the two best) go to -inf; new ranking: 4, 3, 1, then 0/2.
    scores = SCORES.copy()
    mask_foldin_inplace(scores, _csr([[0, 2]]))
    assert np.isneginf(scores[0, [0, 2]]).all() and np.isfinite(scores[0, [1, 3, 4]]).all()
    heldout = _csr([[3]])
    # k=1: top = (4), miss. k=2: hit at rank 1: Recall = 1/min(2,1) = 1, NDCG = 1/log2(3)
    assert recall_at_k(scores, heldout, 1)[0] == 0.0
    assert recall_at_k(scores, heldout, 2)[0] == pytest.approx(1.0)
    assert ndcg_at_k(scores, heldout, 2)[0] == pytest.approx(1 / LOG2_3)


def test_empty_heldout_user_is_nan() -> None:
    scores = np.vstack([SCORES, SCORES])
    heldout = _csr([[2], []])
    ndcg = ndcg_at_k(scores, heldout, 3)
    recall = recall_at_k(scores, heldout, 3)
    assert ndcg[0] == pytest.approx(1 / LOG2_3) and math.isnan(ndcg[1])
    assert recall[0] == 1.0 and math.isnan(recall[1])


def test_explicit_zero_in_heldout_is_not_an_item() -> None:
    heldout = sp.csr_matrix(
        (np.array([1.0, 0.0]), np.array([2, 0]), np.array([0, 2])), shape=(1, 5)
    )
    # Only item 2 is held out (the stored 0 at item 0 is ignored): hit at rank 1, IDCG = 1
    assert ndcg_at_k(SCORES, heldout, 2)[0] == pytest.approx(1 / LOG2_3)


def test_coverage_hand_computed() -> None:
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # k=1: items {0, 3} of 4 -> 0.5; k=2: {0, 1, 2, 3} -> 1.0; of a catalogue of 8: 0.25
    assert coverage_at_k(scores, 1) == 0.5
    assert coverage_at_k(scores, 2) == 1.0
    assert coverage_at_k(scores, 1, n_items=8) == 0.25
    # A masked item filling a short list does not count: user 0 has 1 candidate, k=2
    masked = np.array([[5.0, -np.inf, -np.inf, -np.inf]])
    assert coverage_at_k(masked, 2) == 0.25


def test_bad_k_and_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="k"):
        ndcg_at_k(SCORES, _csr([[1]]), 0)
    with pytest.raises(ValueError, match="heldout"):
        recall_at_k(SCORES, _csr([[1]], n_items=4), 2)


def test_evaluate_hand_computed_and_batched() -> None:
    # Every user gets the same raw scores; evaluate masks each user's fold-in.
    foldin = _csr([[0, 2], [], [1], [3]])
    heldout = _csr([[3], [2, 3], [], [0]])

    def score_fn(batch: sp.csr_matrix) -> npt.NDArray[np.float64]:
        return np.tile(SCORES, (batch.shape[0], 1))  # (B, 5)

    got = evaluate(score_fn, foldin, heldout, ks=(1, 2), batch_size=3)
    # Rankings after masking: u0: 4, 3, ...; u1: 0, 2, ...; u2 skipped; u3: 0, 2, ...
    # Recall@1 = mean(0, 0/1, 1) = 1/3. Recall@2 = mean(1/min(2,1), 1/2, 1) = 5/6.
    # NDCG@2: u0 hit at rank 1: (1/log2 3) / 1; u1 hit at rank 1: (1/log2 3) / (1 + 1/log2 3);
    # u3 hit at rank 0: 1 / 1. Mean = (0.6309 + 0.3869 + 1) / 3 = 0.6726
    assert got["recall@1"] == pytest.approx(1 / 3)
    assert got["recall@2"] == pytest.approx(5 / 6)
    expected_ndcg2 = (1 / LOG2_3 + (1 / LOG2_3) / (1 + 1 / LOG2_3) + 1.0) / 3
    assert got["ndcg@2"] == pytest.approx(expected_ndcg2)
    assert got["n_users"] == 3
    # Coverage@1 over all four users: tops are 4, 0, 0, 0 -> {0, 4} of 5
    assert got["coverage@1"] == pytest.approx(2 / 5)
    # Same answer unbatched
    assert evaluate(score_fn, foldin, heldout, ks=(1, 2), batch_size=100) == got


def test_evaluate_rejects_no_heldout_and_nan_scores() -> None:
    foldin = _csr([[0]])
    with pytest.raises(ValueError, match="held-out"):
        evaluate(lambda b: np.tile(SCORES, (b.shape[0], 1)), foldin, _csr([[]]), ks=(2,))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(lambda b: np.full((b.shape[0], 5), np.nan), foldin, _csr([[1]]), ks=(2,))


# --- The vae_cf reference (Liang et al. 2018 notebook), with np.argpartition for bn.argpartition
# and argument names lower-cased for the linter.


def _reference_ndcg(x_pred: np.ndarray, heldout_batch: sp.csr_matrix, k: int) -> np.ndarray:
    batch_users = x_pred.shape[0]
    idx_topk_part = np.argpartition(-x_pred, k, axis=1)
    topk_part = x_pred[np.arange(batch_users)[:, np.newaxis], idx_topk_part[:, :k]]
    idx_part = np.argsort(-topk_part, axis=1)
    idx_topk = idx_topk_part[np.arange(batch_users)[:, np.newaxis], idx_part]
    tp = 1.0 / np.log2(np.arange(2, k + 2))
    DCG = (heldout_batch[np.arange(batch_users)[:, np.newaxis], idx_topk].toarray() * tp).sum(
        axis=1
    )
    IDCG = np.array([(tp[: min(n, k)]).sum() for n in heldout_batch.getnnz(axis=1)])
    return DCG / IDCG


def _reference_recall(x_pred: np.ndarray, heldout_batch: sp.csr_matrix, k: int) -> np.ndarray:
    batch_users = x_pred.shape[0]
    idx = np.argpartition(-x_pred, k, axis=1)
    pred_binary = np.zeros_like(x_pred, dtype=bool)
    pred_binary[np.arange(batch_users)[:, np.newaxis], idx[:, :k]] = True
    x_true_binary = (heldout_batch > 0).toarray()
    tmp = (np.logical_and(x_true_binary, pred_binary).sum(axis=1)).astype(np.float32)
    return tmp / np.minimum(k, x_true_binary.sum(axis=1))


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_matches_reference_on_random_data(k: int) -> None:
    rng = np.random.default_rng(k)
    n_users, n_items = 40, 120
    foldin = sp.csr_matrix((rng.random((n_users, n_items)) < 0.1).astype(np.float64))
    held = (rng.random((n_users, n_items)) < 0.08) & (foldin.toarray() == 0)
    held[np.arange(n_users), rng.integers(0, n_items, n_users)] = True  # >= 1 per user
    held &= foldin.toarray() == 0
    keep = held.sum(axis=1) > 0
    heldout = sp.csr_matrix(held[keep].astype(np.float64))
    scores = rng.normal(size=(n_users, n_items))[keep]
    mask_foldin_inplace(scores, foldin[np.flatnonzero(keep)])

    np.testing.assert_allclose(ndcg_at_k(scores, heldout, k), _reference_ndcg(scores, heldout, k))
    np.testing.assert_allclose(
        recall_at_k(scores, heldout, k), _reference_recall(scores, heldout, k), rtol=1e-6
    )

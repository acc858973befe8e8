"""Tests for common.fairness.rerank: hand-worked greedy steps and the pure-relevance ends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from common.fairness.genres import genre_matrix, genre_mix, miscalibration
from common.fairness.rerank import (
    RerankKind,
    calibrated_rerank,
    mmr_rerank,
    rerank_batch,
    tradeoff_curve,
)
from common.metrics import mask_foldin_inplace, ndcg_at_k, topk_indices

# Items 0, 1: genre A; items 2, 3: genre B.
TOY_GENRES, _ = genre_matrix([("A",), ("A",), ("B",), ("B",)])


def _random_problem(
    n_users: int = 6, n_items: int = 40, n_genres: int = 5, seed: int = 0
) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = [f"g{j}" for j in range(n_genres)]
    genres = [
        tuple(rng.choice(names, size=rng.integers(0, 3), replace=False)) for _ in range(n_items)
    ]
    mat, _ = genre_matrix(genres)
    history = sp.csr_matrix((rng.random((n_users, n_items)) < 0.15).astype(np.float64))
    scores = rng.normal(size=(n_users, n_items))
    mask_foldin_inplace(scores, history)
    return scores, history, mat


def test_mmr_picks_a_different_genre_second() -> None:
    # rel = min-max of (1.0, 0.9, 0.5, 0.0) = (1, 0.9, 0.5, 0). lam = 0.5:
    # step 1: item 0 (rel 1, nothing chosen yet).
    # step 2: item 1: 0.5 * 0.9 - 0.5 * 1 = -0.05; item 2: 0.5 * 0.5 - 0 = 0.25;
    #         item 3: 0 - 0 = 0: item 2.
    # step 3: items 1 and 3 both have max_sim 1: -0.05 vs -0.5: item 1.
    scores = np.array([1.0, 0.9, 0.5, 0.0])
    assert mmr_rerank(scores, TOY_GENRES, k=3, lam=0.5, candidates=4).tolist() == [0, 2, 1]
    # lam = 0.95, step 2: item 1: 0.95 * 0.9 - 0.05 = 0.805 beats item 2: 0.475.
    assert mmr_rerank(scores, TOY_GENRES, k=2, lam=0.95, candidates=4).tolist() == [0, 1]


def test_calibrated_rerank_adds_the_missing_genre() -> None:
    # History 50/50: p = (0.5, 0.5). rel = min-max of (4, 3, 1, 0) = (1, 2/3, 1/3, 0).
    # A one-genre list: q~ = (0.995, 0.005), KL = 0.5 ln(0.5/0.995) + 0.5 ln(100) = 1.958518.
    # lam = 0.5, step 1: all KLs equal, item 0 has the best rel.
    # step 2: item 1 (A): 0.5 * 2/3 - 0.5 * 1.958518 = -0.646; item 2 (B): q = p, KL = 0:
    #         0.5 * 1/3 = 0.167: item 2.
    scores = np.array([4.0, 3.0, 1.0, 0.0])
    p = np.array([0.5, 0.5])
    picked = calibrated_rerank(scores, p, TOY_GENRES, k=2, lam=0.5, candidates=4)
    assert picked.tolist() == [0, 2]
    history = sp.csr_matrix(np.array([[0.0, 1.0, 0.0, 1.0]]))  # one A, one B
    plain = topk_indices(scores[None, :], 2)
    assert plain.tolist() == [[0, 1]]
    assert miscalibration(history, plain, TOY_GENRES)[0] == pytest.approx(1.958518, abs=1e-6)
    assert miscalibration(history, picked[None, :], TOY_GENRES)[0] == pytest.approx(0.0)


def test_calibrated_rerank_reduces_kl_when_top_is_one_genre() -> None:
    # Items 0..9 genre A score 10..19; items 10..19 genre B score 0..9: the plain top 10 is
    # all A, KL = 1.958518 (as above) against a 50/50 history.
    mat, _ = genre_matrix([("A",)] * 10 + [("B",)] * 10)
    scores = np.concatenate([np.arange(10.0, 20.0), np.arange(10.0)])
    history = sp.csr_matrix(np.array([[1.0] * 2 + [0.0] * 8 + [1.0] * 2 + [0.0] * 8]))
    p = genre_mix(history, mat)[0]
    assert p.tolist() == [0.5, 0.5]
    kl = {}
    for lam in (0.0, 0.5, 0.9, 1.0):
        lists = calibrated_rerank(scores, p, mat, k=10, lam=lam, candidates=20)[None, :]
        kl[lam] = miscalibration(history, lists, mat)[0]
    assert kl[0.0] == pytest.approx(1.958518, abs=1e-6)
    assert kl[0.5] < 0.2 * kl[0.0]
    assert kl[0.9] < kl[0.5]
    # lam = 1 ignores relevance: five A and five B, q = p exactly.
    pure = calibrated_rerank(scores, p, mat, k=10, lam=1.0, candidates=20)
    assert (mat[pure, 1] > 0).sum() == 5 and kl[1.0] == pytest.approx(0.0, abs=1e-12)


def test_pure_relevance_ends_give_the_plain_top_k() -> None:
    scores, history, mat = _random_problem()
    plain = topk_indices(scores, 8)
    for u in range(scores.shape[0]):
        p = genre_mix(history[u], mat)[0]
        mmr = mmr_rerank(scores[u], mat, k=8, lam=1.0, candidates=20)
        cal = calibrated_rerank(scores[u], p, mat, k=8, lam=0.0, candidates=20)
        assert mmr.tolist() == plain[u].tolist()
        assert cal.tolist() == plain[u].tolist()
    for kind, lam in (("diversity", 1.0), ("calibrated", 0.0)):
        batch = rerank_batch(kind, scores, history, mat, k=8, lam=lam, candidates=20)
        assert batch.tolist() == plain.tolist()


def test_calibration_without_history_genres_keeps_the_top_k() -> None:
    scores = np.array([4.0, 3.0, 1.0, 0.0])
    picked = calibrated_rerank(scores, np.zeros(2), TOY_GENRES, k=3, lam=0.9, candidates=4)
    assert picked.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", list(RerankKind))
def test_batch_matches_one_user_calls_and_is_deterministic(kind: RerankKind) -> None:
    scores, history, mat = _random_problem(seed=1)
    batch = rerank_batch(kind, scores, history, mat, k=10, lam=0.6, candidates=25)
    again = rerank_batch(kind, scores, history, mat, k=10, lam=0.6, candidates=25)
    assert batch.tolist() == again.tolist()
    for u in range(scores.shape[0]):
        if kind is RerankKind.DIVERSITY:
            one = mmr_rerank(scores[u], mat, k=10, lam=0.6, candidates=25)
        else:
            p = genre_mix(history[u], mat)[0]
            one = calibrated_rerank(scores[u], p, mat, k=10, lam=0.6, candidates=25)
        assert one.tolist() == batch[u].tolist()


@pytest.mark.parametrize("kind", ["diversity", "calibrated"])
def test_lists_come_from_the_candidates_and_skip_folded_in_items(kind: str) -> None:
    scores, history, mat = _random_problem(seed=2)
    lists = rerank_batch(kind, scores, history, mat, k=10, lam=0.3, candidates=15)
    pool = topk_indices(scores, 15)
    for u in range(scores.shape[0]):
        assert len(set(lists[u].tolist())) == 10  # no item twice
        assert set(lists[u].tolist()) <= set(pool[u].tolist())
        assert np.isfinite(scores[u, lists[u]]).all()


def test_folded_in_items_fill_only_after_the_real_candidates() -> None:
    # Two real candidates for k = 3: the -inf item comes last.
    scores = np.array([-np.inf, 2.0, 1.0, -np.inf])
    picked = mmr_rerank(scores, TOY_GENRES, k=3, lam=0.0, candidates=4)
    assert picked[:2].tolist() == [1, 2] and picked[2] in (0, 3)


@pytest.mark.parametrize(
    ("k", "lam", "candidates", "match"),
    [(0, 0.5, 4, "k must"), (2, 1.5, 4, "lam"), (2, math.nan, 4, "lam"), (3, 0.5, 2, "candidates")],
)
def test_bad_parameters_are_rejected(k: int, lam: float, candidates: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mmr_rerank(np.arange(4.0), TOY_GENRES, k=k, lam=lam, candidates=candidates)


def test_unknown_kind_and_missing_history_are_rejected() -> None:
    scores = np.arange(8.0).reshape(2, 4)
    with pytest.raises(ValueError, match="popularity"):
        rerank_batch("popularity", scores, None, TOY_GENRES, k=2, lam=0.5)
    with pytest.raises(ValueError, match="history"):
        rerank_batch("calibrated", scores, None, TOY_GENRES, k=2, lam=0.5)


def test_tradeoff_curve_ends_and_calibration_trend() -> None:
    scores, history, mat = _random_problem(n_users=20, n_items=60, seed=3)
    rng = np.random.default_rng(4)
    heldout = sp.csr_matrix(
        ((rng.random(scores.shape) < 0.1) & np.isfinite(scores)).astype(np.float64)
    )
    curve = tradeoff_curve(
        "calibrated", scores, heldout, history, mat, lams=[0.0, 0.5, 1.0], k=30, candidates=40
    )
    assert [c["lam"] for c in curve] == [0.0, 0.5, 1.0]
    assert set(curve[0]) == {"lam", "ndcg@30", "ndcg@20", "miscalibration@20", "diversity@20"}
    # lam = 0 is the plain ranking: its NDCG is the model's own.
    plain_ndcg = float(np.nanmean(ndcg_at_k(scores, heldout, 30)))
    assert curve[0]["ndcg@30"] == pytest.approx(plain_ndcg)
    plain_mis = float(np.nanmean(miscalibration(history, topk_indices(scores, 20), mat)))
    assert curve[0]["miscalibration@20"] == pytest.approx(plain_mis)
    mis = [c["miscalibration@20"] for c in curve]
    assert all(m is not None for m in mis)
    assert mis[2] < mis[1] < mis[0]  # type: ignore[operator]

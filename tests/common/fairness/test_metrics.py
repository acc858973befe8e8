"""Tests for common.fairness.metrics: assess and per_user_metrics on a hand-worked toy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from common.fairness.exposure import exposure_gini, long_tail_mask, long_tail_share, mean_popularity
from common.fairness.genres import genre_matrix
from common.fairness.metrics import assess, per_user_metrics
from common.metrics import mask_foldin_inplace, ndcg_at_k, topk_indices


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    m = np.zeros((len(rows), n_items))
    for u, items in enumerate(rows):
        m[u, items] = 1.0
    return sp.csr_matrix(m)


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

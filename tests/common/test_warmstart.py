"""The warm start's per-user statistics, its vocabulary and the spectral Mult-VAE they build."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from common.metrics import evaluate
from common.model import ModelConfig, ModelKind, build_model
from common.privacy.plan import RELEASE_NAMES
from common.warmstart import (
    COOCCURRENCE,
    LOGVAR_BIAS,
    POPULARITY,
    RANKS,
    RELEASES,
    choose_spectral_weights,
    cooccurrence_matrix,
    cooccurrence_statistic,
    popularity_statistic,
    spectral_weights,
    statistic,
    statistic_size,
    vocabulary,
)


def _rows(n_users: int = 20, n_items: int = 15, *, seed: int = 0) -> sp.csr_matrix:
    """Random binary users, with an empty user (row 0) and a user of one item (row 1)."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_users, n_items)) < 0.3).astype(np.float64)
    dense[0] = 0.0
    dense[1] = 0.0
    dense[1, 3] = 1.0
    return sp.csr_matrix(dense)


def _template(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    model = build_model(cfg, generator=torch.Generator().manual_seed(seed))
    return {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}


# --- statistics -------------------------------------------------------------------------------


def test_one_users_popularity_has_norm_one_and_an_empty_user_contributes_nothing() -> None:
    rows = _rows()
    for u in range(1, rows.shape[0]):
        if rows[u].nnz:
            assert np.linalg.norm(popularity_statistic(rows[u])) == pytest.approx(1.0, rel=1e-12)
    assert not popularity_statistic(rows[0]).any()
    one = popularity_statistic(rows[1])
    assert one[3] == pytest.approx(1.0) and np.count_nonzero(one) == 1


def test_popularity_counts_an_item_once_whatever_its_value() -> None:
    # an interaction counted 3 times (or rated 5) is the same as one interaction
    counts = sp.csr_matrix(np.array([[3.0, 0.0, 5.0, 1.0]]))
    binary = sp.csr_matrix(np.array([[1.0, 0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(popularity_statistic(counts), popularity_statistic(binary))
    np.testing.assert_allclose(popularity_statistic(binary), np.array([1, 0, 1, 1]) / np.sqrt(3))
    assert counts.data.tolist() == [3.0, 5.0, 1.0]  # the caller's matrix is untouched


def test_statistics_over_users_are_the_sums_of_each_users() -> None:
    rows = _rows()
    vocab = np.array([1, 3, 4, 8, 11])
    per_user_pop = sum(popularity_statistic(rows[u]) for u in range(rows.shape[0]))
    per_user_co = sum(cooccurrence_statistic(rows[u], vocab) for u in range(rows.shape[0]))
    np.testing.assert_allclose(popularity_statistic(rows), per_user_pop, rtol=1e-12)
    np.testing.assert_allclose(cooccurrence_statistic(rows, vocab), per_user_co, rtol=1e-12)
    # and so over any split of the users into clients
    split = popularity_statistic(rows[:7]) + popularity_statistic(rows[7:])
    np.testing.assert_allclose(popularity_statistic(rows), split, rtol=1e-12)


def test_one_users_cooccurrence_is_normalised_outer_product_of_norm_at_most_one() -> None:
    rows = _rows(n_users=30, n_items=12, seed=3)
    vocab = np.array([0, 2, 3, 5, 7, 9])
    k = len(vocab)
    for u in range(rows.shape[0]):
        upper = cooccurrence_statistic(rows[u], vocab)
        assert upper.shape == (statistic_size(k),)
        x_v = rows[u].toarray().ravel()[vocab]
        if not x_v.any():  # no vocabulary item: nothing
            assert not upper.any()
            continue
        gram = cooccurrence_matrix(upper, k)
        np.testing.assert_allclose(gram, np.outer(x_v, x_v) / x_v.sum(), rtol=1e-12)
        assert np.linalg.norm(gram) == pytest.approx(1.0, rel=1e-12)  # Frobenius norm 1
        assert np.linalg.norm(upper) <= 1.0 + 1e-12
    # a user with one vocabulary item puts all of it on the diagonal: norm exactly 1
    single = cooccurrence_statistic(sp.csr_matrix(np.eye(1, 12, 3)), vocab)
    assert np.linalg.norm(single) == pytest.approx(1.0)


def test_a_user_with_items_outside_the_vocabulary_only_contributes_nothing() -> None:
    rows = sp.csr_matrix(np.array([[0.0, 1.0, 0.0, 1.0, 0.0]]))
    assert not cooccurrence_statistic(rows, [0, 2, 4]).any()
    assert np.linalg.norm(popularity_statistic(rows)) == pytest.approx(1.0)


@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_cooccurrence_matrix_inverts_the_upper_triangle_packing(size: int) -> None:
    rng = np.random.default_rng(size)
    a = rng.normal(size=(size, size))
    sym = a + a.T
    packed = sym[np.triu_indices(size)]  # row-major upper triangle with the diagonal
    np.testing.assert_array_equal(cooccurrence_matrix(packed, size), sym)
    # and the statistic packs that way: entry (i, j), i <= j, at its row-major position
    rows = sp.csr_matrix(np.ones((1, size)))
    upper = cooccurrence_statistic(rows, np.arange(size))
    np.testing.assert_allclose(upper, np.full(statistic_size(size), 1.0 / size))


def test_cooccurrence_matrix_refuses_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 6 values for K=3"):
        cooccurrence_matrix(np.zeros(5), 3)


@pytest.mark.parametrize(("k", "size"), [(0, 0), (1, 1), (2, 3), (4, 10), (1000, 500_500)])
def test_statistic_size_is_the_upper_triangle_with_the_diagonal(k: int, size: int) -> None:
    assert statistic_size(k) == size


def test_the_statistics_are_the_plans_releases_in_its_order() -> None:
    # DPPlan.release_noise_multipliers is indexed by this order: popularity first
    assert (POPULARITY, COOCCURRENCE) == RELEASES == RELEASE_NAMES
    assert RELEASES == ("popularity", "cooccurrence")


def test_statistic_dispatches_by_name_in_float32() -> None:
    rows = _rows()
    vocab = np.array([2, 5, 6])
    pop = statistic(POPULARITY, rows, None)
    co = statistic(COOCCURRENCE, rows, vocab)
    assert pop.dtype == co.dtype == np.float32
    np.testing.assert_allclose(pop, popularity_statistic(rows), rtol=1e-6)
    np.testing.assert_allclose(co, cooccurrence_statistic(rows, vocab), rtol=1e-6)
    with pytest.raises(ValueError, match="vocabulary"):
        statistic(COOCCURRENCE, rows, None)
    with pytest.raises(ValueError, match="unknown warm-start statistic"):
        statistic("ratings", rows, vocab)


# --- vocabulary -------------------------------------------------------------------------------

_POP = np.array([10.0, 1.0, 5.0, 8.0, 0.5, 7.0, -2.0])


def test_vocabulary_keeps_the_items_above_threshold_times_noise_sorted() -> None:
    # threshold 2 x noise std 2 = 4: items 0, 2, 3, 5 (popularity 10, 5, 8, 7)
    vocab = vocabulary(_POP, noise_std=2.0, threshold=2.0, min_size=1, max_size=100)
    assert vocab.tolist() == [0, 2, 3, 5]
    # the threshold is in units of the noise: more noise, fewer items
    assert vocabulary(_POP, noise_std=4.0, threshold=2.0, min_size=1, max_size=100).tolist() == [
        0,
        3,
    ]
    # an item exactly at the threshold is in
    assert 2 in vocabulary(_POP, noise_std=1.0, threshold=5.0, min_size=1, max_size=100)


def test_vocabulary_clamps_to_min_and_max_by_popularity() -> None:
    # too few above the threshold: the top min_size items
    few = vocabulary(_POP, noise_std=1.0, threshold=100.0, min_size=3, max_size=100)
    assert few.tolist() == [0, 3, 5]
    # too many: the top max_size items, still sorted by index
    many = vocabulary(_POP, noise_std=1.0, threshold=0.0, min_size=1, max_size=2)
    assert many.tolist() == [0, 3]
    assert np.all(
        np.diff(vocabulary(_POP, noise_std=0.1, threshold=1.0, min_size=1, max_size=5)) > 0
    )


def test_vocabulary_never_exceeds_the_catalogue() -> None:
    vocab = vocabulary(_POP, noise_std=1.0, threshold=100.0, min_size=50, max_size=100)
    assert vocab.tolist() == list(range(len(_POP)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        pop = rng.normal(size=int(rng.integers(1, 40)))
        lo = int(rng.integers(1, 60))
        vocab = vocabulary(pop, noise_std=0.5, threshold=1.0, min_size=lo, max_size=lo + 5)
        assert len(vocab) == min(max(int((pop >= 0.5).sum()), lo), lo + 5, len(pop))
        assert len(set(vocab.tolist())) == len(vocab) and np.all(np.diff(vocab) > 0)
        assert vocab.min() >= 0 and vocab.max() < len(pop)
        # every item left out is no more popular than every item kept
        out = np.setdiff1d(np.arange(len(pop)), vocab)
        if len(out):
            assert pop[out].max() <= pop[vocab].min()


# --- spectral weights -------------------------------------------------------------------------


def _spectral_case(
    kind: ModelKind, rank: int = 3, dims: tuple[int, ...] = (8, 4)
) -> tuple[ModelConfig, dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    cfg = ModelConfig(kind=kind, n_items=30, dims=dims)
    rng = np.random.default_rng(7)
    vocab = np.sort(rng.choice(30, size=12, replace=False))
    vectors, _ = np.linalg.qr(rng.normal(size=(12, rank)))  # orthonormal columns
    lp = 0.5 * rng.normal(size=30)
    return cfg, _template(cfg), vocab, vectors, lp


@pytest.mark.parametrize("dims", [(8, 4), (6,)])
@pytest.mark.parametrize("kind", [ModelKind.MULTVAE, ModelKind.MULTDAE])
def test_spectral_weights_rank_items_as_the_linear_autoencoder(
    kind: ModelKind, dims: tuple[int, ...]
) -> None:
    # Prepare
    cfg, template, vocab, vectors, lp = _spectral_case(kind, dims=dims)
    scale, alpha = 10.0, 1.0
    rng = np.random.default_rng(1)
    x = np.zeros((25, 30), dtype=np.float32)
    for u in range(25):
        x[u, rng.choice(30, size=4, replace=False)] = 1.0
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.tile(alpha * lp, (25, 1))
    expected[:, vocab] += scale * (xn[:, vocab] @ vectors @ vectors.T)

    # Execute
    weights = spectral_weights(
        cfg,
        template,
        eigenvectors=vectors,
        vocab=vocab,
        log_popularity=lp,
        scale=scale,
        alpha=alpha,
    )
    model = build_model(cfg)
    model.load_state_dict({n: torch.from_numpy(v) for n, v in weights.items()})
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).logits.numpy()

    # Assert: tanh is close to linear at these inputs, the residual weights are small
    for u in range(25):
        assert np.corrcoef(logits[u], expected[u])[0, 1] > 0.99
        first, second = np.sort(expected[u])[::-1][:2]
        if first - second > 0.05 * scale:  # a clear favourite stays the favourite
            assert np.argmax(logits[u]) == np.argmax(expected[u])
        top = set(np.argsort(-logits[u])[:5].tolist())
        assert len(top & set(np.argsort(-expected[u])[:5].tolist())) >= 4
    np.testing.assert_allclose(logits, expected, atol=0.1 * scale)


@pytest.mark.parametrize("kind", [ModelKind.MULTVAE, ModelKind.MULTDAE])
def test_spectral_weights_keep_the_template_shapes_and_scale_the_rest(kind: ModelKind) -> None:
    cfg, template, vocab, vectors, lp = _spectral_case(kind)
    snapshot = {n: v.copy() for n, v in template.items()}
    weights = spectral_weights(
        cfg,
        template,
        eigenvectors=vectors,
        vocab=vocab,
        log_popularity=lp,
        scale=10.0,
        alpha=3.0,
        residual=0.01,
    )
    assert weights.keys() == template.keys()
    assert all(weights[n].shape == template[n].shape for n in template)
    for n in template:  # the template is not modified
        np.testing.assert_array_equal(template[n], snapshot[n])
    k = vectors.shape[1]
    first = weights["encoder.0.weight"]  # (8, 30)
    np.testing.assert_allclose(first[:k][:, vocab], vectors.T, rtol=1e-6)
    np.testing.assert_allclose(first[k:], 0.01 * template["encoder.0.weight"][k:], rtol=1e-6)
    outside = np.setdiff1d(np.arange(30), vocab)
    assert not first[:k][:, outside].any()
    last = weights["decoder.1.weight"]  # (30, 8)
    np.testing.assert_allclose(last[vocab, :k], 10.0 * vectors, rtol=1e-6)
    assert not last[outside, :k].any()
    np.testing.assert_allclose(weights["decoder.1.bias"], 3.0 * lp, rtol=1e-6)
    assert not weights["encoder.0.bias"].any()
    if kind is ModelKind.MULTVAE:  # a narrow posterior: log-variances start at LOGVAR_BIAS
        np.testing.assert_array_equal(weights["encoder.1.bias"][4:], LOGVAR_BIAS)


def test_spectral_weights_refuse_a_rank_above_the_narrowest_layer() -> None:
    cfg, template, vocab, _, lp = _spectral_case(ModelKind.MULTVAE, rank=5)
    vectors, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 5)))
    with pytest.raises(ValueError, match="rank 5 exceeds the narrowest layer 4"):
        spectral_weights(
            cfg,
            template,
            eigenvectors=vectors,
            vocab=vocab,
            log_popularity=lp,
            scale=10.0,
            alpha=1.0,
        )


# --- choosing on the validation users ---------------------------------------------------------


def _block_users(rng: np.random.Generator, n: int, *, n_items: int, blocks: int) -> np.ndarray:
    """Each user takes 12 items of one block of items, plus one item anywhere."""
    size = n_items // blocks
    x = np.zeros((n, n_items))
    for u in range(n):
        block = int(rng.integers(blocks))
        x[u, block * size + rng.choice(size, size=12, replace=False)] = 1.0
        x[u, rng.integers(n_items)] = 1.0
    return x


def test_choose_spectral_weights_beats_popularity_on_block_structured_users() -> None:
    # Prepare: 5 blocks of 30 items; the validation users' held-out half is in their block
    rng = np.random.default_rng(1)
    n_items = 150
    train = sp.csr_matrix(_block_users(rng, 400, n_items=n_items, blocks=5))
    val = _block_users(rng, 100, n_items=n_items, blocks=5)
    foldin, heldout = val.copy(), np.zeros_like(val)
    for u in range(len(val)):
        items = np.flatnonzero(val[u])
        held = rng.choice(items, size=len(items) // 2, replace=False)
        foldin[u, held], heldout[u, held] = 0.0, 1.0
    foldin_csr, heldout_csr = sp.csr_matrix(foldin), sp.csr_matrix(heldout)
    popularity = popularity_statistic(train)
    vocab = vocabulary(popularity, noise_std=1.0, threshold=0.5, min_size=10, max_size=200)
    gram = cooccurrence_matrix(cooccurrence_statistic(train, vocab), len(vocab))
    cfg = ModelConfig(kind=ModelKind.MULTVAE, n_items=n_items, dims=(16, 8))
    template = _template(cfg)

    # Execute
    weights, choice = choose_spectral_weights(
        cfg,
        template,
        popularity=popularity,
        gram=gram,
        vocab=vocab,
        validation_foldin=foldin_csr,
        validation_heldout=heldout_csr,
    )

    # Assert
    by_popularity = evaluate(
        lambda x: np.tile(popularity, (x.shape[0], 1)), foldin_csr, heldout_csr, ks=(100,)
    )["ndcg@100"]
    assert choice.validation_ndcg >= by_popularity
    assert choice.validation_ndcg > by_popularity + 0.1  # the blocks are easy to find
    assert choice.rank in RANKS and choice.rank <= min(cfg.dims)
    assert choice.vocabulary_size == len(vocab)
    model = build_model(cfg)
    model.load_state_dict({n: torch.from_numpy(v) for n, v in weights.items()})
    model.eval()

    def score(x: sp.csr_matrix) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x.toarray().astype(np.float32))).logits.numpy()

    # the weights returned are the ones the choice's NDCG was measured on
    again = evaluate(score, foldin_csr, heldout_csr, ks=(100,))["ndcg@100"]
    assert again == pytest.approx(choice.validation_ndcg, rel=1e-6)
    assert choice.to_dict()["validation_ndcg@100"] == choice.validation_ndcg

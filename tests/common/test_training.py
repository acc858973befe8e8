"""Tests for common.training: the loss goes down, scoring shapes, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from common.metrics import evaluate
from common.model import ModelConfig, ModelKind, beta_schedule, build_model
from common.training import TrainConfig, make_optimizer, score_users, train_epochs

N_USERS, N_ITEMS, N_GROUPS = 120, 40, 4


def _structured(seed: int = 0) -> sp.csr_matrix:
    """Users in 4 groups; each group likes its own block of 10 items (p=0.6), others p=0.02."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, N_GROUPS, N_USERS)
    block = np.arange(N_ITEMS) // (N_ITEMS // N_GROUPS)  # (I,)
    p = np.where(group[:, None] == block[None, :], 0.6, 0.02)  # (U, I)
    return sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < p).astype(np.float32))


def _config(kind: ModelKind = ModelKind.MULTVAE) -> ModelConfig:
    return ModelConfig(kind=kind, n_items=N_ITEMS, dims=(16, 4), anneal_steps=100)


def _setup(kind: ModelKind = ModelKind.MULTVAE) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    config = _config(kind)
    model = build_model(config, generator=torch.Generator().manual_seed(0))
    return model, make_optimizer(model, TrainConfig(lr=1e-2))


@pytest.mark.parametrize("kind", list(ModelKind))
def test_training_reduces_loss(kind: ModelKind) -> None:
    # Prepare
    data = _structured()
    model, optimizer = _setup(kind)
    schedule = beta_schedule(_config()) if kind is ModelKind.MULTVAE else None
    g = torch.Generator().manual_seed(1)
    # Execute
    first = train_epochs(
        model,
        data,
        epochs=1,
        batch_size=32,
        optimizer=optimizer,
        beta_schedule=schedule,
        generator=g,
    )
    later = train_epochs(
        model,
        data,
        epochs=20,
        batch_size=32,
        optimizer=optimizer,
        beta_schedule=schedule,
        start_step=first.steps,
        generator=g,
    )
    # Assert: ceil(120 / 32) = 4 updates per epoch
    assert first.steps == 4 and later.steps == 80
    assert later.mean_loss < first.mean_loss - 0.5
    if kind is ModelKind.MULTVAE:
        assert later.last_beta == pytest.approx(0.2)  # min(0.2, 83 / 100)


def test_trained_model_ranks_the_users_block() -> None:
    data = _structured()
    model, optimizer = _setup()
    g = torch.Generator().manual_seed(1)
    train_epochs(model, data, epochs=30, batch_size=32, optimizer=optimizer,
                 beta_schedule=beta_schedule(_config()), generator=g)  # fmt: skip
    # Fold in half of each user's items, hold out the rest: NDCG well above random
    dense = data.toarray()
    cols = np.arange(N_ITEMS)
    foldin = sp.csr_matrix(dense * (cols % 2 == 0))
    heldout = sp.csr_matrix(dense * (cols % 2 == 1))
    metrics = evaluate(lambda b: score_users(model, b), foldin, heldout, ks=(5,), batch_size=50)
    assert metrics["recall@5"] > 0.6  # random ranking gets ~0.15


def test_score_users_shape_and_mode_restored() -> None:
    model, _ = _setup()
    model.train()
    scores = score_users(model, _structured()[:7], batch_size=3)
    assert scores.shape == (7, N_ITEMS) and scores.dtype == np.float32
    assert model.training
    # Evaluation mode: deterministic (up to float rounding across batch sizes)
    np.testing.assert_allclose(scores, score_users(model, _structured()[:7]), rtol=1e-5, atol=1e-6)


def test_seeded_training_is_reproducible_and_leaves_global_rng() -> None:
    data = _structured()
    results = []
    for _ in range(2):
        model, optimizer = _setup()
        state = torch.get_rng_state()
        stats = train_epochs(
            model,
            data,
            epochs=3,
            batch_size=32,
            optimizer=optimizer,
            beta_schedule=beta_schedule(_config()),
            generator=TrainConfig(seed=5).generator(),
        )
        assert torch.equal(torch.get_rng_state(), state)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (s1, p1), (s2, p2) = results
    assert s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


def test_bad_arguments_rejected() -> None:
    model, optimizer = _setup()
    with pytest.raises(ValueError, match="batch_size"):
        train_epochs(model, _structured(), epochs=1, batch_size=0, optimizer=optimizer,
                     beta_schedule=None)  # fmt: skip
    with pytest.raises(ValueError, match="no rows"):
        train_epochs(model, sp.csr_matrix((0, N_ITEMS)), epochs=1, batch_size=4,
                     optimizer=optimizer, beta_schedule=None)  # fmt: skip
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))

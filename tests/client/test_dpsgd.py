"""Example-level DP-SGD of a silo (client.dpsgd): shapes, noise, clipping, steps, accounting."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from client.dpsgd import DPSGDConfig, DPSGDResult, GradSampleMode, dpsgd_update
from common.model import ModelConfig, build_model
from common.privacy import AccountantKind, MechanismStep, compute_epsilon, l2_norm

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore:Secure RNG turned off"
)

N_USERS = 40


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add contention (seconds per call on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODEL = ModelConfig(n_items=30, dims=(8, 4))


def _rows(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((N_USERS, MODEL.n_items)) < 0.2).astype(np.float32))


def _global_state() -> dict[str, torch.Tensor]:
    return build_model(MODEL, generator=torch.Generator().manual_seed(0)).state_dict()


def _update(seed: int | None = 0, **overrides: object) -> DPSGDResult:
    settings: dict[str, object] = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "batch_size": 8,
        "epochs": 2,
        "lr": 0.1,
    }
    settings.update(overrides)
    cfg = DPSGDConfig(**settings)  # type: ignore[arg-type]
    return dpsgd_update(_global_state(), _rows(), model_config=MODEL, cfg=cfg, beta=0.2, seed=seed)


@pytest.mark.parametrize("mode", list(GradSampleMode))
def test_delta_is_finite_with_the_model_shapes(mode: GradSampleMode) -> None:
    # Prepare
    expected = {k: tuple(v.shape) for k, v in _global_state().items()}
    # Execute
    result = _update(grad_sample_mode=mode.value)
    # Assert
    assert {k: v.shape for k, v in result.delta.items()} == expected
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in result.delta.values())
    assert l2_norm(result.delta) > 0 and math.isfinite(result.mean_loss)


def test_modes_agree_with_the_same_seed() -> None:
    # Same sampling, noise and dropout draws: ghost clipping must clip as the explicit modes do.
    ghost = _update(grad_sample_mode="ghost")
    for mode in ("functorch", "hooks"):
        other = _update(grad_sample_mode=mode)
        for k, v in ghost.delta.items():
            np.testing.assert_allclose(other.delta[k], v, atol=1e-5)


def test_steps_and_sample_rate_follow_batch_size_and_epochs() -> None:
    # 40 users, expected batch 8: q = 8 / 40 = 0.2, 5 steps per epoch, 3 epochs.
    result = _update(batch_size=8, epochs=3)
    assert result.sample_rate == pytest.approx(8 / N_USERS)
    assert result.steps == 15
    assert result.mechanism == MechanismStep(noise_multiplier=1.0, sample_rate=0.2, steps=15)
    # 12 does not divide 40: Opacus uses 1 / ceil(40 / 12) = 0.25 (<= 12 / 40) and 4 steps.
    uneven = _update(batch_size=12, epochs=1)
    assert uneven.sample_rate == pytest.approx(0.25)
    assert uneven.steps == 4


def test_huge_noise_dominates_the_update() -> None:
    # Prepare / Execute: same seed, so only the noise scale differs
    norms = [l2_norm(_update(noise_multiplier=z, lr=0.01).delta) for z in (0.0, 100.0, 1000.0)]
    # Assert: noise std z * C / b * lr per step, far above the clipped signal lr * C
    assert norms[1] > 10 * norms[0]
    assert norms[2] == pytest.approx(10 * norms[1], rel=0.1)


def test_clipping_bounds_the_update_norm() -> None:
    # Without noise each SGD step moves by at most lr * C * B_t / b (per-user norms <= C), so the
    # update stays near lr * steps * C; the sampled batch sizes B_t average b.
    lr, clip = 0.5, 1e-4
    clipped = _update(noise_multiplier=0.0, max_grad_norm=clip, lr=lr, epochs=4)
    loose = _update(noise_multiplier=0.0, max_grad_norm=1e6, lr=lr, epochs=4)
    bound = lr * clipped.steps * clip
    assert 0 < l2_norm(clipped.delta) <= 1.5 * bound
    assert l2_norm(loose.delta) > 100 * bound


def test_composed_mechanism_gives_finite_positive_epsilon() -> None:
    # Two rounds of the same silo, composed as the caller does
    result = _update()
    history = [result.mechanism, result.mechanism]
    for kind in AccountantKind:
        epsilon = compute_epsilon(history, delta=1e-5, accountant=kind)
        assert 0 < epsilon < math.inf


def test_unseeded_noise_differs_between_calls() -> None:
    # seed=None draws from OS entropy: two calls never release the same noise
    first, second = _update(seed=None), _update(seed=None)
    assert not np.allclose(first.delta["encoder.0.weight"], second.delta["encoder.0.weight"])


def test_seeded_update_is_reproducible_and_leaves_global_rng_alone() -> None:
    # Prepare
    state, rows = _global_state(), _rows()
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, epochs=1, lr=0.1)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    # Execute
    first = dpsgd_update(state, rows, model_config=MODEL, cfg=cfg, beta=0.2, seed=5)
    after = torch.rand(1)
    second = dpsgd_update(state, rows, model_config=MODEL, cfg=cfg, beta=0.2, seed=5)
    # Assert
    assert torch.equal(after, expected_next)
    for k, v in first.delta.items():
        np.testing.assert_array_equal(second.delta[k], v)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", -1.0),
        ("noise_multiplier", math.nan),
        ("max_grad_norm", 0.0),
        ("lr", math.inf),
        ("batch_size", 0),
        ("epochs", 0),
    ],
)
def test_config_rejects_bad_values(field: str, value: float) -> None:
    settings: dict[str, object] = {
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "batch_size": 8,
        "epochs": 1,
        "lr": 0.1,
    }
    settings[field] = value
    with pytest.raises(ValueError, match=field):
        DPSGDConfig(**settings)  # type: ignore[arg-type]


def test_update_rejects_wrong_item_count_and_bad_beta() -> None:
    cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, epochs=1, lr=0.1)
    narrow = sp.csr_matrix(np.ones((4, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="n_items"):
        dpsgd_update(_global_state(), narrow, model_config=MODEL, cfg=cfg, beta=0.2, seed=0)
    with pytest.raises(ValueError, match="beta"):
        dpsgd_update(_global_state(), _rows(), model_config=MODEL, cfg=cfg, beta=math.nan, seed=0)


def test_bench_runs_tiny() -> None:
    # The benchmark (simulations/bench_dpsgd.py) at its --tiny size, as a subprocess.
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_dpsgd", "--tiny"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "DP ghost" in done.stdout and "plain SGD" in done.stdout

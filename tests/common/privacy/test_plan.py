"""A run's privacy plan: calibration under Poisson participation and silo DP-SGD bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy import (
    MechanismStep,
    RdpTracker,
    dpsgd_shape,
    participation_factor,
    plan_privacy,
)
from common.run.config import (
    ClientConfig,
    PrivacyConfig,
    PrivacyMode,
    RunConfig,
    Sampling,
    ServerConfig,
)


def _run(
    privacy: PrivacyConfig, *, q: float = 0.1, rounds: int = 30, **client: object
) -> RunConfig:
    return RunConfig(
        rounds=rounds,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=q),
        client=ClientConfig(optimizer="sgd", **client),  # type: ignore[arg-type]
        privacy=privacy,
    )


def test_participation_factor_is_one_at_full_participation_and_below_one_otherwise() -> None:
    assert participation_factor(population=50, sample_rate=1.0, quantile=0.025) == 1.0
    f = participation_factor(population=738, sample_rate=0.1, quantile=0.025)
    # Binomial(738, 0.1): mean 73.8, 2.5% quantile 58 -> sqrt(58 / 73.8) = 0.887
    assert f == pytest.approx(math.sqrt(58 / 73.8), rel=1e-9)
    assert f < participation_factor(population=738, sample_rate=0.1, quantile=0.3) <= 1.0


@settings(max_examples=5, deadline=None)
@given(
    target=st.sampled_from([1.0, 2.0, 4.0]),
    population=st.integers(min_value=500, max_value=5000),
    q=st.sampled_from([0.05, 0.1]),
)
def test_calibrated_run_stays_within_target_under_poisson_participation(
    target: float, population: int, q: float
) -> None:
    """Rounds draw k ~ Binomial(N, q) participants; simulated runs stay within the target.

    The floor is per round, so it is a high-probability guarantee: with m = qN >= 25 no
    simulated run overshoots; with a handful of expected participants (m ~ 10) a run whose
    rounds often fall to 1-3 participants can (the ledger then reports it, see the README).
    """
    rounds = 40
    privacy = PrivacyConfig(mode=PrivacyMode.CLIENT, target_epsilon=target, accountant="rdp")
    plan = plan_privacy(_run(privacy, q=q, rounds=rounds), population)
    assert plan is not None and plan.accounting_noise_multiplier is not None
    assert plan.noise_multiplier > plan.accounting_noise_multiplier
    rng = np.random.default_rng([population, int(q * 100), int(target)])
    m = q * population
    for _ in range(10):  # 10 simulated runs, each charged with its real participant counts
        tracker = RdpTracker()
        for k in rng.binomial(population, q, size=rounds):
            if k > 0:
                tracker.add(MechanismStep(plan.noise_multiplier * math.sqrt(k / m), q))
        assert tracker.epsilon(plan.delta) <= target


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [(25, 8, 1, (0.25, 4)), (24, 8, 2, (1 / 3, 6)), (5, 8, 1, (1.0, 1))],
)
def test_dpsgd_shape_matches_opacus_poisson_loader(
    n: int, batch: int, epochs: int, expected: tuple[float, int]
) -> None:
    q, steps = dpsgd_shape(n, batch_size=batch, epochs=epochs)
    assert (q, steps) == (pytest.approx(expected[0]), expected[1])


def test_example_plan_bounds_every_silo_and_counts_users() -> None:
    cfg = _run(
        PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.2),
        q=1.0,
        batch_size=10,
        local_epochs=2,
    )
    plan = plan_privacy(cfg, 3, silo_sizes=[15, 40, 100])
    assert plan is not None
    # smallest silo (15 users): 2 batches -> q = 1/2; largest (100): 10 batches x 2 epochs
    assert (plan.sample_rate, plan.steps_per_round) == (0.5, 20)
    assert plan.population == 155 and plan.noise_multiplier == 1.2
    with pytest.raises(ValueError, match="silo"):
        plan_privacy(cfg, 3)


def test_example_mode_needs_sgd() -> None:
    with pytest.raises(ValueError, match="sgd"):
        RunConfig(
            client=ClientConfig(optimizer="adam"),
            privacy=PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.0),
        )

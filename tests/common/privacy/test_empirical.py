"""Tests for common.privacy.empirical (one-run audit statistics) and the canary audit using them.

The canary experiment lives in simulations.audit_empirical; its tests sit here with the statistics
they exercise, including a subprocess run of the CLI at its tiny size.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from scipy.stats import binom

from common.privacy.empirical import audit_guesses, epsilon_lower_bound, one_run_p_value
from simulations.audit_empirical import AuditResult, run_audit

N = 10_000
DELTA = N**-1.1  # fedrec's default delta for this population


# ------------------------------------------------------------------------------ p-value and bound


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    # Prepare / Execute
    p_value = one_run_p_value(m=500, r=200, v=130, epsilon=0.5, delta=0.0)
    # Assert: P[Binomial(200, e^0.5 / (1 + e^0.5)) >= 130]
    assert p_value == pytest.approx(binom.sf(129, 200, expit(0.5)))


def test_p_value_delta_term_hand_case() -> None:
    # m = r = v = 1, eps = 0: f(1) = 1/2 and max_i (f(1 - i) - f(1)) / i = P[B = 0] = 1/2,
    # so the bound is 1/2 + 2 * 1 * delta * 1/2 = 1/2 + delta.
    assert one_run_p_value(m=1, r=1, v=1, epsilon=0.0, delta=0.01) == pytest.approx(0.51)
    assert one_run_p_value(m=10, r=10, v=0, epsilon=1.0, delta=0.0) == 1.0


def test_bound_hand_case_all_right() -> None:
    # delta = 0, m = r = v = 100: the p-value is p^100 with p = e^eps / (1 + e^eps); it is below
    # 0.05 iff p < 0.05^(1/100) = 0.970487, i.e. eps < log(0.970487 / 0.029513) = 3.4930.
    p = 0.05 ** (1 / 100)
    expected = math.log(p / (1 - p))
    # Execute
    bound = epsilon_lower_bound(m=100, r=100, v=100, delta=0.0, confidence=0.95)
    # Assert
    assert expected == pytest.approx(3.4930, abs=1e-4)
    assert bound == pytest.approx(expected, abs=1e-6)
    assert bound <= expected


def test_bound_is_zero_at_chance_and_grows_with_accuracy() -> None:
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=0.0) == 0.0
    assert epsilon_lower_bound(m=1000, r=200, v=110, delta=DELTA) == 0.0
    bounds = [epsilon_lower_bound(m=1000, r=200, v=v, delta=DELTA) for v in (130, 160, 190, 200)]
    assert all(a < b for a, b in itertools.pairwise(bounds))
    assert bounds[0] > 0


def test_delta_and_confidence_only_lower_the_bound() -> None:
    pure = epsilon_lower_bound(m=1000, r=300, v=290, delta=0.0)
    assert epsilon_lower_bound(m=1000, r=300, v=290, delta=1e-5) <= pure
    assert epsilon_lower_bound(m=1000, r=300, v=290, delta=0.0, confidence=0.99) < pure


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 300), data=st.data(), delta=st.sampled_from([0.0, 1e-6, 1e-4]))
def test_bound_is_monotone_in_right_guesses(r: int, data: st.DataObject, delta: float) -> None:
    v = data.draw(st.integers(0, r - 1))
    low = epsilon_lower_bound(m=1000, r=r, v=v, delta=delta)
    high = epsilon_lower_bound(m=1000, r=r, v=v + 1, delta=delta)
    assert 0.0 <= low <= high + 1e-9


def test_bound_is_valid_for_randomized_response() -> None:
    # Prepare: eps-DP randomized response answers each canary right with probability
    # e^eps / (1 + e^eps), the worst case of the theorem; at 95% the bound may exceed the true
    # epsilon in at most 5% of the runs (400 runs: expect <= 20, allow 3 standard deviations).
    rng = np.random.default_rng(7)
    true_epsilon, r, runs = 1.0, 200, 400
    # Execute
    rights = rng.binomial(r, expit(true_epsilon), size=runs)
    bounds = [epsilon_lower_bound(m=r, r=r, v=int(v), delta=0.0) for v in rights]
    # Assert
    exceed = sum(bound > true_epsilon for bound in bounds)
    assert exceed <= 0.05 * runs + 3 * math.sqrt(0.05 * 0.95 * runs)
    assert np.median(bounds) > 0.3  # and the audit is not vacuous


@pytest.mark.parametrize(
    "kwargs",
    [
        {"m": 10, "r": 11, "v": 0, "delta": 0.0},
        {"m": 10, "r": 5, "v": 6, "delta": 0.0},
        {"m": 0, "r": 0, "v": 0, "delta": 0.0},
        {"m": 10, "r": 5, "v": 3, "delta": math.nan},
        {"m": 10, "r": 5, "v": 3, "delta": 1.0},
        {"m": 10, "r": 5, "v": 3, "delta": 0.0, "confidence": 1.0},
        {"m": 10, "r": 5, "v": 3, "delta": 0.0, "confidence": math.nan},
    ],
)
def test_bound_rejects_bad_inputs(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- audit_guesses


def test_audit_guesses_hand_case() -> None:
    # Prepare: highest two scores are canaries 0 (0.9) and 3 (0.8), both included: 2 right;
    # lowest two are canaries 1 (0.1, excluded: right) and 4 (0.2, included: wrong).
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2])
    included = np.array([True, False, False, True, True])
    # Execute / Assert
    assert audit_guesses(scores, included, k_plus=2, k_minus=2) == (4, 3)
    assert audit_guesses(scores, included, k_plus=0, k_minus=1) == (1, 1)
    assert audit_guesses(scores, included, k_plus=0, k_minus=0) == (0, 0)
    assert audit_guesses(scores, included, k_plus=5, k_minus=0) == (5, 3)


def test_audit_guesses_rejects_bad_inputs() -> None:
    scores = np.zeros(3)
    with pytest.raises(ValueError, match="k_plus"):
        audit_guesses(scores, np.zeros(3, dtype=bool), k_plus=2, k_minus=2)
    with pytest.raises(ValueError, match="bool"):
        audit_guesses(scores, np.zeros(3), k_plus=1, k_minus=0)
    with pytest.raises(ValueError, match="finite"):
        audit_guesses(np.array([0.0, math.nan, 1.0]), np.zeros(3, dtype=bool), k_plus=1, k_minus=0)


# ----------------------------------------------------------------------------- canary experiment


def _audit(
    *, noise_multiplier: float, seed: int = 0, canaries: int = 1000, dim: int | None = None
) -> AuditResult:
    """The CLI's default run: N = 10,000, q = 0.01, 100 rounds, C = 1."""
    return run_audit(
        noise_multiplier=noise_multiplier,
        clip=1.0,
        sample_rate=0.01,
        rounds=100,
        population=N,
        delta=DELTA,
        canaries=canaries,
        dim=dim,
        seed=seed,
    )


def test_audit_without_dp_gives_a_clearly_positive_bound() -> None:
    result = _audit(noise_multiplier=0.0)
    assert result.claimed_epsilon == math.inf
    assert result.epsilon_lower_bound > 1.0
    assert result.accuracy > 0.95
    assert result.m == 1000
    assert result.r == result.k_plus + result.k_minus


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_with_dp_stays_below_the_claim(seed: int) -> None:
    result = _audit(noise_multiplier=0.7, seed=seed)
    assert 1.0 < result.claimed_epsilon < 5.0
    assert result.epsilon_lower_bound < result.claimed_epsilon


def test_audit_with_little_noise_detects_leakage_below_the_claim() -> None:
    # z = 0.5, q = 0.1: a large claimed epsilon (about 29) that the audit partly confirms.
    result = run_audit(
        noise_multiplier=0.5, clip=1.0, sample_rate=0.1, rounds=50, population=N, delta=DELTA
    )
    assert 0.5 < result.epsilon_lower_bound < result.claimed_epsilon


def test_audit_is_reproducible_and_checks_inputs() -> None:
    first = _audit(noise_multiplier=1.0, canaries=200, seed=3)
    again = _audit(noise_multiplier=1.0, canaries=200, seed=3)
    assert first == again
    with pytest.raises(ValueError, match="dim"):
        _audit(noise_multiplier=1.0, canaries=200, dim=100)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _audit(noise_multiplier=math.nan)


def test_cli_tiny_run_prints_both_modes() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "simulations.audit_empirical", "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "DP off" in completed.stdout
    assert "DP on" in completed.stdout

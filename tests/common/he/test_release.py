"""Noise flooding, rounding and the committee's agreement rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.he import (
    ParamSet,
    ckks_error_std,
    committee_agree,
    committee_tolerance,
    default_flood_std,
    flood_and_round_inplace,
    rounding_step,
)


def test_error_model_and_default_flood() -> None:
    # Prepare: sqrt(10 * 4096 * (3.2**2 + 1/12) / 2) / 2**38 = 459.8 / 2.749e11
    params = ParamSet.FEDREC.params

    # Execute
    err = ckks_error_std(params, n_updates=10)
    flood = default_flood_std(params, n_updates=10)

    # Assert
    assert err == pytest.approx(1.6727e-9, rel=1e-3)
    assert flood == 2.0**-19  # 1024 * 1.67e-9 = 1.71e-6, rounded up to a power of two
    assert rounding_step(flood) == 2.0**-19
    assert rounding_step(3e-6) == 2.0**-19
    assert committee_tolerance(2.0**-19) == pytest.approx((8 * math.sqrt(2) + 1) * 2.0**-19)


def test_flood_and_round_lands_on_the_grid() -> None:
    # Prepare
    values = np.array([0.1, -0.2, 0.3])
    step = rounding_step(2.0**-10)

    # Execute
    flood_and_round_inplace(values, flood_std=2.0**-10, rng=np.random.default_rng(0))

    # Assert
    assert np.array_equal(values / step, np.rint(values / step))
    assert np.abs(values - [0.1, -0.2, 0.3]).max() < 6 * 2.0**-10


def test_flood_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="flood_std"):
        flood_and_round_inplace(np.zeros(2), flood_std=0.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="values must be float64"):
        flood_and_round_inplace(
            np.zeros(2, np.float32), flood_std=1.0, rng=np.random.default_rng(0)
        )


def test_committee_agreement_returns_the_mean() -> None:
    # Prepare
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([1.5, 2.5], dtype=np.float32)}

    # Execute
    mean = committee_agree([a, b], tolerance=0.5)

    # Assert
    assert mean is not None
    assert mean["w"].dtype == np.float32
    np.testing.assert_array_equal(mean["w"], [1.25, 2.25])


def test_committee_disagreement_returns_none() -> None:
    a = {"w": np.array([1.0, 2.0])}
    b = {"w": np.array([1.0, 2.6])}
    assert committee_agree([a, b], tolerance=0.5) is None
    assert committee_agree([a, {"v": np.array([1.0, 2.0])}], tolerance=0.5) is None
    assert committee_agree([a, {"w": np.array([1.0, np.nan])}], tolerance=0.5) is None


def test_committee_needs_two_members() -> None:
    with pytest.raises(ValueError, match="outputs must hold at least two"):
        committee_agree([{"w": np.zeros(1)}], tolerance=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        committee_agree([{"w": np.zeros(1)}] * 2, tolerance=math.nan)


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    flood_exp=st.integers(-30, -5),
    scale=st.floats(1e-6, 1e3),
)
def test_honest_members_always_agree(seeds: tuple[int, int], flood_exp: int, scale: float) -> None:
    # Prepare: the same decryption, flooded independently by two members
    flood_std = 2.0**flood_exp
    values = np.random.default_rng(0).normal(0.0, scale, 1000)
    outputs = []
    for seed in seeds:
        copy = values.copy()
        flood_and_round_inplace(copy, flood_std=flood_std, rng=np.random.default_rng(seed))
        outputs.append({"w": copy})

    # Execute / Assert
    assert committee_agree(outputs, tolerance=committee_tolerance(flood_std)) is not None

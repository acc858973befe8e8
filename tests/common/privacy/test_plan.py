"""A run's privacy plan: calibration under Poisson participation and silo DP-SGD bounds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy import (
    MechanismStep,
    PrivacyAccountant,
    RdpTracker,
    dpsgd_shape,
    participation_factor,
    plan_privacy,
)
from common.privacy.ledger import MECHANISM, LedgerMode, round_problem
from common.privacy.plan import MIN_TARGET_EPSILON, check_target_epsilon
from common.privacy.rounds import charge_round, client_round_step
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


# --- reproduced: a tiny target at a large delta (N = 44, q = 0.5, delta = 0.0156) ----------------

_REPRO = {"q": 0.5, "rounds": 2}
_REPRO_DELTA = 0.0156
_REPRO_POPULATION = 44


def _repro_privacy(target: float) -> PrivacyConfig:
    return PrivacyConfig(
        mode=PrivacyMode.CLIENT, target_epsilon=target, delta=_REPRO_DELTA, accountant="rdp"
    )


@pytest.mark.parametrize("target", [1e-6, 0.01])
def test_plan_refuses_a_target_below_what_prv_can_certify_in_one_line(target: float) -> None:
    # Before the fix, 1e-6 was accepted (z 67.6), and the run failed after round 1 writing the
    # ledger (epsilon -0.0041).
    cfg = _run(_repro_privacy(target), **_REPRO)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="below what the PRV accountant can certify") as err:
        plan_privacy(cfg, _REPRO_POPULATION)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"target epsilon {target:g} at delta 0.0156 is below")
    assert f"must be >= {MIN_TARGET_EPSILON:g}" in message
    with pytest.raises(ValueError, match="below what the PRV accountant can certify"):
        check_target_epsilon(target_epsilon=target)  # the CLI's check before any run folder


def test_check_target_epsilon_accepts_the_floor_and_names_bad_parameters() -> None:
    check_target_epsilon(target_epsilon=MIN_TARGET_EPSILON)
    check_target_epsilon(target_epsilon=8.0, delta=1e-5)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="target_epsilon"):
            check_target_epsilon(target_epsilon=bad)
    with pytest.raises(ValueError, match="delta"):
        check_target_epsilon(target_epsilon=1.0, delta=1.5)


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")  # RDP at z ~ 11: alpha 63
def test_a_small_certifiable_target_runs_and_every_ledger_line_is_valid() -> None:
    # Prepare: 0.05 >= MIN_TARGET_EPSILON; every round is charged at the planned floor or above.
    cfg = _run(_repro_privacy(0.05), **_REPRO)  # type: ignore[arg-type]
    plan = plan_privacy(cfg, _REPRO_POPULATION)
    assert plan is not None and plan.delta == _REPRO_DELTA
    accountant = PrivacyAccountant(delta=plan.delta)

    # Execute: rounds with all, most and few of the m = 22 expected participants
    records = []
    for rnd, participated in zip((1, 2), (22, 30), strict=True):
        step = client_round_step(plan, participated=participated)
        records.append(
            charge_round(
                accountant,
                plan,
                server_round=rnd,
                invited=participated,
                participated=participated,
                step=step,
            ).to_record()
        )

    # Assert: the ledger accepts every line (epsilon >= 0), and the run stays within its target.
    for rec in records:
        line = {"mechanism": MECHANISM, **rec}  # as LedgerWriter.append writes it
        problem = round_problem(line, mode=LedgerMode.CLIENT, population=_REPRO_POPULATION)
        assert problem is None, problem
        assert 0 <= rec["epsilon"] <= rec["epsilon_rdp"] + 1e-12
    assert records[-1]["epsilon_rdp"] <= 0.05


def test_cli_refuses_a_tiny_target_in_one_line_before_writing_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.cli import main

    run_dir = tmp_path / "run"
    sets = ["privacy.mode=client", "privacy.target_epsilon=1e-6", f"privacy.delta={_REPRO_DELTA}"]
    code = main(["simulate", "--out", str(run_dir), *(f"--set={item}" for item in sets)])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fedrec: error: privacy: target epsilon 1e-06 at delta 0.0156 is below what the PRV "
        "accountant can certify (its error is 0.01): target_epsilon must be >= 0.02"
    )
    assert not run_dir.exists()

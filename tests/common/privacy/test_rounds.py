"""What a round is charged: one function for the Flower server and the in-process engine."""

from __future__ import annotations

import math

import pytest

from common.privacy import (
    AccountantKind,
    DPPlan,
    MechanismStep,
    PrivacyAccountant,
    compute_epsilon,
    plan_privacy,
)
from common.privacy.rounds import (
    charge_round,
    client_round_step,
    example_round_step,
    ledger_header,
    privacy_summary,
    resume_accountant,
)
from common.run.config import PrivacyConfig, PrivacyMode, RunConfig, Sampling, ServerConfig


def _plan(rounds: int = 3, z: float = 1.5, population: int = 100, q: float = 0.1) -> DPPlan:
    cfg = RunConfig(
        rounds=rounds,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=q),
        privacy=PrivacyConfig(mode=PrivacyMode.CLIENT, noise_multiplier=z),
    )
    plan = plan_privacy(cfg, population)
    assert plan is not None
    return plan


def test_client_round_is_charged_with_the_effective_multiplier() -> None:
    plan = _plan()  # m = 10
    step = client_round_step(plan, participated=5)
    assert step == MechanismStep(1.5 * math.sqrt(0.5), 0.1, 1)
    accountant = PrivacyAccountant(delta=plan.delta)
    rec = charge_round(accountant, plan, server_round=1, invited=8, participated=5, step=step)
    expected = compute_epsilon([step], delta=plan.delta, accountant=AccountantKind.RDP)
    assert rec.epsilon == rec.epsilon_rdp == pytest.approx(expected, rel=1e-9)
    assert (rec.epsilon_accountant, rec.released, rec.invited) == ("rdp", True, 8)
    assert rec.to_record()["effective_noise_multiplier"] == step.noise_multiplier


def test_the_last_round_reports_prv_of_the_whole_run_capped_by_rdp() -> None:
    plan = _plan(rounds=2)
    accountant = PrivacyAccountant(delta=plan.delta)
    for rnd in (1, 2):
        step = client_round_step(plan, participated=10)
        rec = charge_round(
            accountant, plan, server_round=rnd, invited=10, participated=10, step=step
        )
    assert rec.epsilon_accountant == "prv"
    assert 0 < rec.epsilon <= rec.epsilon_rdp
    assert privacy_summary(plan, rec.to_record())["epsilon"] == rec.epsilon


def test_a_round_with_no_update_is_recorded_but_not_charged() -> None:
    plan = _plan()
    accountant = PrivacyAccountant(delta=plan.delta)
    step = client_round_step(plan, participated=0)
    rec = charge_round(accountant, plan, server_round=1, invited=3, participated=0, step=step)
    assert not rec.released and rec.epsilon == 0.0 and accountant.history == []
    assert rec.effective_noise_multiplier == plan.noise_multiplier  # the configured z


def test_a_resumed_accountant_continues_where_the_ledger_stopped() -> None:
    plan = _plan(rounds=4)
    straight = PrivacyAccountant(delta=plan.delta)
    records = []
    for rnd, k in zip((1, 2, 3), (7, 0, 12), strict=True):
        step = client_round_step(plan, participated=k)
        records.append(
            charge_round(straight, plan, server_round=rnd, invited=k, participated=k, step=step)
        )
    resumed = resume_accountant(plan, [r.to_record() for r in records[:2]])
    step = client_round_step(plan, participated=12)
    again = charge_round(resumed, plan, server_round=3, invited=12, participated=12, step=step)
    assert again == records[2]
    assert resumed.history == straight.history


def test_example_rounds_take_the_larger_of_plan_and_report() -> None:
    cfg = RunConfig(
        rounds=1,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=1.0),
        privacy=PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.0),
    )
    plan = plan_privacy(cfg, 2, silo_sizes=[64, 64])
    assert plan is not None
    assert example_round_step(plan, [(None, None)]) == MechanismStep(
        1.0, plan.sample_rate, plan.steps_per_round
    )
    bigger = example_round_step(plan, [(plan.sample_rate / 2, plan.steps_per_round + 5), (1.0, 1)])
    assert (bigger.sample_rate, bigger.steps) == (1.0, plan.steps_per_round + 5)


@pytest.mark.parametrize(("seed", "noise"), [(None, "os-entropy"), (4, "seeded, not private")])
def test_the_ledger_header_says_where_the_noise_comes_from(seed: int | None, noise: str) -> None:
    cfg = RunConfig(
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=0.1),
        privacy=PrivacyConfig(mode=PrivacyMode.CLIENT, noise_multiplier=1.0, noise_seed=seed),
    )
    plan = plan_privacy(cfg, 100)
    assert plan is not None

    header = ledger_header(run_id="r", cfg=cfg, plan=plan)

    assert header["noise"] == noise and header["noise_seed"] == seed


@pytest.mark.parametrize(
    ("privacy", "needle"),
    [
        ({"mode": PrivacyMode.CLIENT, "noise_multiplier": 1.0, "noise_seed": -1}, ">= 0"),
        ({"mode": PrivacyMode.EXAMPLE, "noise_multiplier": 1.0, "noise_seed": 1}, "'client'"),
    ],
)
def test_a_noise_seed_must_be_non_negative_and_for_client_mode(
    privacy: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        PrivacyConfig(**privacy)  # type: ignore[arg-type]

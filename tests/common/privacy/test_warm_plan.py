"""The warm start's privacy: its share of the budget, its two releases and their ledger lines."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.config import parse
from common.errors import DataError
from common.privacy import (
    AccountantKind,
    DPPlan,
    MechanismStep,
    PrivacyAccountant,
    compute_epsilon,
    plan_privacy,
)
from common.privacy.ledger import (
    LedgerWriter,
    canonical_json,
    history_from_ledger,
    read_ledger,
    read_ledger_lines,
    release_problem,
)
from common.privacy.plan import RELEASE_NAMES, calibrate_noise_multiplier, calibrate_releases
from common.privacy.rounds import (
    charge_release,
    charge_round,
    client_round_step,
    ledger_header,
    release_plan,
)
from common.run.config import (
    ClientConfig,
    PrivacyConfig,
    PrivacyMode,
    RunConfig,
    Sampling,
    ServerConfig,
    WarmStartConfig,
)

POPULATION = 1000
TARGET = 2.0


def _cfg(
    *,
    rounds: int = 20,
    share: float = 0.5,
    target: float | None = TARGET,
    enabled: bool = True,
    mode: PrivacyMode = PrivacyMode.CLIENT,
    q: float = 0.1,
    popularity_share: float = 0.2,
    min_participation: float = 0.99,
) -> RunConfig:
    privacy = (
        PrivacyConfig(mode=mode, target_epsilon=target)
        if target is not None
        else PrivacyConfig(mode=mode, noise_multiplier=1.0)
    )
    return RunConfig(
        rounds=rounds,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=q),
        client=ClientConfig(optimizer="sgd"),
        privacy=privacy,
        warm_start=WarmStartConfig(
            enabled=enabled,
            share=share,
            popularity_share=popularity_share,
            min_participation=min_participation,
        ),
    )


def _plan(cfg: RunConfig, population: int = POPULATION) -> DPPlan:
    plan = plan_privacy(cfg, population)
    assert plan is not None
    return plan


def _prv(steps: list[MechanismStep], plan: DPPlan) -> float:
    return compute_epsilon(steps, delta=plan.delta, accountant=AccountantKind.PRV)


# --- the plan ---------------------------------------------------------------------------------


def test_calibration_after_a_prefix_needs_more_noise_and_composes_within_target() -> None:
    prefix = [MechanismStep(3.0, 1.0, 2)]
    kwargs: dict[str, Any] = {
        "target_epsilon": 2.0,
        "delta": 1e-4,
        "sample_rate": 0.1,
        "steps": 20,
        "accountant": AccountantKind.RDP,
    }
    alone = calibrate_noise_multiplier(**kwargs)
    after = calibrate_noise_multiplier(**kwargs, prefix=prefix)
    assert after > alone * 1.05
    rounds = MechanismStep(after, 0.1, 20)
    total = compute_epsilon([*prefix, rounds], delta=1e-4, accountant=AccountantKind.RDP)
    assert 0.98 * 2.0 <= total <= 2.0


def _floor(plan: DPPlan) -> float:
    """sqrt(f N / N): a release's z at its fewest answers is its z times this."""
    return math.sqrt(plan.release_min_clients / plan.population)


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_the_releases_take_their_share_and_the_rounds_the_rest(share: float) -> None:
    # Execute
    plan = _plan(_cfg(share=share))

    # Assert: one step per release at q = 1, at the fewest answers it may have (f N = 990)
    assert plan.release_min_clients == 990
    assert len(plan.release_noise_multipliers) == len(RELEASE_NAMES)
    floor = _floor(plan)
    assert plan.release_steps == [
        MechanismStep(plan.release_noise_multiplier(name) * floor, 1.0, 1) for name in RELEASE_NAMES
    ]
    # the releases alone, at f N answers, spend share * target (PRV)
    releases = _prv(plan.release_steps, plan)
    assert 0.98 * share * TARGET <= releases <= share * TARGET
    # releases then rounds at the planned (floor) z reach the whole target, never more
    assert plan.accounting_noise_multiplier is not None
    rounds = MechanismStep(plan.accounting_noise_multiplier, plan.sample_rate, plan.rounds)
    total = _prv([*plan.release_steps, rounds], plan)
    assert 0.98 * TARGET <= total <= TARGET
    # and the rounds get more noise than a run without the warm start
    without = _plan(_cfg(share=share, enabled=False))
    assert without.release_noise_multipliers == () and without.release_steps == []
    assert plan.noise_multiplier > without.noise_multiplier


def test_the_release_noise_multipliers_split_the_budget_by_the_popularity_share() -> None:
    # Prepare: the default share p = 0.2 and an even split
    default, even = _plan(_cfg()), _plan(_cfg(popularity_share=0.5))
    pop, cooc = (default.release_noise_multiplier(name) for name in RELEASE_NAMES)

    # Assert: z_pop / z_cooc = sqrt((1 - p) / p), so 2 at p = 0.2, 1 at p = 0.5
    assert default.release_noise_multipliers == (pop, cooc)
    assert pop / cooc == pytest.approx(2.0, rel=1e-9)
    assert even.release_noise_multiplier("popularity") == pytest.approx(
        even.release_noise_multiplier("cooccurrence"), rel=1e-9
    )

    # both splits spend the same share of the target: the Gaussian equivalents agree to the
    # calibration's tolerance
    def equivalent(plan: DPPlan) -> float:
        return 1 / math.sqrt(sum(1 / z**2 for z in plan.release_noise_multipliers))

    assert equivalent(default) == pytest.approx(equivalent(even), rel=0.02)


def test_release_noise_multiplier_refuses_an_unknown_name_or_a_plan_without_warm_start() -> None:
    plan = _plan(_cfg())
    with pytest.raises(ValueError, match="unknown release 'ratings'"):
        plan.release_noise_multiplier("ratings")
    cold = _plan(_cfg(enabled=False))
    with pytest.raises(ValueError, match="no warm-start release"):
        cold.release_noise_multiplier("popularity")


def test_a_larger_share_means_less_noise_on_the_releases_and_more_on_the_rounds() -> None:
    small, large = _plan(_cfg(share=0.5)), _plan(_cfg(share=0.9))
    for name in RELEASE_NAMES:
        assert large.release_noise_multiplier(name) < small.release_noise_multiplier(name)
    assert large.noise_multiplier > small.noise_multiplier


def test_a_warm_start_alone_spends_the_whole_target_on_the_releases() -> None:
    plan = _plan(_cfg(rounds=0, share=1.0))
    assert plan.rounds == 0 and len(plan.release_noise_multipliers) == 2
    releases = _prv(plan.release_steps, plan)
    assert 0.98 * TARGET <= releases <= TARGET
    # the plan's z is the single Gaussian equivalent of the two releases
    expected = 1 / math.sqrt(sum(1 / z**2 for z in plan.release_noise_multipliers))
    assert plan.noise_multiplier == pytest.approx(expected, rel=1e-12)
    assert plan.noise_multiplier < min(plan.release_noise_multipliers)
    # ... and one Gaussian step at that z (at f N answers) costs what the two releases cost
    single = _prv([MechanismStep(plan.noise_multiplier * _floor(plan), 1.0, 1)], plan)
    assert single == pytest.approx(releases, rel=0.01)


def test_a_release_at_its_fewest_answers_has_its_calibrated_noise() -> None:
    # Prepare: f = 0.9 of N = 1000, so at least 900 answers
    plan = _plan(_cfg(rounds=0, share=1.0, min_participation=0.9))
    calibrated = _plan(_cfg(rounds=0, share=1.0, min_participation=1.0))

    # Assert: the z is raised by 1 / sqrt(f), so at f N answers it is the calibrated one
    assert plan.release_min_clients == 900
    assert calibrated.release_min_clients == POPULATION
    for name in RELEASE_NAMES:
        z, z_cal = plan.release_noise_multiplier(name), calibrated.release_noise_multiplier(name)
        assert z == pytest.approx(z_cal / math.sqrt(0.9), rel=1e-12)
    assert [s.noise_multiplier for s in plan.release_steps] == pytest.approx(
        list(calibrated.release_noise_multipliers), rel=1e-12
    )
    # charged at 900 answers, the two releases spend the target; at N answers less
    claims = []
    for participated in (900, POPULATION):
        accountant = PrivacyAccountant(delta=plan.delta)
        for name in RELEASE_NAMES:
            last = charge_release(
                accountant, plan, name=name, invited=POPULATION, participated=participated
            )
        assert last.epsilon_accountant == "prv"
        claims.append(last.epsilon)
    at_floor, at_all = claims
    assert 0.98 * TARGET <= at_floor <= TARGET
    assert at_all < 0.98 * at_floor


def test_without_dp_a_warm_start_has_no_plan_and_any_share_goes() -> None:
    assert plan_privacy(_cfg(rounds=0, share=0.9, mode=PrivacyMode.OFF), POPULATION) is None
    assert plan_privacy(_cfg(rounds=5, share=1.0, mode=PrivacyMode.OFF), POPULATION) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds": 5, "share": 1.0}, "share = 1 gives the releases the whole budget"),
        ({"rounds": 0, "share": 0.9}, "rounds = 0 needs warm_start.share = 1"),
        ({"rounds": 0, "enabled": False}, r"0 only with warm_start"),
        ({"rounds": -1}, "rounds must be >= 1"),
        ({"mode": PrivacyMode.EXAMPLE, "target": None}, "needs privacy.mode = 'client' or 'off'"),
        ({"mode": PrivacyMode.EXAMPLE}, "needs privacy.mode = 'client' or 'off'"),
        ({"target": None}, "needs privacy.target_epsilon"),
    ],
)
def test_a_warm_start_config_that_cannot_be_planned_is_refused(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as err:
        _cfg(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_the_share_must_be_in_zero_one(share: float) -> None:
    with pytest.raises(ValueError, match=r"warm_start.share must be in \(0, 1\]"):
        WarmStartConfig(enabled=True, share=share)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_the_popularity_share_must_be_in_zero_one_open(share: float) -> None:
    with pytest.raises(ValueError, match=r"warm_start.popularity_share must be in \(0, 1\)"):
        WarmStartConfig(enabled=True, popularity_share=share)
    with pytest.raises(ValueError, match=r"popularity_share must be in \(0, 1\)"):
        calibrate_releases(
            target_epsilon=1.0, delta=1e-5, popularity_share=share, accountant=AccountantKind.RDP
        )


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, math.nan])
def test_the_min_participation_must_be_in_zero_one(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"warm_start.min_participation must be in \(0, 1\]"):
        WarmStartConfig(enabled=True, min_participation=fraction)


def test_the_popularity_share_is_read_from_a_config() -> None:
    cfg = parse(RunConfig, {"warm_start": {"enabled": True, "popularity_share": 0.4}})
    assert cfg.warm_start.popularity_share == 0.4
    assert parse(RunConfig, {}).warm_start.popularity_share == 0.2


# --- calibrate_releases -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "target", "delta", "accountant"),
    [
        (0.2, 2.0, 1e-5, AccountantKind.PRV),
        (0.5, 1.0, 1e-4, AccountantKind.PRV),
        (0.7, 4.0, 1e-5, AccountantKind.RDP),
    ],
)
def test_calibrate_releases_splits_by_share_and_composes_within_target(
    share: float, target: float, delta: float, accountant: AccountantKind
) -> None:
    # Execute
    zs = calibrate_releases(
        target_epsilon=target, delta=delta, popularity_share=share, accountant=accountant
    )

    # Assert: (popularity, cooccurrence), z_pop / z_cooc = sqrt((1 - p) / p)
    assert len(zs) == len(RELEASE_NAMES) == 2
    z_pop, z_cooc = zs
    assert z_pop / z_cooc == pytest.approx(math.sqrt((1 - share) / share), rel=1e-9)
    # the two compose to within 2% of the target, never above it
    steps = [MechanismStep(z, 1.0, 1) for z in zs]
    eps = compute_epsilon(steps, delta=delta, accountant=accountant)
    assert 0.98 * target <= eps <= target
    # and 5% less noise on both would overshoot: the calibration is not merely safe
    tighter = [MechanismStep(0.95 * z, 1.0, 1) for z in zs]
    assert compute_epsilon(tighter, delta=delta, accountant=accountant) > target


def test_calibrate_releases_needs_more_noise_for_a_smaller_target() -> None:
    kwargs: dict[str, Any] = {
        "delta": 1e-5,
        "popularity_share": 0.2,
        "accountant": AccountantKind.PRV,
    }
    loose = calibrate_releases(target_epsilon=4.0, **kwargs)
    tight = calibrate_releases(target_epsilon=1.0, **kwargs)
    assert all(t > 2 * lo for t, lo in zip(tight, loose, strict=True))


def test_calibrate_releases_refuses_a_target_it_cannot_certify() -> None:
    with pytest.raises(ValueError, match="target_epsilon must be >="):
        calibrate_releases(
            target_epsilon=1e-3, delta=1e-5, popularity_share=0.2, accountant=AccountantKind.PRV
        )


# --- charging and recording the releases ------------------------------------------------------

SMALL = 200


@pytest.fixture(scope="module")
def warm_plan() -> DPPlan:
    """N = 200, q = 0.1 (m = 20), 3 rounds after the releases, half the target on them."""
    return _plan(_cfg(rounds=3, share=0.5, q=0.1), SMALL)


@pytest.fixture(scope="module")
def alone_plan() -> DPPlan:
    """The warm start alone: rounds 0, share 1."""
    return _plan(_cfg(rounds=0, share=1.0, q=0.1), SMALL)


def test_a_release_is_a_round_of_all_clients_at_the_release_noise(warm_plan: DPPlan) -> None:
    # Prepare
    z = warm_plan.release_noise_multiplier("popularity")
    accountant = PrivacyAccountant(delta=warm_plan.delta)

    # Execute
    rec = charge_release(
        accountant, warm_plan, name=RELEASE_NAMES[0], invited=SMALL, participated=150
    )

    # Assert: q = 1, m = N, clip 1, z_eff = z * sqrt(k / N)
    record = rec.to_record()
    assert record["release"] == "popularity" and record["round"] == 1
    assert record["sample_rate"] == 1.0 and record["expected_participants"] == float(SMALL)
    assert record["clip"] == 1.0 and record["noise_multiplier"] == z
    assert record["effective_noise_multiplier"] == pytest.approx(z * math.sqrt(150 / SMALL))
    assert record["steps"] == 1 and record["released"] is True
    assert accountant.history == [MechanismStep(z * math.sqrt(150 / SMALL), 1.0, 1)]
    single = compute_epsilon(
        accountant.history, delta=warm_plan.delta, accountant=AccountantKind.RDP
    )
    assert record["epsilon_accountant"] == "rdp"
    assert record["epsilon"] == record["epsilon_rdp"] == pytest.approx(single, rel=1e-9)
    assert release_problem({"mechanism": "subsampled-gaussian", **record}, population=SMALL) is None
    # the second release is number 2, at its own z
    z_cooc = warm_plan.release_noise_multiplier("cooccurrence")
    assert z_cooc < z  # p = 0.2: the co-occurrence gets most of the budget
    second = charge_release(
        accountant, warm_plan, name=RELEASE_NAMES[1], invited=SMALL, participated=SMALL
    )
    assert (second.release, second.round, second.epsilon_accountant) == ("cooccurrence", 2, "rdp")
    assert second.noise_multiplier == z_cooc
    assert second.effective_noise_multiplier == pytest.approx(z_cooc)
    assert second.epsilon_rdp > rec.epsilon_rdp
    assert accountant.history[-1] == MechanismStep(z_cooc, 1.0, 1)


def test_release_problem_wants_a_known_name_at_its_position(warm_plan: DPPlan) -> None:
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    first, second = (
        {
            "mechanism": "subsampled-gaussian",
            **charge_release(
                accountant, warm_plan, name=name, invited=SMALL, participated=SMALL
            ).to_record(),
        }
        for name in RELEASE_NAMES
    )
    assert release_problem(first, population=SMALL) is None
    assert release_problem(second, population=SMALL) is None
    # a name at the other's position
    assert release_problem({**first, "round": 2}, population=SMALL) == (
        "release popularity: it is release 1, not 2"
    )
    assert release_problem({**second, "round": 1}, population=SMALL) == (
        "release cooccurrence: it is release 2, not 1"
    )
    # an unknown or missing name
    problem = release_problem({**first, "release": "ratings"}, population=SMALL)
    assert problem is not None and "release must be one of" in problem and "'ratings'" in problem
    without = {k: v for k, v in first.items() if k != "release"}
    problem = release_problem(without, population=SMALL)
    assert problem is not None and "got None" in problem


def test_a_release_nobody_answered_is_recorded_but_not_charged(warm_plan: DPPlan) -> None:
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    for name in RELEASE_NAMES:
        rec = charge_release(accountant, warm_plan, name=name, invited=SMALL, participated=0)
        assert not rec.released and accountant.history == [] and rec.epsilon == 0.0
        assert rec.effective_noise_multiplier == warm_plan.release_noise_multiplier(name)


def test_charge_release_refuses_an_unknown_name_or_a_plan_without_warm_start(
    warm_plan: DPPlan,
) -> None:
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    with pytest.raises(ValueError, match="unknown release 'ratings'"):
        charge_release(accountant, warm_plan, name="ratings", invited=SMALL, participated=SMALL)
    with pytest.raises(ValueError, match="unknown release 'ratings'"):
        release_plan(warm_plan, "ratings")
    cold = _plan(_cfg(rounds=3, enabled=False), SMALL)
    with pytest.raises(ValueError, match="no warm-start release"):
        release_plan(cold, "popularity")
    with pytest.raises(ValueError, match="no warm-start release"):
        charge_release(accountant, cold, name="popularity", invited=SMALL, participated=SMALL)
    assert accountant.history == []


@pytest.mark.parametrize("name", RELEASE_NAMES)
def test_release_plan_is_the_run_plan_at_q_one_over_everyone(warm_plan: DPPlan, name: str) -> None:
    rplan = release_plan(warm_plan, name)
    z = warm_plan.release_noise_multiplier(name)
    assert rplan.noise_multiplier == rplan.accounting_noise_multiplier == z
    assert (rplan.sample_rate, rplan.clip, rplan.expected_participants) == (1.0, 1.0, SMALL)
    assert (rplan.delta, rplan.population) == (warm_plan.delta, warm_plan.population)


def test_the_last_release_of_a_warm_start_alone_claims_prv(alone_plan: DPPlan) -> None:
    accountant = PrivacyAccountant(delta=alone_plan.delta)
    first = charge_release(
        accountant, alone_plan, name="popularity", invited=SMALL, participated=SMALL
    )
    last = charge_release(
        accountant, alone_plan, name="cooccurrence", invited=SMALL, participated=SMALL
    )
    assert first.epsilon_accountant == "rdp"
    assert last.epsilon_accountant == "prv"
    assert 0 < last.epsilon <= last.epsilon_rdp
    assert last.epsilon == pytest.approx(accountant.epsilon_prv())
    assert 0.98 * TARGET <= last.epsilon <= TARGET


def test_the_last_release_before_rounds_claims_rdp_and_the_last_round_the_whole_run(
    warm_plan: DPPlan,
) -> None:
    # Prepare / Execute: both releases answered by everyone, then rounds of m = 20 updates
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    for name in RELEASE_NAMES:
        rec = charge_release(accountant, warm_plan, name=name, invited=SMALL, participated=SMALL)
        assert rec.epsilon_accountant == "rdp"
    for rnd in range(1, warm_plan.rounds + 1):
        step = client_round_step(warm_plan, participated=20)
        last = charge_round(
            accountant, warm_plan, server_round=rnd, invited=25, participated=20, step=step
        )

    # Assert: the final claim composes the releases and the rounds, within the target
    assert last.epsilon_accountant == "prv"
    assert len(accountant.history) == len(RELEASE_NAMES) + warm_plan.rounds
    assert last.epsilon == pytest.approx(accountant.epsilon_prv())
    releases_only = _prv(warm_plan.release_steps, warm_plan)
    assert releases_only < last.epsilon <= TARGET


# --- the ledger -------------------------------------------------------------------------------


def _ledger(
    tmp_path: Path, plan: DPPlan, cfg: RunConfig
) -> tuple[LedgerWriter, PrivacyAccountant, list[dict[str, Any]]]:
    """A ledger with both releases written (all clients answering)."""
    writer = LedgerWriter.create(
        tmp_path / "ledger.jsonl", ledger_header(run_id="warm", cfg=cfg, plan=plan)
    )
    accountant = PrivacyAccountant(delta=plan.delta)
    written = []
    for name in RELEASE_NAMES:
        rec = charge_release(accountant, plan, name=name, invited=SMALL, participated=SMALL)
        written.append(writer.append_release(rec.to_record()))
    return writer, accountant, written


def _warm_cfg() -> RunConfig:
    return _cfg(rounds=3, share=0.5, q=0.1)


def test_the_ledger_writes_releases_before_the_rounds(tmp_path: Path, warm_plan: DPPlan) -> None:
    # Execute
    writer, accountant, written = _ledger(tmp_path, warm_plan, _warm_cfg())
    step = client_round_step(warm_plan, participated=18)
    rnd = charge_round(
        accountant, warm_plan, server_round=1, invited=20, participated=18, step=step
    )
    writer.append_round(rnd.to_record())

    # Assert
    records = read_ledger(writer.path)
    assert [r["type"] for r in records] == ["header", "release", "release", "round"]
    assert [r.get("release") for r in records[1:3]] == list(RELEASE_NAMES)
    assert [r["round"] for r in records[1:]] == [1, 2, 1]
    assert written == records[1:3]
    assert all(r["sample_rate"] == 1.0 and r["expected_participants"] == SMALL for r in written)
    assert (writer.releases, writer.rounds) == (2, 1)
    # the ledger's history is the accountant's: releases then rounds
    assert history_from_ledger(records) == accountant.history


def test_a_release_after_a_round_is_refused(tmp_path: Path, warm_plan: DPPlan) -> None:
    writer, accountant, _ = _ledger(tmp_path, warm_plan, _warm_cfg())
    step = client_round_step(warm_plan, participated=20)
    rnd = charge_round(
        accountant, warm_plan, server_round=1, invited=20, participated=20, step=step
    )
    writer.append_round(rnd.to_record())
    again = charge_release(
        accountant, warm_plan, name="popularity", invited=SMALL, participated=SMALL
    )
    with pytest.raises(ValueError, match="before the first round"):
        writer.append_release({**again.to_record(), "round": 3})


def test_a_release_out_of_order_or_with_forged_fields_is_refused(
    tmp_path: Path, warm_plan: DPPlan
) -> None:
    # Prepare
    cfg = _warm_cfg()
    writer = LedgerWriter.create(
        tmp_path / "ledger.jsonl", ledger_header(run_id="warm", cfg=cfg, plan=warm_plan)
    )
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    good = charge_release(
        accountant, warm_plan, name="popularity", invited=SMALL, participated=150
    ).to_record()

    # Execute / Assert
    with pytest.raises(ValueError, match="release must be 1, got 2"):
        writer.append_release({**good, "round": 2})
    with pytest.raises(ValueError, match="sample_rate must be 1"):
        writer.append_release({**good, "sample_rate": 0.1, "expected_participants": 20.0})
    with pytest.raises(ValueError, match="effective_noise_multiplier"):
        writer.append_release({**good, "participated": 100})  # z_eff no longer z sqrt(k / N)
    with pytest.raises(ValueError, match="expected_participants"):
        writer.append_release({**good, "expected_participants": 20.0})
    with pytest.raises(ValueError, match="release must be one of"):
        writer.append_release({k: v for k, v in good.items() if k != "release"})
    assert writer.releases == 0 and len(read_ledger(writer.path)) == 1
    writer.append_release(good)
    assert writer.releases == 1


def test_open_existing_resumes_a_ledger_with_releases(tmp_path: Path, warm_plan: DPPlan) -> None:
    # Prepare: a run that stopped after its first release
    cfg = _warm_cfg()
    path = tmp_path / "ledger.jsonl"
    first = LedgerWriter.create(path, ledger_header(run_id="warm", cfg=cfg, plan=warm_plan))
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    rec = charge_release(
        accountant, warm_plan, name="popularity", invited=SMALL, participated=SMALL
    )
    first.append_release(rec.to_record())

    # Execute: resume, write the second release and a round, resume again
    writer = LedgerWriter.open_existing(path)
    assert (writer.releases, writer.rounds) == (1, 0)
    with pytest.raises(ValueError, match="release must be 2, got 1"):
        writer.append_release(rec.to_record())
    rec2 = charge_release(
        accountant, warm_plan, name="cooccurrence", invited=SMALL, participated=SMALL
    )
    writer.append_release(rec2.to_record())
    step = client_round_step(warm_plan, participated=20)
    rnd = charge_round(
        accountant, warm_plan, server_round=1, invited=20, participated=20, step=step
    )
    writer.append_round(rnd.to_record())
    resumed = LedgerWriter.open_existing(path)

    # Assert
    assert (resumed.releases, resumed.rounds) == (2, 1)
    lines = read_ledger_lines(path)
    assert [line.record["type"] for line in lines] == ["header", "release", "release", "round"]
    assert all(b.record["prev"] == a.sha256 for a, b in itertools.pairwise(lines))
    with pytest.raises(ValueError, match="before the first round"):
        resumed.append_release({**rec2.to_record(), "round": 3})
    rnd2 = charge_round(
        accountant, warm_plan, server_round=2, invited=20, participated=20, step=step
    )
    resumed.append_round(rnd2.to_record())
    assert history_from_ledger(read_ledger(path)) == accountant.history


def test_open_existing_refuses_a_release_line_after_a_round(
    tmp_path: Path, warm_plan: DPPlan
) -> None:
    # Prepare: a round, then a release line chained correctly by hand (not by the writer)
    cfg = _warm_cfg()
    path = tmp_path / "ledger.jsonl"
    writer = LedgerWriter.create(path, ledger_header(run_id="warm", cfg=cfg, plan=warm_plan))
    accountant = PrivacyAccountant(delta=warm_plan.delta)
    step = client_round_step(warm_plan, participated=20)
    rnd = charge_round(
        accountant, warm_plan, server_round=1, invited=20, participated=20, step=step
    )
    writer.append_round(rnd.to_record())
    rel = charge_release(
        accountant, warm_plan, name="popularity", invited=SMALL, participated=SMALL
    )
    forged = {
        "mechanism": "subsampled-gaussian",
        **rel.to_record(),
        "type": "release",
        "prev": read_ledger_lines(path)[-1].sha256,
    }
    with path.open("ab") as fh:
        fh.write(canonical_json(forged) + b"\n")

    # Execute / Assert
    with pytest.raises(DataError, match="expected round record 2, got 'release'"):
        LedgerWriter.open_existing(path)
    assert json.loads(path.read_bytes().splitlines()[-1])["type"] == "release"

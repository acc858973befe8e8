"""The auditor cross-checks the ledger against the run's config: consistent rewrites fail.

Each rewrite is made as a forger would make it: with the project's own planning and charging
code (:func:`common.privacy.plan_privacy`, :func:`common.privacy.rounds.charge_round`,
:func:`common.privacy.rounds.ledger_header`), so the hash chain, the derived fields and every
epsilon claim are consistent, and only the cross-checks against the header's config (and the
partition) can tell.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from common.cli import add_common_commands, run_handler
from common.config import parse
from common.privacy import DPPlan, PrivacyAccountant, default_delta, plan_privacy
from common.privacy.audit import AuditStatus, verify_ledger
from common.privacy.ledger import LedgerWriter
from common.privacy.rounds import PrivacyRound, charge_round, client_round_step, ledger_header
from common.run.config import RunConfig

ROUNDS = 8
POPULATION = 44  # training users (= clients) of the synthetic partition below
PARTICIPATION = [22, 27, 20, 27, 22, 20, 27, 22]  # few distinct counts: PRV stays cheap
CONFIG: dict[str, Any] = {
    "name": "audit-config",
    "rounds": ROUNDS,
    "reference": False,
    "data": {"n_heldout_users": 8},
    "model": {"dims": [16, 8]},
    "server": {"sample_rate": 0.5},
    "privacy": {"mode": "client", "clip": 0.5, "noise_multiplier": 1.0},
}


def _cfg(**privacy: Any) -> RunConfig:
    raw = {**CONFIG, "privacy": {**CONFIG["privacy"], **privacy}}
    return parse(RunConfig, raw)


def _ledger(
    path: Path,
    cfg: RunConfig,
    *,
    plan: DPPlan | None = None,
    participation: list[int] = PARTICIPATION,
    header_cfg: RunConfig | None = None,
) -> Path:
    """A finished ledger made by the project's code; ``plan`` (default: the honest one for
    ``cfg`` and :data:`POPULATION`) charges the rounds, ``header_cfg`` goes in the header."""
    plan = plan or plan_privacy(cfg, POPULATION)
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    header = ledger_header(run_id="run", cfg=header_cfg or cfg, plan=plan)
    writer = LedgerWriter.create(path, header)
    last: PrivacyRound | None = None
    for rnd, k in enumerate(participation, start=1):
        last = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k + 2,
            participated=k,
            step=client_round_step(plan, participated=k),
        )
        writer.append_round(last.to_record())
    assert last is not None
    writer.close(epsilon=last.epsilon, epsilon_rdp=last.epsilon_rdp)
    return path


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder prepared by the operator's code: 44 per-user clients."""
    from common.data import synthesize
    from common.run.folder import write_run_folder

    root = tmp_path_factory.mktemp("partition")
    data = synthesize(60, 40, seed=3, out_dir=root / "synth")
    cfg = dataclasses.replace(_cfg(), data=dataclasses.replace(_cfg().data, dataset=str(data)))
    prepared = write_run_folder(cfg, root / "run")
    assert prepared.n_clients == POPULATION
    return root / "run" / "data"


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ledger(tmp_path_factory.mktemp("honest") / "ledger.jsonl", _cfg())


def _failed(report: Any, check: str) -> str:
    assert report.status is AuditStatus.FAILED, report.reason
    failed = [(name, detail) for name, passed, detail in report.checks if not passed]
    assert check in [name for name, _ in failed], failed
    return str(dict(failed)[check])


def test_honest_ledger_verifies_against_its_config_and_partition(
    honest: Path, partition: Path
) -> None:
    # Execute
    report = verify_ledger(honest, partition=partition)

    # Assert
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert ("population", True) in [(name, ok) for name, ok, _ in report.checks]
    assert ("config", True) in [(name, ok) for name, ok, _ in report.checks]


def test_honest_ledger_without_partition_verifies_with_a_note(honest: Path) -> None:
    report = verify_ledger(honest)

    assert report.status is AuditStatus.VERIFIED, report.reason
    notes = {name: detail for name, _, detail in report.checks}
    assert notes["population"] == "44, not checked against the run's partition (give --partition)"


def test_a_smaller_population_fails_against_the_partition(tmp_path: Path, partition: Path) -> None:
    # Prepare: the forger re-plans for 20 clients (m = 10, delta 1/20^1.1) with fewer
    # participants, so that every derived field and the default delta agree
    cfg = _cfg()
    plan = plan_privacy(cfg, 20)
    assert plan is not None
    forged = _ledger(
        tmp_path / "ledger.jsonl", cfg, plan=plan, participation=[k // 2 for k in PARTICIPATION]
    )
    # (without the partition the rewrite is consistent: the population is what it says)
    assert verify_ledger(forged).status is AuditStatus.VERIFIED

    # Execute
    report = verify_ledger(forged, partition=partition)

    # Assert
    detail = _failed(report, "population")
    assert detail == "header population 20 is not the partition's 44 clients"


def test_a_larger_noise_multiplier_than_configured_fails(tmp_path: Path) -> None:
    # Prepare: rounds charged at z = 3 while the header's config says 1.0
    cfg = _cfg()
    honest_plan = plan_privacy(cfg, POPULATION)
    assert honest_plan is not None
    plan = dataclasses.replace(honest_plan, noise_multiplier=3.0, accounting_noise_multiplier=3.0)
    forged = _ledger(tmp_path / "ledger.jsonl", cfg, plan=plan)

    # Execute
    report = verify_ledger(forged)

    # Assert
    detail = _failed(report, "config")
    assert detail.startswith("round 1: noise_multiplier 3 is not the config's 1")


def test_a_target_epsilon_run_claims_the_recalibrated_multiplier(tmp_path: Path) -> None:
    # Prepare: with target_epsilon the auditor recalibrates z from the header's config
    cfg = _cfg(noise_multiplier=None, target_epsilon=8.0)
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    honest = _ledger(tmp_path / "honest.jsonl", cfg, plan=plan)
    inflated = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier * 1.5)
    forged = _ledger(tmp_path / "forged.jsonl", cfg, plan=inflated)

    # Execute
    good = verify_ledger(honest)
    bad = verify_ledger(forged)

    # Assert
    assert good.status is AuditStatus.VERIFIED, good.reason
    detail = _failed(bad, "config")
    assert "is not the recalibrated" in detail


def test_unreleased_rounds_with_participants_fail(tmp_path: Path) -> None:
    # Prepare: the two rounds with 27 updates recorded as released nothing (not charged)
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    path = tmp_path / "ledger.jsonl"
    writer = LedgerWriter.create(path, ledger_header(run_id="run", cfg=cfg, plan=plan))
    last: PrivacyRound | None = None
    for rnd, k in enumerate(PARTICIPATION, start=1):
        shown = 0 if k == 27 else k  # charged as if nothing came back...
        last = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k + 2,
            participated=shown,
            step=client_round_step(plan, participated=max(shown, 1)),
        )
        if k == 27:  # ...but the line says 27 came back
            last = dataclasses.replace(last, participated=27)
        writer.append_round(last.to_record())
    assert last is not None
    writer.close(epsilon=last.epsilon, epsilon_rdp=last.epsilon_rdp)

    # Execute
    report = verify_ledger(path)

    # Assert
    detail = _failed(report, "config")
    assert detail == "round 2: 27 updates came back but released is false (charged as nothing)"


def test_a_deleted_round_fails_against_the_configured_rounds(tmp_path: Path) -> None:
    # Prepare: round 4 removed and the rest renumbered 1..7, charged again from scratch
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    seven = dataclasses.replace(plan, rounds=ROUNDS - 1)  # PRV claimed at the new last round
    forged = _ledger(
        tmp_path / "ledger.jsonl",
        cfg,
        plan=seven,
        participation=PARTICIPATION[:3] + PARTICIPATION[4:],
    )

    # Execute
    report = verify_ledger(forged)

    # Assert
    detail = _failed(report, "config")
    assert detail == "the final line closes the run after 7 rounds, the config has 8"


def test_a_larger_delta_than_the_default_fails(tmp_path: Path) -> None:
    # Prepare: delta 1/44^1.1 = 0.0156 rewritten to 0.1 (the config does not set delta)
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    assert plan.delta == pytest.approx(0.0156, abs=1e-4)
    forged = _ledger(tmp_path / "ledger.jsonl", cfg, plan=dataclasses.replace(plan, delta=0.1))

    # Execute
    report = verify_ledger(forged)

    # Assert
    detail = _failed(report, "config")
    assert detail == (
        f"header delta 0.1 is not the default 1/N^1.1 = {default_delta(POPULATION):.6g} "
        "(privacy.delta is not set)"
    )


def test_an_explicit_delta_verifies_with_a_warning(tmp_path: Path) -> None:
    cfg = _cfg(delta=1e-3)
    ledger = _ledger(tmp_path / "ledger.jsonl", cfg)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.VERIFIED, report.reason
    assert any("privacy.delta = 0.001 set explicitly" in w for w in report.warnings)


def test_a_delta_of_one_over_n_or_more_fails(tmp_path: Path) -> None:
    cfg = _cfg(delta=0.05)  # >= 1/44: no guarantee at all
    ledger = _ledger(tmp_path / "ledger.jsonl", cfg)

    report = verify_ledger(ledger)

    detail = _failed(report, "config")
    assert detail.startswith("header delta 0.05 is not below 1/N = ")


def test_a_config_that_does_not_parse_fails(tmp_path: Path) -> None:
    # Prepare: a header config with a key no run config has
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    path = tmp_path / "ledger.jsonl"
    header = ledger_header(run_id="run", cfg=cfg, plan=plan)
    header["config"] = {**header["config"], "roundz": 3}
    LedgerWriter.create(path, header)

    # Execute
    report = verify_ledger(path)

    # Assert
    detail = _failed(report, "config")
    assert detail.startswith("the header's config is not a run config: unknown config key")


def test_a_clip_other_than_the_configs_fails(tmp_path: Path) -> None:
    cfg = _cfg()
    ledger = _ledger(tmp_path / "ledger.jsonl", cfg)
    header_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, clip=2.0))
    forged = _ledger(tmp_path / "forged.jsonl", cfg, header_cfg=header_cfg)

    assert verify_ledger(ledger).status is AuditStatus.VERIFIED
    detail = _failed(verify_ledger(forged), "config")
    assert detail == "round 1: clip 0.5 is not the config's 2"


def _fedrec(argv: list[str]) -> int:
    """``fedrec ARGV`` with only the commands of common/ registered."""
    parser = argparse.ArgumentParser(prog="fedrec")
    add_common_commands(parser.add_subparsers(required=True))
    return run_handler(parser.parse_args(argv))


def test_audit_verify_exit_codes_with_a_partition(
    tmp_path: Path, honest: Path, partition: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the population rewrite of above, and a partition path that holds none
    cfg = _cfg()
    forged = _ledger(
        tmp_path / "ledger.jsonl",
        cfg,
        plan=plan_privacy(cfg, 20),
        participation=[k // 2 for k in PARTICIPATION],
    )

    # Execute
    verified = _fedrec(["audit", "verify", str(honest), "--partition", str(partition)])
    failed = _fedrec(["audit", "verify", str(forged), "--partition", str(partition)])
    bad_input = _fedrec(["audit", "verify", str(honest), "--partition", str(tmp_path / "none")])

    # Assert: 0 verified, 1 failed, 2 bad input
    assert (verified, failed, bad_input) == (0, 1, 2)
    assert "no partition here" in capsys.readouterr().err

"""``fedrec audit verify``: a real ledger verifies; every kind of tampering is caught."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.privacy import AccountantKind, MechanismStep, compute_epsilon
from common.privacy.audit import (
    PRV_EPSILON_SLACK,
    UNFINISHED_REASON,
    AuditStatus,
    render,
    verify_ledger,
)
from common.privacy.ledger import (
    LedgerWriter,
    canonical_json,
    chain_digest,
    history_from_ledger,
    line_hash,
)

POPULATION = 100
Q = 0.05
M = Q * POPULATION  # expected participants: 5
Z = 1.1
DELTA = 1e-4  # <= 1 / N^1.1 = 6.3e-3, set in the config
# heterogeneous participation (so effective multipliers differ); no update came back in round 9
PARTICIPATION = [5, 5, 5, 4, 4, 6, 6, 6, 0, 5, 5, 4, 4, 4, 6, 6, 5, 5, 4, 5]
MIN_PARTICIPANTS = 1
CONFIG: dict[str, Any] = {  # the header's config: common.config.to_dict of a RunConfig
    "rounds": len(PARTICIPATION),
    "server": {"sample_rate": Q},
    "privacy": {"mode": "client", "clip": 1.0, "noise_multiplier": Z, "delta": DELTA},
}


def _rounds() -> list[dict[str, Any]]:
    """The 20 round records with honest claims: RDP per round, PRV at the last round."""
    records: list[dict[str, Any]] = []
    orders = RDPAccountant.DEFAULT_ALPHAS
    curves: dict[float, np.ndarray] = {}
    total = np.zeros(len(orders))
    eps_rdp = 0.0
    for r, participated in enumerate(PARTICIPATION, start=1):
        released = participated >= MIN_PARTICIPANTS
        # a round that released nothing records the configured z (charge_round)
        z_eff = Z * math.sqrt(participated / M) if released else Z
        if released:
            if z_eff not in curves:
                curves[z_eff] = np.asarray(
                    rdp_analysis.compute_rdp(q=Q, noise_multiplier=z_eff, steps=1, orders=orders)
                )
            total = total + curves[z_eff]
            eps_rdp = float(
                rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=DELTA)[0]
            )
        records.append(
            {
                "round": r,
                "sample_rate": Q,
                "invited": 8,
                "participated": participated,
                "expected_participants": M,
                "clip": 1.0,
                "noise_multiplier": Z,
                "effective_noise_multiplier": z_eff,
                "steps": 1,
                "epsilon": eps_rdp,  # capped at the final PRV epsilon below
                "epsilon_rdp": eps_rdp,
                "released": released,
            }
        )
    # one step per distinct multiplier (composition is commutative): PRV pays per distinct step
    counts = Counter(
        step.noise_multiplier
        for step in history_from_ledger([{"type": "round", **rec} for rec in records])
    )
    history = [MechanismStep(noise_multiplier=z, sample_rate=Q, steps=n) for z, n in counts.items()]
    eps_prv = compute_epsilon(history, delta=DELTA, accountant=AccountantKind.PRV)
    for rec in records:
        # min(RDP so far, final PRV) bounds every round's epsilon: a valid, non-decreasing claim
        rec["epsilon"] = min(rec["epsilon"], eps_prv)
    return records


def _write(path: Path, rounds: list[dict[str, Any]], *, stop: int | None = None) -> LedgerWriter:
    """A ledger as the server writes it; ``stop`` rounds only (then no final line)."""
    writer = LedgerWriter.create(
        path,
        {
            "run_id": "audit-test",
            "code_version": "0.1.0+test",
            "config": CONFIG,
            "population": POPULATION,
            "delta": DELTA,
            "mode": "client",
        },
    )
    for rec in rounds[:stop]:
        writer.append_round(rec)
    if stop is None:
        writer.close(epsilon=rounds[-1]["epsilon"], epsilon_rdp=rounds[-1]["epsilon_rdp"])
    return writer


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rounds = _rounds()
    path = tmp_path_factory.mktemp("run") / "ledger.jsonl"
    _write(path, rounds)
    return path


@pytest.fixture
def ledger(honest: Path, tmp_path: Path) -> Path:
    """A fresh copy of the honest ledger to tamper with."""
    return Path(shutil.copy(honest, tmp_path / "ledger.jsonl"))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _save(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _forge(path: Path, line: int | None, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit line ``line`` (0-based; ``None``: every round and the final) and rewrite the hash
    chain after it, as a forger would."""
    records = [json.loads(raw) for raw in _lines(path)]
    for i, rec in enumerate(records):
        if i == line or (line is None and rec["type"] != "header"):
            edit(rec)
    raws: list[bytes] = []
    for i, rec in enumerate(records):
        if i > 0:
            rec["prev"] = line_hash(raws[-1])
        if rec["type"] == "final":
            rec["chain"] = chain_digest([line_hash(raw) for raw in raws])
        raws.append(canonical_json(rec))
    _save(path, raws)


def test_honest_ledger_verifies(honest: Path) -> None:
    # Execute
    report = verify_ledger(honest.parent)

    # Assert
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert report.rounds == 20
    assert all(passed for _, passed, _ in report.checks)
    assert report.claimed_epsilon >= report.recomputed_epsilon_prv - PRV_EPSILON_SLACK
    assert 0 < report.recomputed_epsilon_prv < report.recomputed_epsilon_rdp
    assert report.to_json()["status"] == "verified"
    assert render(report).startswith("VERIFIED: all ")


def test_rdp_epsilon_matches_opacus_driven_step_by_step(honest: Path) -> None:
    # Prepare: an independent accountant fed each released round's effective multiplier
    accountant = RDPAccountant()
    for participated in PARTICIPATION:
        if participated >= MIN_PARTICIPANTS:
            accountant.step(noise_multiplier=Z * math.sqrt(participated / M), sample_rate=Q)

    # Execute
    report = verify_ledger(honest)

    # Assert
    expected = accountant.get_epsilon(DELTA)
    assert report.recomputed_epsilon_rdp == pytest.approx(expected, rel=1e-6)


def test_edited_number_breaks_the_chain(ledger: Path) -> None:
    # Prepare: round 7 (line 8) claims one more participant
    lines = _lines(ledger)
    assert b'"participated":6' in lines[7]
    lines[7] = lines[7].replace(b'"participated":6', b'"participated":7')
    _save(ledger, lines)

    # Execute
    report = verify_ledger(ledger)

    # Assert
    assert report.status is AuditStatus.FAILED
    assert report.reason == (
        "line 9: prev is not the SHA-256 of line 8 (a line was edited, removed or reordered)"
    )


def test_removed_line_breaks_the_chain(ledger: Path) -> None:
    lines = _lines(ledger)
    _save(ledger, lines[:10] + lines[11:])

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("line 11: prev is not the SHA-256 of line 10")


def test_swapped_lines_break_the_chain(ledger: Path) -> None:
    lines = _lines(ledger)
    lines[5], lines[6] = lines[6], lines[5]
    _save(ledger, lines)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("line 6: prev is not the SHA-256 of line 5")
    assert any(name == "round numbering" and not ok for name, ok, _ in report.checks)


def test_missing_final_line_is_unfinished(ledger: Path) -> None:
    _save(ledger, _lines(ledger)[:-1])

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.UNFINISHED
    assert report.reason == UNFINISHED_REASON


def test_cut_final_and_last_round_is_unfinished_not_failed(ledger: Path) -> None:
    # Documented limit: a clean cut after a round looks like a run still in progress.
    _save(ledger, _lines(ledger)[:-2])

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.UNFINISHED
    assert report.rounds == 19


def test_lowered_epsilon_in_final_line_fails(ledger: Path) -> None:
    lines = _lines(ledger)
    final = json.loads(lines[-1])
    final["epsilon"] = 0.5
    lines[-1] = canonical_json(final)
    _save(ledger, lines)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("final epsilon 0.5 is not the last round's")


def test_forged_chain_with_lowered_last_epsilon_fails(ledger: Path) -> None:
    # Prepare: every PRV claim halved (so they still never decrease), the chain rewritten
    def lower(rec: dict[str, Any]) -> None:
        rec["epsilon"] *= 0.5

    _forge(ledger, None, lower)

    # Execute
    report = verify_ledger(ledger)

    # Assert
    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("claimed epsilon ")
    assert " is below the recomputed " in report.reason
    assert report.reason.endswith(" at round 20")


def test_forged_chain_with_a_decreasing_claim_fails(ledger: Path) -> None:
    def lower(rec: dict[str, Any]) -> None:
        rec["epsilon"] = 0.01

    _forge(ledger, 15, lower)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("claimed epsilon 0.01 at round 15 is below the previous")


def test_forged_chain_with_lowered_rdp_epsilon_fails(ledger: Path) -> None:
    def lower(rec: dict[str, Any]) -> None:
        rec["epsilon_rdp"] *= 0.9

    _forge(ledger, 10, lower)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("claimed epsilon_rdp ")
    assert report.reason.endswith(" at round 10")


def test_forged_chain_with_edited_participation_fails(ledger: Path) -> None:
    def more_noise(rec: dict[str, Any]) -> None:
        rec["participated"] = 8

    _forge(ledger, 7, more_noise)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith("round 7: effective_noise_multiplier ")


def test_forged_chain_with_consistent_participation_fails(ledger: Path) -> None:
    # more participants -> more noise -> a smaller epsilon than what was really spent
    def more_noise(rec: dict[str, Any]) -> None:
        rec["participated"] = 8
        rec["effective_noise_multiplier"] = Z * math.sqrt(8 / M)

    _forge(ledger, 4, more_noise)

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.endswith(" at round 4")


def test_budget_below_epsilon_fails_and_above_verifies(honest: Path) -> None:
    epsilon = verify_ledger(honest).recomputed_epsilon_prv

    below = verify_ledger(honest, budget=epsilon * 0.9)
    above = verify_ledger(honest, budget=epsilon * 1.1)

    assert below.status is AuditStatus.FAILED
    assert below.reason.startswith(f"epsilon {epsilon:.6g} exceeds the budget")
    assert above.status is AuditStatus.VERIFIED


def test_truncated_last_line_fails_with_one_line_reason(ledger: Path) -> None:
    data = ledger.read_bytes()
    ledger.write_bytes(data[: len(data) - 30])

    report = verify_ledger(ledger)

    assert report.status is AuditStatus.FAILED
    assert report.reason.startswith(f"{ledger}:22: incomplete last line")
    assert "\n" not in report.reason


def test_resumed_ledger_verifies(tmp_path: Path, honest: Path) -> None:
    # Prepare: a run stopped after round 12, then the server restarted
    path = tmp_path / "ledger.jsonl"
    rounds = _rounds_from(honest)
    _write(path, rounds, stop=12)

    # Execute
    writer = LedgerWriter.open_existing(path)
    for rec in rounds[12:]:
        writer.append_round(rec)
    writer.close(epsilon=rounds[-1]["epsilon"], epsilon_rdp=rounds[-1]["epsilon_rdp"])

    # Assert
    report = verify_ledger(path)
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert report.recomputed_epsilon_prv == verify_ledger(honest).recomputed_epsilon_prv


def _rounds_from(path: Path) -> list[dict[str, Any]]:
    keep = {"type", "prev"}
    return [
        {k: v for k, v in json.loads(raw).items() if k not in keep}
        for raw in _lines(path)
        if json.loads(raw)["type"] == "round"
    ]


def test_dp_off_is_unbounded_and_fails_any_budget(tmp_path: Path) -> None:
    # Prepare
    writer = LedgerWriter.create(
        tmp_path / "ledger.jsonl",
        {
            "run_id": "off",
            "code_version": "test",
            "config": {"rounds": 1},
            "population": POPULATION,
            "delta": DELTA,
            "mode": "off",
        },
    )
    writer.append_round(
        {
            "round": 1,
            "sample_rate": Q,
            "invited": 5,
            "participated": 5,
            "expected_participants": M,
            "clip": 1.0,
            "noise_multiplier": 0.0,
            "effective_noise_multiplier": 0.0,
            "steps": 1,
            "epsilon": None,
            "epsilon_rdp": None,
            "released": True,
        }
    )
    writer.close(epsilon=None, epsilon_rdp=None)

    # Execute
    plain = verify_ledger(tmp_path)
    budgeted = verify_ledger(tmp_path, budget=10.0)

    # Assert
    assert plain.status is AuditStatus.VERIFIED
    assert math.isinf(plain.recomputed_epsilon_prv) and math.isinf(plain.claimed_epsilon)
    assert plain.to_json()["recomputed_epsilon_prv"] is None
    assert plain.to_json()["unbounded"] is True
    assert budgeted.status is AuditStatus.FAILED
    assert budgeted.reason == "DP is off: epsilon is unbounded, above the budget 10"


def test_invalid_budget_is_rejected(honest: Path) -> None:
    with pytest.raises(ValueError, match="budget"):
        verify_ledger(honest, budget=math.nan)

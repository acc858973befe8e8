"""The second epsilon: each client against the aggregator, who knows who took part.

:func:`common.privacy.accounting.gaussian_epsilon` (the analytic Gaussian mechanism of Balle and
Wang 2018) is checked against Opacus's PRV accountant and against the defining inequality;
:class:`common.privacy.accounting.AggregatorView` composes, per client, the lines it took part
in; the ledger validates the ``participants`` and ``epsilon_aggregator`` fields; the auditor
recomputes every claim from the participants (an honest in-process run verifies, a forged line
fails), with the effective (decrypted sum's) noise multiplier when the header's config encrypts.
Forgeries are made as a forger holding the server key would make them: edit, then re-chain and
re-sign every line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import norm

from common.config import parse
from common.privacy import (
    AccountantKind,
    AggregatorView,
    MechanismStep,
    PrivacyAccountant,
    compute_epsilon,
    gaussian_epsilon,
    plan_privacy,
)
from common.privacy.audit import AuditReport, AuditStatus, render, verify_ledger
from common.privacy.ledger import (
    LedgerWriter,
    canonical_json,
    chain_digest,
    line_hash,
    read_ledger,
    signed_body,
)
from common.privacy.rounds import (
    PrivacyRound,
    charge_aggregator,
    charge_round,
    client_round_step,
    ledger_header,
    privacy_summary,
    resume_aggregator,
)
from common.privacy.signing import server_signer
from common.run.config import RunConfig, load_run_config
from common.run.folder import n_clients_of, write_run_folder
from simulations.fastsim import run_inprocess

DELTA = 1e-5


def _balle_wang_delta(mu: float, eps: float) -> float:
    """The delta of one Gaussian mechanism at ``eps`` (Balle and Wang 2018, Theorem 8)."""
    return float(norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu))


# ---- gaussian_epsilon ----------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_gaussian_epsilon_agrees_with_opacus_prv_for_one_step_at_q_one(
    z: float, delta: float
) -> None:
    exact = gaussian_epsilon(1.0 / z, delta)
    prv = compute_epsilon([MechanismStep(z, 1.0, 1)], delta=delta, accountant=AccountantKind.PRV)

    # PRV returns the upper end of its error interval (eps_error 0.01): at or above the exact one
    assert 0.0 <= prv - exact <= 0.02


@pytest.mark.parametrize("mu", [0.01, 0.3, 1.0, 2.0, 5.0])
def test_gaussian_epsilon_is_the_smallest_epsilon_of_the_definition(mu: float) -> None:
    eps = gaussian_epsilon(mu, DELTA)

    assert _balle_wang_delta(mu, eps) <= DELTA
    assert _balle_wang_delta(mu, eps * (1 - 1e-6)) > DELTA


def test_gaussian_epsilon_is_zero_at_mu_zero_and_monotone() -> None:
    assert gaussian_epsilon(0.0, DELTA) == 0.0
    mus = [0.0, 1e-3, 0.1, 0.5, 1.0, 2.0, 4.0, 10.0, 30.0]
    eps = [gaussian_epsilon(mu, DELTA) for mu in mus]
    assert all(a < b for a, b in itertools.pairwise(eps))
    # a larger delta buys a smaller epsilon
    assert gaussian_epsilon(1.0, 1e-3) < gaussian_epsilon(1.0, 1e-5)


@pytest.mark.parametrize("mu", [50.0, 200.0])
def test_gaussian_epsilon_handles_a_huge_mu_without_overflow(mu: float) -> None:
    eps = gaussian_epsilon(mu, DELTA)

    # about mu^2 / 2 + mu * Phi^-1(1 - delta): e^eps is far beyond a float, the answer is not
    assert math.isfinite(eps)
    assert mu**2 / 2 < eps < mu**2 / 2 + mu * 5


@pytest.mark.parametrize("mu", [-1.0, math.nan, math.inf])
def test_gaussian_epsilon_refuses_an_invalid_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="mu"):
        gaussian_epsilon(mu, DELTA)


# ---- AggregatorView ------------------------------------------------------------------------------


def test_aggregator_view_picks_the_most_exposed_client() -> None:
    view = AggregatorView(delta=DELTA)
    assert view.epsilon() == 0.0 and view.worst_mu == 0.0

    view.add([0, 1, 2], 1.0)
    view.add([1], 2.0)  # client 1 took part once more
    view.add([2, 3], 4.0)

    # client 1: 1 + 1/4; client 2: 1 + 1/16; client 0: 1; client 3: 1/16
    assert view.worst_mu == pytest.approx(math.sqrt(1.25))
    assert view.epsilon() == pytest.approx(gaussian_epsilon(math.sqrt(1.25), DELTA))
    # what each client's guard checks: its own sum plus the next release
    assert view.epsilon_after(3, 1.0) == pytest.approx(gaussian_epsilon(math.sqrt(1.0625), DELTA))
    assert view.epsilon_after(0, 2.0) == pytest.approx(view.epsilon())
    assert view.epsilon_after(9, 1.0) == pytest.approx(gaussian_epsilon(1.0, DELTA))  # unseen


def test_aggregator_view_refuses_a_release_without_noise() -> None:
    view = AggregatorView(delta=DELTA)
    with pytest.raises(ValueError, match="noise_multiplier"):
        view.add([0], 0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        view.epsilon_after(0, 0.0)


@pytest.mark.parametrize(("z1", "z2"), [(1.0, 1.0), (0.7, 2.5), (3.0, 1.2)])
def test_two_lines_compose_into_one_gaussian(z1: float, z2: float) -> None:
    two = AggregatorView(delta=DELTA)
    two.add([5], z1)
    two.add([5], z2)
    one = AggregatorView(delta=DELTA)
    one.add([5], 1.0 / math.sqrt(1 / z1**2 + 1 / z2**2))

    assert two.epsilon() == pytest.approx(one.epsilon(), rel=1e-12)
    # and the exact composition is what PRV finds for the two steps at q = 1 (within its error)
    prv = compute_epsilon(
        [MechanismStep(z1, 1.0, 1), MechanismStep(z2, 1.0, 1)],
        delta=DELTA,
        accountant=AccountantKind.PRV,
    )
    assert 0.0 <= prv - two.epsilon() <= 0.02


# ---- charge_aggregator / resume_aggregator -------------------------------------------------------


def _record(*, participated: int, z: float = 1.0, m: float = 4.0, rnd: int = 1) -> PrivacyRound:
    released = participated > 0
    return PrivacyRound(
        round=rnd,
        sample_rate=0.1,
        invited=participated + 1,
        participated=participated,
        expected_participants=m,
        clip=1.0,
        noise_multiplier=z,
        effective_noise_multiplier=z * math.sqrt(participated / m) if released else z,
        steps=1,
        released=released,
        epsilon=1.0,
        epsilon_accountant="rdp",
        epsilon_rdp=1.0,
    )


def test_charge_aggregator_fills_the_participants_and_the_epsilon() -> None:
    view = AggregatorView(delta=DELTA)

    charged = charge_aggregator(
        view, _record(participated=3), participants=[9, 2, 5], encrypted=False
    )

    # unencrypted the aggregator sees each client's share: z / sqrt(m) = 1/2, 1/z^2 = 4
    assert charged.participants == (2, 5, 9)
    assert charged.epsilon_aggregator == pytest.approx(gaussian_epsilon(2.0, DELTA))
    record = charged.to_record()
    assert record["participants"] == [2, 5, 9]
    assert record["epsilon_aggregator"] == charged.epsilon_aggregator
    # the public-view fields are untouched
    assert dataclasses.replace(charged, participants=None, epsilon_aggregator=None) == _record(
        participated=3
    )


def test_charge_aggregator_with_encryption_uses_the_sums_effective_z() -> None:
    view = AggregatorView(delta=DELTA)

    charged = charge_aggregator(
        view, _record(participated=3), participants=[0, 1, 2], encrypted=True
    )

    # the decrypted sum: z_eff = z sqrt(k / m) = sqrt(3 / 4)
    assert charged.epsilon_aggregator == pytest.approx(gaussian_epsilon(math.sqrt(4 / 3), DELTA))
    assert charged.epsilon_aggregator < gaussian_epsilon(2.0, DELTA)  # the plaintext figure


def test_charge_aggregator_of_a_round_without_updates_charges_nothing() -> None:
    view = AggregatorView(delta=DELTA)
    charge_aggregator(view, _record(participated=2), participants=[0, 1], encrypted=False)
    before = view.epsilon()

    charged = charge_aggregator(
        view, _record(participated=0, rnd=2), participants=[], encrypted=False
    )

    assert charged.participants == () and charged.to_record()["participants"] == []
    assert charged.epsilon_aggregator == before == view.epsilon()


def test_charge_aggregator_refuses_a_participant_count_mismatch() -> None:
    view = AggregatorView(delta=DELTA)
    with pytest.raises(ValueError, match="2 participants listed, the record has 3"):
        charge_aggregator(view, _record(participated=3), participants=[0, 1], encrypted=False)
    assert view.epsilon() == 0.0  # nothing charged


@pytest.mark.parametrize("encrypted", [False, True])
def test_resume_aggregator_from_the_records_equals_the_live_view(encrypted: bool) -> None:
    live = AggregatorView(delta=DELTA)
    cohorts = [[0, 1, 2], [1, 3], [], [0, 1, 4, 5], [2]]
    records = []
    for rnd, cohort in enumerate(cohorts, start=1):
        rec = _record(participated=len(cohort), m=3.0, rnd=rnd)
        charged = charge_aggregator(live, rec, participants=cohort, encrypted=encrypted)
        records.append(charged.to_record())

    resumed = resume_aggregator(DELTA, records, encrypted=encrypted)

    assert resumed.worst_mu == pytest.approx(live.worst_mu, rel=1e-12)
    assert resumed.epsilon() == pytest.approx(records[-1]["epsilon_aggregator"], rel=1e-12)
    for client in range(7):  # every client's own sum, as its guard would read it
        assert resumed.epsilon_after(client, 1.3) == pytest.approx(
            live.epsilon_after(client, 1.3), rel=1e-12
        )


def test_privacy_summary_carries_the_last_lines_aggregator_epsilon() -> None:
    plan = plan_privacy(_cfg(), POPULATION)
    assert plan is not None
    record = {"epsilon": 1.0, "epsilon_rdp": 1.2, "epsilon_aggregator": 7.5}

    assert privacy_summary(plan, record)["epsilon_aggregator"] == 7.5
    assert privacy_summary(plan, None)["epsilon_aggregator"] is None


# ---- the ledger's fields -------------------------------------------------------------------------

POPULATION = 44
CONFIG: dict[str, Any] = {
    "name": "aggregator-view",
    "rounds": 3,
    "reference": False,
    "data": {"n_heldout_users": 8},
    "model": {"dims": [16, 8]},
    "server": {"sample_rate": 0.5},
    "privacy": {"mode": "client", "clip": 0.5, "noise_multiplier": 1.0},
}
COHORTS = [list(range(22)), list(range(5, 32)), list(range(20, 42))]
"""Who took part in each round: clients 20 and 21 in all three."""


def _cfg(*, encrypted: bool = False) -> RunConfig:
    return parse(RunConfig, {**CONFIG, "encryption": {"enabled": encrypted}})


def _ledger(path: Path, *, encrypted: bool, header_encrypted: bool | None = None) -> Path:
    """A finished ledger of :data:`COHORTS` made by the project's charging code, its aggregator
    view charged as ``encrypted`` says, its header's config ``header_encrypted`` (default the
    same)."""
    cfg = _cfg(encrypted=encrypted)
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    header_cfg = cfg if header_encrypted is None else _cfg(encrypted=header_encrypted)
    accountant = PrivacyAccountant(delta=plan.delta)
    view = AggregatorView(delta=plan.delta)
    writer = LedgerWriter.create(path, ledger_header(run_id="run", cfg=header_cfg, plan=plan))
    last: PrivacyRound | None = None
    for rnd, cohort in enumerate(COHORTS, start=1):
        last = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=len(cohort) + 2,
            participated=len(cohort),
            step=client_round_step(plan, participated=len(cohort)),
        )
        last = charge_aggregator(view, last, participants=cohort, encrypted=encrypted)
        writer.append_round(last.to_record())
    assert last is not None
    writer.close(
        epsilon=last.epsilon,
        epsilon_rdp=last.epsilon_rdp,
        epsilon_aggregator=last.epsilon_aggregator,
    )
    return path


def _round_line(**changes: Any) -> dict[str, Any]:
    cohort = [1, 4, 7]
    rec = _record(participated=len(cohort), z=1.0, m=22.0).to_record()
    rec.update(sample_rate=0.5, participants=cohort, epsilon_aggregator=3.0)
    rec.update(changes)
    return rec


@pytest.mark.parametrize(
    ("participants", "problem"),
    [
        pytest.param([4, 1, 7], "sorted and unique", id="unsorted"),
        pytest.param([1, 1, 7], "sorted and unique", id="duplicate"),
        pytest.param([1, 4, POPULATION], "client positions in", id="out of range"),
        pytest.param([-1, 4, 7], "client positions in", id="negative"),
        pytest.param([1, 4.0, 7], "client positions in", id="not an int"),
        pytest.param([1, True, 7], "client positions in", id="a bool"),
        pytest.param("1,4,7", "client positions in", id="not a list"),
        pytest.param([1, 4], "2 participants listed, participated is 3", id="too few"),
        pytest.param([1, 4, 7, 9], "4 participants listed, participated is 3", id="too many"),
    ],
)
def test_the_ledger_refuses_bad_participants(
    tmp_path: Path, participants: Any, problem: str
) -> None:
    path = _ledger(tmp_path / "ok" / "ledger.jsonl", encrypted=False)
    header = read_ledger(path)[0]
    writer = LedgerWriter.create(tmp_path / "ledger.jsonl", header)

    with pytest.raises(ValueError, match=problem):
        writer.append_round(_round_line(participants=participants))
    writer.append_round(_round_line())  # the same line with honest participants is written


@pytest.mark.parametrize("value", [-0.1, "3.0", True])
def test_the_ledger_refuses_a_bad_aggregator_epsilon(tmp_path: Path, value: Any) -> None:
    header = read_ledger(_ledger(tmp_path / "ok" / "ledger.jsonl", encrypted=False))[0]
    writer = LedgerWriter.create(tmp_path / "ledger.jsonl", header)

    with pytest.raises(ValueError, match="epsilon_aggregator must be a finite number >= 0"):
        writer.append_round(_round_line(epsilon_aggregator=value))


# ---- the audit, encrypted or not -----------------------------------------------------------------


def _worst(encrypted: bool) -> float:
    """The aggregator-view epsilon of :data:`COHORTS` computed by hand: clients 20 and 21
    took part in every round."""
    plan = plan_privacy(_cfg(encrypted=encrypted), POPULATION)
    assert plan is not None
    m, z = plan.expected_participants, plan.noise_multiplier
    if encrypted:  # the decrypted sum of k updates: z_eff = z sqrt(k / m)
        mu2 = sum(m / (z**2 * len(cohort)) for cohort in COHORTS)
    else:  # each update on its own: z / sqrt(m)
        mu2 = len(COHORTS) * m / z**2
    return gaussian_epsilon(math.sqrt(mu2), plan.delta)


def _failed(report: AuditReport, check: str) -> str:
    assert report.status is AuditStatus.FAILED, report.reason
    failed = [(name, detail) for name, passed, detail in report.checks if not passed]
    assert check in [name for name, _ in failed], failed
    return str(dict(failed)[check])


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
def test_the_audit_recomputes_the_aggregator_epsilon_with_the_noise_it_saw(
    tmp_path: Path, encrypted: bool
) -> None:
    path = _ledger(tmp_path / "ledger.jsonl", encrypted=encrypted)

    report = verify_ledger(path)

    assert report.status is AuditStatus.VERIFIED, render(report)
    assert report.recomputed_epsilon_aggregator == pytest.approx(_worst(encrypted), rel=1e-9)
    assert read_ledger(path)[-1]["epsilon_aggregator"] == pytest.approx(_worst(encrypted))
    assert report.to_json()["recomputed_epsilon_aggregator"] == report.recomputed_epsilon_aggregator
    assert "epsilon against the aggregator" in render(report)
    seen = "the decrypted sums" if encrypted else "each client's own noise share"
    assert seen in dict((n, d) for n, _, d in report.checks)["aggregator epsilon"]


def test_an_encrypted_header_gives_a_lower_aggregator_epsilon_for_the_same_lines() -> None:
    # the same rounds, the same participants: the decrypted sum hides each update in the others'
    # noise, so the aggregator learns less than when it sees every update
    assert 0 < _worst(encrypted=True) < _worst(encrypted=False)


@pytest.mark.parametrize(
    ("charged", "header"),
    [
        pytest.param(True, False, id="encrypted claims under a plaintext header"),
        pytest.param(False, True, id="plaintext claims under an encrypted header"),
    ],
)
def test_claims_charged_for_another_encryption_than_the_headers_fail(
    tmp_path: Path, charged: bool, header: bool
) -> None:
    path = _ledger(tmp_path / "ledger.jsonl", encrypted=charged, header_encrypted=header)

    detail = _failed(verify_ledger(path), "aggregator epsilon")

    assert detail.startswith("claimed epsilon_aggregator") and detail.endswith("at round 1")


def test_a_ledger_without_participant_lists_verifies_with_a_note(tmp_path: Path) -> None:
    # an older run: no participants, no aggregator claims
    path = _ledger(tmp_path / "full.jsonl", encrypted=False)
    records = read_ledger(path)
    for rec in records[1:]:
        rec.pop("participants", None)
        rec.pop("epsilon_aggregator", None)
    older = tmp_path / "ledger.jsonl"
    _rewrite(older, records, signer=None)

    report = verify_ledger(older)

    assert report.status is AuditStatus.VERIFIED, render(report)
    assert math.isnan(report.recomputed_epsilon_aggregator)
    detail = dict((n, d) for n, _, d in report.checks)["aggregator epsilon"]
    assert detail == "not recorded (no participant lists)"
    assert "epsilon against the aggregator" not in render(report)


# ---- an honest in-process run, and forgeries of it -----------------------------------------------


def _rewrite(path: Path, records: list[dict[str, Any]], *, signer: Any) -> None:
    """Write ``records`` with a consistent hash chain and final digest, each line re-signed by
    ``signer`` (``None``: unsigned), as a forger holding the server key would."""
    raws: list[bytes] = []
    for rec in records:
        rec.pop("signatures", None)
        if raws:
            rec["prev"] = line_hash(raws[-1])
        if rec["type"] == "final":
            rec["chain"] = chain_digest([line_hash(raw) for raw in raws])
        if signer is not None:
            rec["signatures"] = {"server": signer.sign(signed_body(rec))}
        raws.append(canonical_json(rec))
    path.write_bytes(b"".join(raw + b"\n" for raw in raws))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_warm_config: Callable[..., Path]) -> Path:
    """A tiny per-user client-level DP run config with a warm start (synthetic data), its
    noise (a target epsilon or a noise multiplier) set by each test."""
    return tiny_warm_config(
        tmp_path_factory.mktemp("tiny"), name="tiny aggregator view", sample_rate=0.3
    )


def _inprocess(tiny: Path, run_dir: Path, sets: list[str] | None = None) -> Path:
    cfg = load_run_config(tiny, sets or [])
    write_run_folder(cfg, run_dir)
    run_inprocess(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def honest_run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of an in-process run: two releases, then two rounds at q = 0.3."""
    return _inprocess(
        tiny, tmp_path_factory.mktemp("run"), ["privacy.target_epsilon=4", "warm_start.share=0.5"]
    )


def test_an_honest_inprocess_run_verifies_with_its_aggregator_epsilon(honest_run: Path) -> None:
    report = verify_ledger(honest_run, partition=honest_run, require_signed=True)

    assert report.status is AuditStatus.VERIFIED, render(report)
    records = read_ledger(honest_run / "ledger.jsonl")
    lines = [rec for rec in records if rec["type"] in ("release", "round")]
    assert [rec["type"] for rec in lines] == ["release", "release", "round", "round"]
    population = n_clients_of(honest_run)
    for rec in lines:
        assert rec["participants"] == sorted(set(rec["participants"]))
        assert len(rec["participants"]) == rec["participated"]
        assert all(0 <= c < population for c in rec["participants"])
    assert lines[0]["participants"] == list(range(population))  # every client answers a release
    claims = [rec["epsilon_aggregator"] for rec in lines]
    assert all(0 < a <= b for a, b in itertools.pairwise(claims))
    assert records[-1]["epsilon_aggregator"] == claims[-1]
    assert report.recomputed_epsilon_aggregator == pytest.approx(claims[-1], rel=1e-6)
    # against the aggregator nothing is amplified: above the public-view epsilon
    assert report.recomputed_epsilon_aggregator > report.recomputed_epsilon_prv


def _forge(honest_run: Path, tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    """A copy of the honest ledger, ``edit`` applied, re-chained and re-signed."""
    path = Path(shutil.copy(honest_run / "ledger.jsonl", tmp_path / "ledger.jsonl"))
    records = read_ledger(path)
    edit(records)
    _rewrite(path, records, signer=server_signer(honest_run))
    return path


def test_a_forgery_that_only_re_signs_still_verifies(honest_run: Path, tmp_path: Path) -> None:
    # the forging helper itself leaves an honest ledger honest: the failures below are the edits'
    path = _forge(honest_run, tmp_path, lambda records: None)

    report = verify_ledger(path, require_signed=True)

    assert report.status is AuditStatus.VERIFIED, render(report)


@pytest.mark.parametrize("line", [1, 3, 4], ids=["release 1", "round 1", "round 2"])
def test_an_edited_aggregator_epsilon_fails(honest_run: Path, tmp_path: Path, line: int) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        records[line]["epsilon_aggregator"] *= 0.9

    path = _forge(honest_run, tmp_path, edit)

    report = verify_ledger(path, require_signed=True)

    detail = _failed(report, "aggregator epsilon")
    assert detail.startswith("claimed epsilon_aggregator")
    where = read_ledger(path)[line]
    assert detail.endswith(
        f"at round {where['round']}"
        if where["type"] == "round"
        else f"at release {where['round']} ({where['release']})"
    )


def test_an_edited_final_aggregator_epsilon_fails(honest_run: Path, tmp_path: Path) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        records[-1]["epsilon_aggregator"] = records[-1]["epsilon_aggregator"] / 2

    detail = _failed(verify_ledger(_forge(honest_run, tmp_path, edit)), "aggregator epsilon")

    assert detail.startswith("the final line claims epsilon_aggregator")


def test_edited_participants_fail(honest_run: Path, tmp_path: Path) -> None:
    population = n_clients_of(honest_run)
    records = read_ledger(honest_run / "ledger.jsonl")
    first, second = records[3]["participants"], records[4]["participants"]
    # Prepare: round 2's cohort spread over the clients round 1 left out (the same count), so
    # no client looks as exposed as the honest ledger's worst one
    assert set(first) & set(second) and len(first) + len(second) <= population
    others = [c for c in range(population) if c not in first][: len(second)]

    def edit(records: list[dict[str, Any]]) -> None:
        records[4]["participants"] = sorted(others)

    forged = [dict(rec) for rec in records]
    edit(forged)
    delta = records[0]["delta"]
    honest_view = resume_aggregator(delta, records[1:-1], encrypted=False)
    forged_view = resume_aggregator(delta, forged[1:-1], encrypted=False)
    assert forged_view.epsilon() < honest_view.epsilon()  # the edit would lower the figure

    # Execute
    report = verify_ledger(_forge(honest_run, tmp_path, edit), require_signed=True)

    # Assert: the claims no longer follow from the participants
    detail = _failed(report, "aggregator epsilon")
    assert detail.startswith("claimed epsilon_aggregator") and detail.endswith("at round 2")


def test_participants_removed_from_one_released_line_fail(honest_run: Path, tmp_path: Path) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        del records[3]["participants"]

    detail = _failed(verify_ledger(_forge(honest_run, tmp_path, edit)), "aggregator epsilon")

    assert detail == "round 1: no participant list"


def test_unsorted_participants_fail_the_round_fields(honest_run: Path, tmp_path: Path) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        records[3]["participants"] = records[3]["participants"][::-1]

    detail = _failed(verify_ledger(_forge(honest_run, tmp_path, edit)), "round fields")

    assert "participants must be sorted and unique" in detail


# ---- the in-process budget guard -----------------------------------------------------------------


def test_inprocess_clients_refuse_past_their_budget_against_the_aggregator(
    tiny: Path, tmp_path: Path
) -> None:
    # Prepare: q = 1, no warm start: every client takes part in every round, and unencrypted
    # each adds m / z^2 = N to its mu^2; a budget between one and two rounds' epsilon
    plain = ["warm_start.enabled=false", "privacy.noise_multiplier=1.0"]
    probe = load_run_config(tiny, plain)

    write_run_folder(probe, tmp_path)
    population = n_clients_of(tmp_path)
    plan = plan_privacy(probe, population)
    assert plan is not None
    eps1, eps2 = (gaussian_epsilon(math.sqrt(k * population), plan.delta) for k in (1, 2))
    sets = [
        *plain,
        "server.sample_rate=1.0",
        f"privacy.client_budget={(eps1 + eps2) / 2}",
    ]

    # Execute
    run_dir = _inprocess(tiny, tmp_path / "run", sets)

    # Assert: round 1 trained by all, round 2 refused by all (nothing released, nothing charged)
    l1, l2 = (rec for rec in read_ledger(run_dir / "ledger.jsonl") if rec["type"] == "round")
    assert l1["participants"] == list(range(population))
    assert l2["participants"] == [] and not l2["released"]
    assert l1["epsilon_aggregator"] == l2["epsilon_aggregator"] == pytest.approx(eps1, rel=1e-9)
    r1, r2 = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert r1["refused"] == 0 and r1["returned"] == population
    assert r2["refused"] == r2["sampled"] == population and r2["returned"] == 0
    report = verify_ledger(run_dir, partition=run_dir)
    assert report.status is AuditStatus.VERIFIED, render(report)

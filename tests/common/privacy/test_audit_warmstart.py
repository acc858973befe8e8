"""``fedrec audit verify`` of a run with a warm start: its two release lines, then the rounds.

Honest ledgers are made by the project's own code: the in-process engine
(:func:`simulations.fastsim.run_inprocess`, as ``python -m simulations.fastsim`` runs it) on a tiny
synthetic data set, and :class:`common.privacy.ledger.LedgerWriter` driven by the planning and
charging code (:func:`common.privacy.plan_privacy`, :func:`common.privacy.rounds.charge_release`,
:func:`common.privacy.rounds.charge_round`). Each tampering is made as a forger would make it: the
hash chain is rewritten after the edit, or the whole ledger is charged again consistently.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from common.config import parse
from common.privacy import DPPlan, PrivacyAccountant, plan_privacy
from common.privacy.audit import UNFINISHED_REASON, AuditReport, AuditStatus, render, verify_ledger
from common.privacy.crosscheck import check_against_config
from common.privacy.ledger import (
    LedgerWriter,
    LineSigner,
    canonical_json,
    chain_digest,
    line_hash,
    read_ledger,
)
from common.privacy.plan import RELEASE_NAMES
from common.privacy.rounds import (
    PrivacyRound,
    charge_release,
    charge_round,
    client_round_step,
    ledger_header,
)
from common.privacy.signing import (
    Cosignature,
    committee_statement,
    read_device_seed,
    register_simulated_devices,
    server_signer,
    simulated_device_key,
)
from common.run.config import RunConfig

POPULATION = 44
PARTICIPATION = [22, 27, 22, 27]  # two distinct counts: PRV stays cheap
CONFIG: dict[str, Any] = {
    "name": "audit-warm-start",
    "rounds": len(PARTICIPATION),
    "reference": False,
    "data": {"n_heldout_users": 8},
    "model": {"dims": [16, 8]},
    "server": {"sample_rate": 0.5},
    "privacy": {"mode": "client", "clip": 0.5, "target_epsilon": 4.0},
    "warm_start": {"enabled": True, "share": 0.5},
}
ALONE: dict[str, Any] = {**CONFIG, "rounds": 0, "warm_start": {"enabled": True, "share": 1.0}}
"""The warm start alone: ``rounds = 0``, the releases take the whole target."""
COMMITTEE = (3, 17)  # client ids of a co-signing committee


def _cfg(raw: dict[str, Any] = CONFIG, **changes: Any) -> RunConfig:
    return parse(RunConfig, {**raw, **changes})


@functools.lru_cache(maxsize=4)
def _plan(cfg: RunConfig) -> DPPlan:
    """The honest plan for :data:`POPULATION` (remembered: a calibration costs seconds)."""
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    return plan


def _ledger(
    path: Path,
    cfg: RunConfig,
    *,
    plan: DPPlan | None = None,
    names: Sequence[str] = RELEASE_NAMES,
    answered: int = POPULATION,
    header_cfg: RunConfig | None = None,
    finish: bool = True,
    signer: LineSigner | None = None,
    cosign: Callable[[PrivacyRound], list[dict[str, Any]]] | None = None,
) -> Path:
    """A ledger made by the project's code: the releases ``names`` (``answered`` of the N
    clients each), then ``cfg.rounds`` rounds of :data:`PARTICIPATION`, then the final line
    (with ``finish``). ``plan`` (default: the honest one) charges them, ``header_cfg`` (default
    ``cfg``) goes in the header, ``cosign`` gives each release's committee co-signatures."""
    plan = plan or _plan(cfg)
    accountant = PrivacyAccountant(delta=plan.delta)
    header = ledger_header(run_id="run", cfg=header_cfg or cfg, plan=plan)
    writer = LedgerWriter.create(path, header, signer=signer)
    last: PrivacyRound | None = None
    for name in names:
        last = charge_release(
            accountant, plan, name=name, invited=POPULATION, participated=answered
        )
        cosignatures = [] if cosign is None else cosign(last)
        writer.append_release(last.to_record(), cosignatures=cosignatures)
    for rnd, k in enumerate(PARTICIPATION[: cfg.rounds], start=1):
        last = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k + 2,
            participated=k,
            step=client_round_step(plan, participated=k),
        )
        writer.append_round(last.to_record())
    if finish:
        assert last is not None
        writer.close(epsilon=last.epsilon, epsilon_rdp=last.epsilon_rdp)
    return path


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two releases, then 4 rounds."""
    return _ledger(tmp_path_factory.mktemp("honest") / "ledger.jsonl", _cfg())


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two releases and no round (``rounds = 0``)."""
    return _ledger(tmp_path_factory.mktemp("alone") / "ledger.jsonl", _cfg(ALONE))


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ledger.jsonl"
    target.write_bytes(source.read_bytes())
    return target


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` (unsigned) with a consistent hash chain and final digest."""
    raws: list[bytes] = []
    for rec in records:
        if raws:
            rec["prev"] = line_hash(raws[-1])
        if rec["type"] == "final":
            rec["chain"] = chain_digest([line_hash(raw) for raw in raws])
        raws.append(canonical_json(rec))
    path.write_bytes(b"".join(raw + b"\n" for raw in raws))


def _forge(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    records = read_ledger(path)
    edit(records)
    _rewrite(path, records)
    return path


def _failed(report: AuditReport, check: str) -> str:
    assert report.status is AuditStatus.FAILED, report.reason
    failed = [(name, detail) for name, passed, detail in report.checks if not passed]
    assert check in [name for name, _ in failed], failed
    return str(dict(failed)[check])


# ---- honest ledgers ----------------------------------------------------------------------------


def test_honest_ledger_with_releases_and_rounds_verifies(honest: Path) -> None:
    # Execute
    report = verify_ledger(honest)

    # Assert: the releases composed with the rounds, every claim matched
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert (report.releases, report.rounds) == (2, len(PARTICIPATION))
    assert "2 releases + 4 rounds, epsilon" in report.reason
    details = {name: detail for name, _, detail in report.checks}
    assert details["round numbering"] == "releases 1..2 before rounds 1..4"
    assert details["rdp epsilon"].endswith("matches all 6 claims")
    assert details["config"].startswith("2 of 2 warm-start releases at q 1, clip 1")
    last = read_ledger(honest)[-2]
    assert report.claimed_epsilon == last["epsilon"] <= 4.0
    assert report.to_json()["releases"] == 2
    assert "releases: 2    rounds: 4" in render(report)


def test_honest_ledger_of_zero_rounds_verifies(alone: Path) -> None:
    # Execute
    report = verify_ledger(alone)

    # Assert: the final line says 0 rounds and repeats the last release's PRV claim
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert (report.releases, report.rounds) == (2, 0)
    assert "2 releases + 0 rounds" in report.reason
    *_, last, final = read_ledger(alone)
    assert (last["type"], last["epsilon_accountant"], final["rounds"]) == ("release", "prv", 0)
    assert report.claimed_epsilon == final["epsilon"] == last["epsilon"]
    assert report.recomputed_epsilon_prv == pytest.approx(last["epsilon"], rel=1e-3)
    assert "2 of 2 warm-start releases" in dict((n, d) for n, _, d in report.checks)["config"]


def test_ledger_cut_after_the_releases_is_unfinished(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "ledger.jsonl", _cfg(ALONE), finish=False)

    report = verify_ledger(path)

    assert report.status is AuditStatus.UNFINISHED, report.reason
    assert report.reason == UNFINISHED_REASON
    assert report.claimed_epsilon == read_ledger(path)[-1]["epsilon"]


def test_cosigned_releases_are_counted_apart_from_rounds(tmp_path: Path) -> None:
    # Prepare: a signed ledger whose releases (not its rounds) the committee co-signed
    register_simulated_devices(tmp_path, POPULATION)
    seed = read_device_seed(tmp_path)
    assert seed is not None
    signer = server_signer(tmp_path)
    cfg = _cfg()
    plan = _plan(cfg)

    def cosign(record: PrivacyRound) -> list[dict[str, Any]]:
        statement = committee_statement(
            run_id="run",
            server_key=signer.public_key,
            server_round=record.round,
            contributors=record.participated,
            sum_sha256=hashlib.sha256(f"{record.release}".encode()).hexdigest(),
            noise_multiplier=record.noise_multiplier,
            clip=record.clip,
            sample_rate=record.sample_rate,
            expected_participants=record.expected_participants,
            delta=plan.delta,
        )
        return [
            Cosignature.make(simulated_device_key(seed, member), statement).to_record()
            for member in COMMITTEE
        ]

    path = _ledger(tmp_path / "ledger.jsonl", cfg, signer=signer, cosign=cosign)

    # Execute
    report = verify_ledger(tmp_path, require_signed=True)

    # Assert
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert (report.cosigned_releases, report.cosigned_rounds) == (2, 0)
    detail = dict((n, d) for n, _, d in report.checks)["signatures"]
    assert "0 of 4 rounds co-signed by their committee; 2 of 2 releases co-signed" in detail
    assert path.parent == tmp_path


# ---- tampering ---------------------------------------------------------------------------------


def _edit(line: int, **fields: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(records: list[dict[str, Any]]) -> None:
        records[line].update(fields)

    return edit


def test_edited_release_noise_multiplier_fails(honest: Path, tmp_path: Path) -> None:
    z = read_ledger(honest)[1]["noise_multiplier"]
    forged = _forge(_copy(honest, tmp_path), _edit(1, noise_multiplier=2 * z))

    detail = _failed(verify_ledger(forged), "round fields")

    assert detail.startswith("release popularity: round 1: effective_noise_multiplier")


@pytest.mark.parametrize("position", [1, 2], ids=RELEASE_NAMES)
def test_consistently_charged_larger_release_noise_multiplier_fails(
    tmp_path: Path, position: int
) -> None:
    # Prepare: the whole run charged again at a 10% larger z for one release (chain, derived
    # fields and every claim consistent): only the config's plan tells
    cfg = _cfg()
    plan = _plan(cfg)
    zs = list(plan.release_noise_multipliers)
    assert len(zs) == len(RELEASE_NAMES)
    zs[position - 1] *= 1.1
    larger = dataclasses.replace(plan, release_noise_multipliers=tuple(zs))
    forged = _ledger(tmp_path / "ledger.jsonl", cfg, plan=larger)

    detail = _failed(verify_ledger(forged), "config")

    name = RELEASE_NAMES[position - 1]
    assert detail.startswith(f"release {position} ({name}): noise_multiplier")
    assert "is not the recalibrated release z" in detail


def test_a_different_popularity_share_fails_against_the_config(tmp_path: Path) -> None:
    # Prepare: charged consistently under popularity_share 0.5, the header saying 0.2
    cfg = _cfg()
    other = _cfg(warm_start={**CONFIG["warm_start"], "popularity_share": 0.5})
    forged = _ledger(tmp_path / "ledger.jsonl", other, header_cfg=cfg)

    detail = _failed(verify_ledger(forged), "config")

    assert detail.startswith("release 1 (popularity): noise_multiplier")
    assert "is not the recalibrated release z" in detail


def test_edited_release_participation_fails(honest: Path, tmp_path: Path) -> None:
    forged = _forge(_copy(honest, tmp_path), _edit(2, participated=30))

    detail = _failed(verify_ledger(forged), "round fields")

    assert detail.startswith("release cooccurrence: round 2: effective_noise_multiplier")


def test_consistently_edited_release_participation_fails_the_epsilon(
    honest: Path, tmp_path: Path
) -> None:
    # Prepare: fewer clients answered the popularity release (so its noise was smaller than the
    # line's epsilon pays for), with the effective multiplier made consistent
    def edit(records: list[dict[str, Any]]) -> None:
        rec = records[1]
        rec["participated"] = 11
        rec["effective_noise_multiplier"] = rec["noise_multiplier"] * (11 / POPULATION) ** 0.5

    forged = _forge(_copy(honest, tmp_path), edit)

    detail = _failed(verify_ledger(forged), "rdp epsilon")

    assert detail.endswith("at release 1 (popularity)")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda r: r.__setitem__(slice(1, 3), [r[2], r[1]]),
            "line 2: release 2 where release 1 was expected (a release was removed, duplicated "
            "or reordered)",
            id="swapped",
        ),
        pytest.param(
            lambda r: r.insert(3, dict(r[2])),
            "line 4: release 2 where release 3 was expected (a release was removed, duplicated "
            "or reordered)",
            id="duplicated",
        ),
        pytest.param(
            lambda r: r.pop(1),
            "line 2: release 2 where release 1 was expected (a release was removed, duplicated "
            "or reordered)",
            id="gap",
        ),
        pytest.param(
            lambda r: r.insert(3, r.pop(2)),
            "line 4: a warm-start release after round 1 (releases come before round 1)",
            id="after a round",
        ),
        pytest.param(
            lambda r: r.insert(3, {**r[2], "round": 3}),
            "line 4: release 3, but a warm start makes 2",
            id="third",
        ),
    ],
)
def test_release_out_of_order_fails_with_its_line(
    honest: Path,
    tmp_path: Path,
    edit: Callable[[list[dict[str, Any]]], None],
    expected: str,
) -> None:
    forged = _forge(_copy(honest, tmp_path), edit)

    detail = _failed(verify_ledger(forged), "round numbering")

    assert detail == expected


def test_swapped_release_names_fail_against_the_config(honest: Path, tmp_path: Path) -> None:
    def edit(records: list[dict[str, Any]]) -> None:
        records[1]["release"], records[2]["release"] = RELEASE_NAMES[::-1]

    forged = _forge(_copy(honest, tmp_path), edit)
    header, *lines = read_ledger(forged)
    releases = [rec for rec in lines if rec["type"] == "release"]
    rounds = [rec for rec in lines if rec["type"] == "round"]

    # Execute: the whole audit, and the cross-check against the config on its own
    report = verify_ledger(forged)
    findings = check_against_config(header, rounds, finished=True, releases=releases)

    # Assert
    assert report.status is AuditStatus.FAILED
    assert "release" in report.reason and "cooccurrence" in report.reason
    assert findings.problem is not None
    assert findings.problem.startswith("release 1 is 'cooccurrence', the warm start's release 1")


def test_a_release_left_out_fails_against_the_config(tmp_path: Path) -> None:
    # Prepare: charged consistently, with only the popularity release
    forged = _ledger(tmp_path / "ledger.jsonl", _cfg(), names=RELEASE_NAMES[:1])

    detail = _failed(verify_ledger(forged), "config")

    assert detail == "round 1 follows 1 of the warm start's 2 releases (warm_start.enabled is true)"


def test_releases_without_a_warm_start_in_the_config_fail(tmp_path: Path) -> None:
    cfg = _cfg()
    header_cfg = dataclasses.replace(
        cfg, warm_start=dataclasses.replace(cfg.warm_start, enabled=False)
    )
    forged = _ledger(tmp_path / "ledger.jsonl", cfg, header_cfg=header_cfg)

    detail = _failed(verify_ledger(forged), "config")

    assert detail == (
        "the ledger holds 2 warm-start release(s), but the config has no warm start "
        "(warm_start.enabled is false)"
    )


def test_a_release_clip_other_than_one_fails(honest: Path, tmp_path: Path) -> None:
    forged = _forge(_copy(honest, tmp_path), _edit(2, clip=2.0))

    detail = _failed(verify_ledger(forged), "config")

    assert detail == "release 2 (cooccurrence): clip 2 is not 1 (the statistics' norm bound)"


def test_zero_rounds_final_line_must_repeat_the_last_release(alone: Path, tmp_path: Path) -> None:
    forged = _forge(_copy(alone, tmp_path), _edit(-1, epsilon=1.0))

    detail = _failed(verify_ledger(forged), "final line")

    assert detail.startswith("final epsilon 1.0 is not the last release's")


def test_zero_rounds_final_line_counts_no_release_as_a_round(alone: Path, tmp_path: Path) -> None:
    forged = _forge(_copy(alone, tmp_path), _edit(-1, rounds=2))

    detail = _failed(verify_ledger(forged), "final line")

    assert detail == "final says 2 rounds, ledger has 0"


def test_zero_rounds_lowered_prv_claim_fails(alone: Path, tmp_path: Path) -> None:
    # Prepare: the last release's PRV claim and the final line lowered together
    def edit(records: list[dict[str, Any]]) -> None:
        for rec in records[-2:]:
            rec["epsilon"] = 0.5 * rec["epsilon"]

    forged = _forge(_copy(alone, tmp_path), edit)

    detail = _failed(verify_ledger(forged), "prv epsilon")

    assert detail.endswith("at release 2 (cooccurrence)")


# ---- the in-process engine's ledgers -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_warm_config: Callable[..., Path]) -> Path:
    """A tiny per-user DP run config with a warm start (synthetic data)."""
    return tiny_warm_config(
        tmp_path_factory.mktemp("tiny"),
        name="tiny warm start",
        sample_rate=0.5,
        privacy=["target_epsilon = 4.0"],
    )


@pytest.mark.parametrize(
    ("sets", "rounds"),
    [
        pytest.param(["rounds=0", "warm_start.share=1"], 0, id="rounds 0"),
        pytest.param(["warm_start.share=0.5"], 2, id="rounds 2"),
    ],
)
def test_fastsim_ledger_with_releases_verifies(
    tiny: Path, tmp_path: Path, sets: list[str], rounds: int
) -> None:
    from common.run.config import load_run_config
    from common.run.folder import write_run_folder
    from simulations.fastsim import run_inprocess

    # Prepare
    cfg = load_run_config(tiny, sets)
    write_run_folder(cfg, tmp_path)
    run_inprocess(cfg, tmp_path)

    # Execute
    report = verify_ledger(tmp_path, partition=tmp_path, budget=4.0, require_signed=True)

    # Assert
    assert report.status is AuditStatus.VERIFIED, render(report)
    assert (report.releases, report.rounds) == (2, rounds)
    assert f"2 releases + {rounds} rounds" in report.reason
    assert report.signed and report.cosigned_releases == 0
    kinds = [rec["type"] for rec in read_ledger(tmp_path / "ledger.jsonl")]
    assert kinds == ["header", "release", "release", *["round"] * rounds, "final"]
    assert json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[-1])["rounds"] == rounds


def test_a_release_answered_by_all_but_not_charged_fails(honest: Path, tmp_path: Path) -> None:
    # Prepare: the popularity release marked as releasing nothing (so it would be charged as
    # nothing), although every client answered
    def edit(records: list[dict[str, Any]]) -> None:
        records[1]["released"] = False
        records[1]["effective_noise_multiplier"] = records[1]["noise_multiplier"]

    forged = _forge(_copy(honest, tmp_path), edit)

    detail = _failed(verify_ledger(forged), "config")

    assert detail.startswith(f"release 1 (popularity): {POPULATION} clients answered")
    assert detail.endswith("but released is false (charged as nothing)")

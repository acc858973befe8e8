"""Signed ledgers: the server signs every line, the committee co-signs, devices keep a copy.

A forger who rewrites a ledger consistently and hashes it again (the rewrites of
test_audit_config) now also needs the server's key; one who has the server's key (the server
itself) still needs the committee's device keys for every co-signed round, and cannot hide a
device's own record of a round.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.config import parse
from common.errors import DataError
from common.privacy import DPPlan, PrivacyAccountant, plan_privacy
from common.privacy.audit import AuditStatus, verify_ledger
from common.privacy.ledger import LedgerWriter, canonical_json, chain_digest, line_hash
from common.privacy.rounds import PrivacyRound, charge_round, client_round_step, ledger_header
from common.privacy.signing import (
    SERVER_KEY_FILE,
    SIGNING_DIR,
    Cosignature,
    Ed25519Signer,
    committee_statement,
    load_signing_key,
    public_key_hex,
    read_device_registry,
    read_device_seed,
    register_simulated_devices,
    server_signer,
    simulated_device_key,
)
from common.run.config import RunConfig

POPULATION = 44
PARTICIPATION = [22, 27, 22, 27]
CONFIG: dict[str, Any] = {
    "name": "signed",
    "rounds": len(PARTICIPATION),
    "server": {"sample_rate": 0.5},
    "privacy": {"mode": "client", "clip": 0.5, "noise_multiplier": 1.0},
    "encryption": {"enabled": True, "committee_size": 2},
}
COMMITTEE = (3, 17)  # client ids of every round's committee (they took part)


def _cfg() -> RunConfig:
    return parse(RunConfig, CONFIG)


def _statement(
    run_dir: Path, record: PrivacyRound, plan: DPPlan, server_key: str
) -> dict[str, Any]:
    return committee_statement(
        run_id=run_dir.name,
        server_key=server_key,
        server_round=record.round,
        contributors=record.participated,
        sum_sha256=hashlib.sha256(f"sum of round {record.round}".encode()).hexdigest(),
        noise_multiplier=record.noise_multiplier,
        clip=record.clip,
        sample_rate=record.sample_rate,
        expected_participants=record.expected_participants,
        delta=plan.delta,
    )


def _run(
    run_dir: Path, *, cosign: bool = True, participation: list[int] = PARTICIPATION
) -> tuple[Path, list[dict[str, Any]]]:
    """A signed run folder as a simulation leaves it: the server's key, the registered device
    keys, and a ledger whose rounds the committee co-signed. Returns the ledger and the
    committee's co-signatures (what each member's device ledger keeps)."""
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    register_simulated_devices(run_dir, POPULATION)
    seed = read_device_seed(run_dir)
    assert seed is not None
    signer = server_signer(run_dir)
    writer = LedgerWriter.create(
        run_dir / "ledger.jsonl",
        ledger_header(run_id=run_dir.name, cfg=cfg, plan=plan),
        signer=signer,
    )
    accountant = PrivacyAccountant(delta=plan.delta)
    kept: list[dict[str, Any]] = []
    record: PrivacyRound | None = None
    for rnd, k in enumerate(participation, start=1):
        record = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k + 1,
            participated=k,
            step=client_round_step(plan, participated=k),
        )
        cosignatures = []
        if cosign:
            statement = _statement(run_dir, record, plan, signer.public_key)
            cosignatures = [
                Cosignature.make(simulated_device_key(seed, member), statement).to_record()
                for member in COMMITTEE
            ]
        kept.extend(cosignatures)
        writer.append_round(record.to_record(), cosignatures=cosignatures)
    assert record is not None
    writer.close(epsilon=record.epsilon, epsilon_rdp=record.epsilon_rdp)
    return run_dir / "ledger.jsonl", kept


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    return _run(tmp_path_factory.mktemp("signed") / "run")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rewrite(path: Path, records: list[dict[str, Any]], signer: Ed25519Signer | None) -> None:
    """Write ``records`` again with a consistent chain, signed by ``signer`` (if any), keeping
    the committee's co-signatures where they were: what a forger holding ``signer`` can do."""
    raws: list[bytes] = []
    for rec in records:
        committee = rec.get("signatures", {}).get("committee")
        rec = {k: v for k, v in rec.items() if k != "signatures"}
        if rec["type"] != "header":
            rec["prev"] = line_hash(raws[-1])
        if rec["type"] == "final":
            rec["chain"] = chain_digest([line_hash(raw) for raw in raws])
        if signer is not None:
            if rec["type"] == "header":
                rec["server_key"] = signer.public_key
            signatures: dict[str, Any] = {"server": signer.sign(canonical_json(rec))}
            if committee:
                signatures["committee"] = committee
            rec["signatures"] = signatures
        raws.append(canonical_json(rec))
    path.write_bytes(b"".join(raw + b"\n" for raw in raws))


def _failed(report: Any, check: str) -> str:
    assert report.status is AuditStatus.FAILED, report.reason
    failed = {name: detail for name, passed, detail in report.checks if not passed}
    assert check in failed, failed
    return str(failed[check])


def _copy(tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]) -> Path:
    """A copy of the signed run folder's ledger and registry (not its secret keys)."""
    ledger, _ = signed_run
    folder = tmp_path / ledger.parent.name
    (folder / SIGNING_DIR).mkdir(parents=True)
    (folder / "ledger.jsonl").write_bytes(ledger.read_bytes())
    registry = ledger.parent / SIGNING_DIR / "devices.json"
    (folder / SIGNING_DIR / "devices.json").write_bytes(registry.read_bytes())
    return folder / "ledger.jsonl"


# --------------------------------------------------------------------------------- key files


def test_key_files_are_owner_only_and_reused(tmp_path: Path) -> None:
    # Execute
    first = server_signer(tmp_path)
    again = server_signer(tmp_path)
    register_simulated_devices(tmp_path, 3)

    # Assert
    key_file = tmp_path / SIGNING_DIR / SERVER_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / SIGNING_DIR).stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / SIGNING_DIR / "devices.seed").stat().st_mode) == 0o600
    assert first.public_key == again.public_key
    registry = read_device_registry(tmp_path / SIGNING_DIR / "devices.json")
    seed = read_device_seed(tmp_path)
    assert seed is not None
    assert registry == {str(i): public_key_hex(simulated_device_key(seed, i)) for i in range(3)}


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    server_signer(tmp_path)
    key_file = tmp_path / SIGNING_DIR / SERVER_KEY_FILE
    key_file.chmod(0o644)

    with pytest.raises(DataError, match="readable by others"):
        load_signing_key(key_file)


# ---------------------------------------------------------------------------- verification


def test_signed_and_cosigned_ledger_verifies(
    signed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    # Execute
    report = verify_ledger(signed_run[0].parent, require_signed=True)

    # Assert
    assert report.status is AuditStatus.VERIFIED, report.reason
    assert report.signed and report.cosigned_rounds == len(PARTICIPATION)
    detail = {name: detail for name, _, detail in report.checks}["signatures"]
    assert f"all {len(PARTICIPATION) + 2} lines signed; 4 of 4 rounds co-signed" in detail
    assert report.to_json()["cosigned_rounds"] == 4


def test_the_server_key_given_out_of_band_must_be_the_headers(
    signed_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    ledger = signed_run[0]
    key = json.loads(ledger.read_text().splitlines()[0])["server_key"]

    good = verify_ledger(ledger, server_key=key)
    bad = verify_ledger(ledger, server_key="ab" * 32)

    assert good.status is AuditStatus.VERIFIED, good.reason
    assert _failed(bad, "signatures").endswith("is not the server key given")


def test_a_rehashed_rewrite_without_the_server_key_fails(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    # Prepare: delta raised (and the chain rehashed); the old signatures no longer match
    ledger = _copy(tmp_path, signed_run)
    records = _records(ledger)
    records[0]["delta"] = 0.1
    _rewrite(ledger, records, None)

    # Execute
    report = verify_ledger(ledger)

    # Assert
    assert _failed(report, "signatures") == "line 1: no server signature"


def test_a_rewrite_signed_with_another_key_loses_the_committee(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    # Prepare: a forger signs a rewritten ledger with a key of its own
    ledger = _copy(tmp_path, signed_run)
    _rewrite(ledger, _records(ledger), Ed25519Signer(Ed25519PrivateKey.generate()))

    # Execute
    report = verify_ledger(ledger)

    # Assert
    detail = _failed(report, "signatures")
    assert detail.startswith("line 2: a committee co-signature does not hold: it names another")


def test_the_server_cannot_rewrite_a_cosigned_round(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    # Prepare: the server itself (it holds its key) re-charges round 2 as if 44 updates had come
    # back (more noise, a smaller epsilon), consistently, and signs the rewrite
    ledger = _copy(tmp_path, signed_run)
    signer = server_signer(signed_run[0].parent)
    records = _records(ledger)
    round2 = records[2]
    round2["participated"] = round2["invited"] = POPULATION
    round2["effective_noise_multiplier"] = round2["noise_multiplier"] * math.sqrt(
        POPULATION / round2["expected_participants"]
    )
    _rewrite(ledger, records, signer)

    # Execute
    report = verify_ledger(ledger)

    # Assert
    detail = _failed(report, "signatures")
    assert detail == (
        "line 3: a committee co-signature does not hold: it states 27 contributors, the line 44"
    )


def test_a_cosignature_by_an_unregistered_key_fails(tmp_path: Path) -> None:
    # Prepare: the server co-signs with keys of its own making
    run_dir = tmp_path / "run"
    ledger, _ = _run(run_dir)
    signer = server_signer(run_dir)
    records = _records(ledger)
    for rec in records:
        for c in rec.get("signatures", {}).get("committee", []):
            forged = Cosignature.make(Ed25519PrivateKey.generate(), c["statement"])
            c.update(forged.to_record())
    _rewrite(ledger, records, signer)

    # Execute
    with_registry = verify_ledger(ledger)
    (run_dir / SIGNING_DIR / "devices.json").unlink()
    without = verify_ledger(ledger)

    # Assert
    assert "not a registered device key" in _failed(with_registry, "signatures")
    assert without.status is AuditStatus.VERIFIED
    assert any("no device key registry" in w for w in without.warnings)


def test_unsigned_ledger_verifies_with_a_warning_unless_signatures_are_required(
    tmp_path: Path,
) -> None:
    # Prepare: the same run written without a signer (an older run)
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    writer = LedgerWriter.create(
        tmp_path / "ledger.jsonl", ledger_header(run_id="old", cfg=cfg, plan=plan)
    )
    accountant = PrivacyAccountant(delta=plan.delta)
    for rnd, k in enumerate(PARTICIPATION, start=1):
        record = charge_round(
            accountant,
            plan,
            server_round=rnd,
            invited=k,
            participated=k,
            step=client_round_step(plan, participated=k),
        )
        writer.append_round(record.to_record())
    writer.close(epsilon=record.epsilon, epsilon_rdp=record.epsilon_rdp)

    # Execute
    lenient = verify_ledger(tmp_path)
    strict = verify_ledger(tmp_path, require_signed=True)

    # Assert
    assert lenient.status is AuditStatus.VERIFIED, lenient.reason
    assert not lenient.signed
    assert any(w.startswith("unsigned ledger") for w in lenient.warnings)
    assert _failed(strict, "signatures") == "the ledger is unsigned (no server_key)"


def test_signatures_without_a_server_key_fail(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    ledger = _copy(tmp_path, signed_run)
    records = _records(ledger)
    del records[0]["server_key"], records[0]["signature_scheme"], records[0]["signatures"]
    raws = [canonical_json(records[0])]
    for rec in records[1:]:
        rec["prev"] = line_hash(raws[-1])
        if rec["type"] == "final":
            rec["chain"] = chain_digest([line_hash(raw) for raw in raws])
        raws.append(canonical_json(rec))
    ledger.write_bytes(b"".join(raw + b"\n" for raw in raws))

    detail = _failed(verify_ledger(ledger), "signatures")

    assert detail == "line 2: signatures, but the header names no server_key"


# ---------------------------------------------------------------------------------- writer


def test_resuming_a_signed_ledger_needs_its_key(tmp_path: Path) -> None:
    # Prepare
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    path = tmp_path / "ledger.jsonl"
    signer = server_signer(tmp_path)
    LedgerWriter.create(path, ledger_header(run_id="r", cfg=cfg, plan=plan), signer=signer)

    # Execute / Assert
    with pytest.raises(DataError, match="no signing key was given"):
        LedgerWriter.open_existing(path)
    with pytest.raises(DataError, match="not by the key given"):
        LedgerWriter.open_existing(path, signer=Ed25519Signer(Ed25519PrivateKey.generate()))
    assert LedgerWriter.open_existing(path, signer=signer).signed


def test_cosignatures_need_a_signed_ledger(tmp_path: Path) -> None:
    cfg = _cfg()
    plan = plan_privacy(cfg, POPULATION)
    assert plan is not None
    writer = LedgerWriter.create(
        tmp_path / "ledger.jsonl", ledger_header(run_id="r", cfg=cfg, plan=plan)
    )
    record = charge_round(
        PrivacyAccountant(delta=plan.delta),
        plan,
        server_round=1,
        invited=22,
        participated=22,
        step=client_round_step(plan, participated=22),
    )

    with pytest.raises(ValueError, match="signed ledger"):
        writer.append_round(record.to_record(), cosignatures=[{"key": "x"}])


# ---------------------------------------------------------------------------- device ledger


def _device_ledger(
    path: Path, run_dir: Path, cosignature: dict[str, Any] | None, **changes: Any
) -> Path:
    """Member 3's own record, as client.store writes it: every round it trained in."""
    header = json.loads((run_dir / "ledger.jsonl").read_text().splitlines()[0])
    lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    entries = []
    for rec in lines:
        if rec["type"] != "round":
            continue
        entry = {
            "run": "signed",
            "flwr_run_id": 7,
            "round": rec["round"],
            "time": "2025-01-01T00:00:00+00:00",
            "mode": "client",
            "noise_multiplier": rec["noise_multiplier"] * 0.9,  # the guard's planned floor
            "announced_noise_multiplier": rec["noise_multiplier"],
            "expected_participants": rec["expected_participants"],
            "sample_rate": rec["sample_rate"],
            "steps": 1,
            "delta": header["delta"],
            "clip": rec["clip"],
        }
        if cosignature is not None and rec["round"] == cosignature["statement"]["round"]:
            entry["cosignature"] = cosignature
        entries.append({**entry, **changes.get(str(rec["round"]), {})})
    payload = {"format": 1, "history": "h.csv", "participations": entries}
    path.write_text(json.dumps(payload))
    return path


def test_a_devices_record_agrees_with_the_ledger(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    ledger, kept = signed_run
    device = _device_ledger(tmp_path / "device.json", ledger.parent, kept[0])

    report = verify_ledger(ledger, device_ledger=device)

    assert report.status is AuditStatus.VERIFIED, report.reason
    detail = {name: detail for name, _, detail in report.checks}["device ledger"]
    assert detail == "4 of the device's rounds match the ledger's lines"


def test_a_device_record_shows_a_dropped_cosignature(tmp_path: Path) -> None:
    # Prepare: the server (holding its key) drops round 1's co-signatures from its line
    run_dir = tmp_path / "run"
    ledger, kept = _run(run_dir)
    records = _records(ledger)
    del records[1]["signatures"]["committee"]
    _rewrite(ledger, records, server_signer(run_dir))
    device = _device_ledger(tmp_path / "device.json", run_dir, kept[0])
    assert verify_ledger(ledger).status is AuditStatus.VERIFIED  # the ledger alone is fine

    # Execute
    report = verify_ledger(ledger, device_ledger=device)

    # Assert
    assert _failed(report, "device ledger") == (
        "round 1: the device co-signed this round as a committee member, but its co-signature "
        "is not in the ledger's line"
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"2": {"announced_noise_multiplier": 0.5}}, "round 2: noise multiplier 0.5 announced"),
        ({"3": {"expected_participants": 10.0}}, "round 3: expected_participants 10.0 on the"),
        ({"1": {"round": 9}}, "the device took part in round 9, which the ledger does not have"),
        ({"4": {"clip": 1.0}}, "round 4: clip 1.0 on the device, 0.5 in the ledger"),
    ],
)
def test_a_device_record_that_differs_fails(
    tmp_path: Path,
    signed_run: tuple[Path, list[dict[str, Any]]],
    changes: dict[str, Any],
    reason: str,
) -> None:
    ledger, kept = signed_run
    device = _device_ledger(tmp_path / "device.json", ledger.parent, kept[0], **changes)

    report = verify_ledger(ledger, device_ledger=device)

    assert _failed(report, "device ledger").startswith(reason)


def test_a_device_ledger_of_another_run_fails(
    tmp_path: Path, signed_run: tuple[Path, list[dict[str, Any]]]
) -> None:
    ledger, _ = signed_run
    device = _device_ledger(tmp_path / "device.json", ledger.parent, None)
    payload = json.loads(device.read_text())
    for entry in payload["participations"]:
        entry["run"] = "another"
    device.write_text(json.dumps(payload))

    report = verify_ledger(ledger, device_ledger=device)

    assert _failed(report, "device ledger") == "the device ledger has no round of run 'signed'"

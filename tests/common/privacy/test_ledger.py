"""The privacy ledger: canonical hash-chained lines, crash-safe appends, resume."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.errors import DataError, FedrecError
from common.privacy import MechanismStep
from common.privacy.ledger import (
    GENESIS_HASH,
    LedgerMode,
    LedgerWriter,
    canonical_json,
    chain_digest,
    history_from_ledger,
    line_hash,
    read_ledger,
    read_ledger_lines,
)

HEADER: dict[str, Any] = {
    "run_id": "run-1",
    "created": "2025-01-01T00:00:00+00:00",
    "code_version": "0.1.0+test",
    "config": {"rounds": 3},
    "population": 100,
    "delta": 1e-4,
    "mode": "client",
}


def _round(r: int, participated: int = 5, *, released: bool = True) -> dict[str, Any]:
    # q = 0.05, N = 100 -> m = 5; z_eff = z * sqrt(participated / m)
    return {
        "round": r,
        "sample_rate": 0.05,
        "invited": 6,
        "participated": participated,
        "expected_participants": 5.0,
        "clip": 1.0,
        "noise_multiplier": 1.1,
        "effective_noise_multiplier": 1.1 * math.sqrt(participated / 5.0),
        "steps": 1,
        "epsilon": 0.5 * r,
        "epsilon_rdp": 0.6 * r,
        "released": released,
    }


def test_canonical_json_sorts_keys_and_drops_spaces() -> None:
    # Prepare / Execute
    raw = canonical_json({"b": 1, "a": [1.5, None]})

    # Assert
    assert raw == b'{"a":[1.5,null],"b":1}'


def test_canonical_json_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        canonical_json({"epsilon": math.inf})


def test_chain_digest_is_sha256_of_concatenated_hex() -> None:
    # Prepare
    hashes = [line_hash(b"a"), line_hash(b"b")]

    # Execute / Assert
    expected = hashlib.sha256((hashes[0] + hashes[1]).encode("ascii")).hexdigest()
    assert chain_digest(hashes) == expected


def test_writer_chains_every_line_to_the_previous_bytes(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"

    # Execute
    writer = LedgerWriter.create(path, HEADER)
    written = writer.append_round(_round(1))
    writer.append_round(_round(2))
    writer.close(epsilon=1.0, epsilon_rdp=1.2)

    # Assert
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line ends with a newline
    lines = lines[:-1]
    records = [json.loads(line) for line in lines]
    assert [r["type"] for r in records] == ["header", "round", "round", "final"]
    assert records[0]["prev"] == GENESIS_HASH
    assert records[0]["format"] == 1 and records[0]["accountant"] == "prv"
    for before, line in zip(lines, records[1:], strict=False):
        assert line["prev"] == hashlib.sha256(before).hexdigest()
    assert all(canonical_json(rec) == raw for rec, raw in zip(records, lines, strict=True))
    assert written == records[1]
    assert written["mechanism"] == "subsampled-gaussian"
    assert records[3]["rounds"] == 2
    assert records[3]["chain"] == chain_digest([line_hash(raw) for raw in lines[:3]])


def test_create_refuses_an_existing_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    LedgerWriter.create(path, HEADER)
    with pytest.raises(FileExistsError):
        LedgerWriter.create(path, HEADER)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("delta", 0.0, "delta"),
        ("delta", math.nan, "delta"),
        ("population", 0, "population"),
        ("mode", "sometimes", "mode"),
    ],
)
def test_create_rejects_a_bad_header(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LedgerWriter.create(tmp_path / "ledger.jsonl", {**HEADER, field: value})
    assert not (tmp_path / "ledger.jsonl").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"round": 2}, "round must be 1"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"participated": 7}, "exceeds invited"),
        ({"effective_noise_multiplier": 1.1}, "effective_noise_multiplier"),  # 4 of m=5 took part
        ({"steps": 3}, "one step per round"),
    ],
)
def test_append_round_rejects_a_bad_record(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # Prepare
    writer = LedgerWriter.create(tmp_path / "ledger.jsonl", HEADER)
    before = (tmp_path / "ledger.jsonl").read_bytes()

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        writer.append_round({**_round(1, participated=4), **change})
    assert (tmp_path / "ledger.jsonl").read_bytes() == before  # nothing half-written


def test_off_mode_records_null_epsilon(tmp_path: Path) -> None:
    # Prepare
    writer = LedgerWriter.create(tmp_path / "ledger.jsonl", {**HEADER, "mode": LedgerMode.OFF})
    record = {
        **_round(1),
        "noise_multiplier": 0.0,
        "effective_noise_multiplier": 0.0,
        "epsilon": None,
        "epsilon_rdp": None,
    }

    # Execute
    writer.append_round(record)

    # Assert
    assert read_ledger(tmp_path / "ledger.jsonl")[1]["epsilon"] is None
    with pytest.raises(ValueError, match="null"):
        writer.append_round({**record, "round": 2, "epsilon": 1.0})


def test_open_existing_continues_the_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    LedgerWriter.create(path, HEADER).append_round(_round(1))

    # Execute
    writer = LedgerWriter.open_existing(path)
    writer.append_round(_round(2))

    # Assert
    lines = read_ledger_lines(path)
    assert writer.rounds == 2
    assert lines[2].record["prev"] == lines[1].sha256
    with pytest.raises(ValueError, match="round must be 3"):
        writer.append_round(_round(2))


def test_open_existing_refuses_a_finished_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    LedgerWriter.create(path, HEADER).close(epsilon=0.0, epsilon_rdp=0.0)
    with pytest.raises(DataError, match="final line"):
        LedgerWriter.open_existing(path)


def test_open_existing_refuses_a_partial_last_line(tmp_path: Path) -> None:
    # Prepare: a crash in the middle of writing round 2
    path = tmp_path / "ledger.jsonl"
    writer = LedgerWriter.create(path, HEADER)
    writer.append_round(_round(1))
    with path.open("ab") as fh:
        fh.write(canonical_json(_round(2))[:40])

    # Execute / Assert
    with pytest.raises(DataError, match="incomplete last line") as info:
        LedgerWriter.open_existing(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert "\n" not in str(info.value)


def test_read_ledger_names_the_line_with_invalid_json(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    LedgerWriter.create(path, HEADER)
    with path.open("ab") as fh:
        fh.write(b'{"type": "round", oops}\n')

    # Execute / Assert
    with pytest.raises(FedrecError, match=r"ledger\.jsonl:2: invalid JSON"):
        read_ledger(path)


def test_history_uses_effective_multipliers_of_released_rounds() -> None:
    # Prepare
    records = [
        {"type": "header"},
        {"type": "round", **_round(1, participated=5)},
        {"type": "round", **_round(2, participated=4)},
        {"type": "round", **_round(3, participated=1, released=False)},
        {"type": "final"},
    ]

    # Execute
    history = history_from_ledger(records)

    # Assert
    assert history == [
        MechanismStep(noise_multiplier=1.1, sample_rate=0.05, steps=1),
        MechanismStep(noise_multiplier=1.1 * math.sqrt(0.8), sample_rate=0.05, steps=1),
    ]

"""`fedrec bench he` at a tiny size: every row is measured and fedrec meets its byte target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.he import threshold as th
from common.he.params import ParamSet
from simulations.bench_he import (
    FEDREC_ROW,
    THRESHOLD_ROW,
    BenchHEConfig,
    BenchHEResult,
    render,
    run_bench,
    to_json,
)
from simulations.cli import main


@pytest.fixture(scope="module")
def result() -> BenchHEResult:
    # 8192 values, so the threshold set's chunks (n = 8192) hold no padding
    return run_bench(BenchHEConfig(values=8192, updates=3))


def test_bench_rows_and_targets(result: BenchHEResult) -> None:
    names = [row.name for row in result.rows]
    assert names == [
        FEDREC_ROW,
        THRESHOLD_ROW,
        "fedrec, FLARE params",
        "FLARE default",
        "plaintext f32",
    ]
    assert FEDREC_ROW == "fedrec single-key" and THRESHOLD_ROW == "fedrec threshold 2-of-3"
    fedrec, flare = result.row(FEDREC_ROW), result.row("FLARE default")
    threshold = result.row(THRESHOLD_ROW)
    assert result.row("plaintext f32").bytes_per_value == 4.0
    assert fedrec.bytes_per_value < 16 < flare.bytes_per_value
    assert fedrec.relative_rms_error < 1e-5
    # threshold: two uncompressed 60-bit residues per value and prime, 2 data primes, plus headers
    assert 32.0 <= threshold.bytes_per_value < 32.2
    assert threshold.max_error < 1e-6  # flood included: values are about 1e-3, the flood 5e-8
    rows = render(result).row_count
    assert rows == 9  # 5 schemes + 2 threshold steps + 2 ratio rows
    assert to_json(result)["ratios_fedrec_over"]["FLARE default"]["bytes_per_value"] < 0.5


def test_bench_threshold_steps(result: BenchHEResult) -> None:
    steps, row = result.threshold, result.row(THRESHOLD_ROW)
    assert (steps.parties, steps.threshold) == (3, 2)
    assert (
        steps.flood_bits
        == th.plan_flood(
            ParamSet.THRESHOLD.params, n_updates=3, parties=3, members=2, max_decryptions=1024
        ).bits
    )
    assert steps.flood_value_std < 1e-7
    # one member sends one polynomial of 2 primes: 16 bytes per value, raw
    assert steps.partial_bytes_per_value == 16.0
    assert steps.upload_bytes_per_value == row.bytes_per_value
    assert steps.encrypt_us == row.encrypt_us and steps.add_us == row.add_us
    assert row.decrypt_us == pytest.approx(2 * steps.partial_us + steps.combine_us)
    for value in (steps.keygen_ms, steps.partial_us, steps.combine_us, steps.encrypt_us):
        assert 0 < value < 1e4
    data = to_json(result)["threshold"]
    assert data["flood_bits"] == steps.flood_bits and data["partial_us"] == steps.partial_us


def test_bench_config_checks_sizes() -> None:
    with pytest.raises(ValueError, match="values must be >= 1"):
        BenchHEConfig(values=0)


def test_cli_bench_he_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(
        ["bench", "he", "--values", "2000", "--updates", "2", "--out", str(tmp_path / "b.json")]
    )

    # Assert: the table on stdout, the JSON in --out
    assert code == 0
    assert "fedrec / FLARE" in capsys.readouterr().out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["config"]["values"] == 2000 and len(data["rows"]) == 5
    assert data["rows"][0]["name"] == "fedrec single-key"
    assert data["threshold"]["parties"] == 3
    assert main(["bench", "he", "--values", "0"]) == 2


def test_cli_bench_he_json_is_a_flag_printing_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: --json takes no value, like every other command's --json
    code = main(["bench", "he", "--values", "2000", "--updates", "2", "--json"])

    # Assert: stdout is the JSON alone
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["values"] == 2000 and len(data["rows"]) == 5


def test_module_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.bench_he", "--values", "1000", "--updates", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "FLARE default" in proc.stdout
    assert "fedrec single-key" in proc.stdout and "fedrec threshold 2-of-3" in proc.stdout

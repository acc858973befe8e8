"""`fedrec bench he` at a tiny size: every row is measured and fedrec meets its byte target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.bench_he import BenchHEConfig, render, run_bench, to_json
from simulations.cli import main


def test_bench_rows_and_targets() -> None:
    # Execute
    result = run_bench(BenchHEConfig(values=3000, updates=3))

    # Assert
    names = [row.name for row in result.rows]
    assert names == ["fedrec", "fedrec, FLARE params", "FLARE default", "plaintext f32"]
    fedrec, flare = result.row("fedrec"), result.row("FLARE default")
    assert result.row("plaintext f32").bytes_per_value == 4.0
    assert fedrec.bytes_per_value < 16 < flare.bytes_per_value
    assert fedrec.relative_rms_error < 1e-5
    assert render(result).row_count == 6  # 4 schemes + 2 ratio rows
    assert to_json(result)["ratios_fedrec_over"]["FLARE default"]["bytes_per_value"] < 0.5


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
    assert data["config"]["values"] == 2000 and len(data["rows"]) == 4
    assert main(["bench", "he", "--values", "0"]) == 2


def test_cli_bench_he_json_is_a_flag_printing_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: --json takes no value, like every other command's --json
    code = main(["bench", "he", "--values", "2000", "--updates", "2", "--json"])

    # Assert: stdout is the JSON alone
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["values"] == 2000 and len(data["rows"]) == 4


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

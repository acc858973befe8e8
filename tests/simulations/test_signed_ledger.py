"""End to end through Flower: an encrypted DP run's ledger is signed and co-signed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import synthesize

pytestmark = pytest.mark.slow

FEDREC = [sys.executable, "-m", "simulations.cli"]


def test_encrypted_dp_run_is_signed_cosigned_and_verifies_with_its_partition(
    tmp_path: Path,
) -> None:
    # Prepare
    data = synthesize(60, 40, seed=3, out_dir=tmp_path / "synth")
    config = tmp_path / "tiny.toml"
    config.write_text(
        "\n".join(
            [
                "rounds = 2",
                "eval_every = 2",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "round_timeout = 120",
                "[privacy]",
                'mode = "client"',
                "clip = 0.5",
                "noise_multiplier = 1.0",
                "[encryption]",
                "enabled = true",
            ]
        )
        + "\n"
    )
    run_dir = tmp_path / "run"

    # Execute
    run = subprocess.run(
        [*FEDREC, "simulate", "--config", str(config), "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    audit = subprocess.run(
        [
            *FEDREC,
            "audit",
            "verify",
            str(run_dir),
            "--partition",
            str(run_dir / "data"),
            "--require-signed",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert audit.returncode == 0, audit.stdout + audit.stderr
    report = json.loads(audit.stdout)
    assert report["status"] == "verified" and report["signed"] is True
    assert report["cosigned_rounds"] == 2
    lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]
    # threshold mode: every key holder that committed (all 5 by default) co-signs
    assert all(len(x["signatures"]["committee"]) == 5 for x in lines if x["type"] == "round")
    key = run_dir / "signing" / "server.key"
    assert key.stat().st_mode & 0o077 == 0

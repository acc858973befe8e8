"""What one tiny `fedrec simulate` run hands an operator: the results table, results.json with
baselines and provenance, rounds.csv and the report (Flower's real simulation engine)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.data import synthesize

pytestmark = pytest.mark.slow


def test_simulate_reports_federated_beside_the_baselines(tmp_path: Path) -> None:
    # Prepare
    data = synthesize(60, 40, seed=3, out_dir=tmp_path / "synth")
    config = tmp_path / "tiny.toml"
    config.write_text(
        "\n".join(
            [
                'name = "tiny report"',
                "rounds = 2",
                "eval_every = 1",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "lr = 0.01",
                "round_timeout = 120",
                "[privacy]",
                'mode = "client"',
                "clip = 0.5",
                "target_epsilon = 8.0",
            ]
        )
        + "\n"
    )
    run_dir = tmp_path / "run"

    # Execute
    command = ["simulate", "--config", str(config), "--out", str(run_dir)]
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    pop = results["baselines"]["popularity"]["test"]["ndcg@100"]
    ease = results["baselines"]["ease"]
    fed = results["final"]["test"]["ndcg@100"]
    assert re.search(rf"popularity\s+│\s+{pop:.4f}\s", proc.stdout)
    assert ease["label"] in proc.stdout and f"{ease['test']['ndcg@100']:.4f}" in proc.stdout
    assert f"NDCG@100 federated / popularity: {fed / pop:.1%}" in proc.stdout
    assert "of target 8" in proc.stdout
    assert results["provenance"]["flower"] == "1.42.0"
    with (run_dir / "rounds.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert "epsilon" not in (reader.fieldnames or [])
    assert all(r["epsilon_rdp"] for r in rows)
    assert [bool(r["epsilon_prv"]) for r in rows] == [False, True]
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    for element in ("baselines", "privacy", "rounds", "config", "provenance"):
        assert f'<section id="{element}"' in page
    assert "VERIFIED" in page

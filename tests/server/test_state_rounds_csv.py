"""rounds.csv: one accountant per epsilon column, also for rounds saved before the split."""

from __future__ import annotations

import csv
from pathlib import Path

from common.rounds import ROUND_FIELDS
from common.run.config import RunConfig
from server.state import RunOutputs


def _ledger(round_: int, accountant: str, epsilon: float, epsilon_rdp: float) -> dict[str, object]:
    return {
        "round": round_,
        "epsilon": epsilon,
        "epsilon_accountant": accountant,
        "epsilon_rdp": epsilon_rdp,
    }


def test_rounds_saved_with_only_the_claimed_epsilon_get_split_columns(tmp_path: Path) -> None:
    # Prepare: the records a state saved before epsilon_prv existed (a resumed run)
    rounds = [
        {"round": 1, "epsilon": 1.5, "epsilon_rdp": 1.5, "ledger": _ledger(1, "rdp", 1.5, 1.5)},
        {"round": 2, "epsilon": 1.9, "epsilon_rdp": 2.4, "ledger": _ledger(2, "prv", 1.9, 2.4)},
    ]

    # Execute
    RunOutputs(tmp_path, RunConfig()).write_rounds(rounds, None)

    # Assert
    with (tmp_path / "rounds.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == list(ROUND_FIELDS) and "epsilon" not in ROUND_FIELDS
    assert [(r["epsilon_rdp"], r["epsilon_prv"]) for r in rows] == [("1.5", ""), ("2.4", "1.9")]

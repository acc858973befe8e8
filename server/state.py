"""What a run keeps on disk between rounds: the server state and the files reported each round.

- :class:`ServerState` (``RUN_DIR/server_state.pt``): the model, the optimizer and every round's
  record so far, saved atomically after each round, so a killed run resumes after its last
  complete round with no gap or duplicate.
- :class:`RunOutputs`: ``progress.jsonl`` (events for the CLI), ``rounds.csv`` and
  ``results.json``, rewritten atomically after each round.
- :func:`open_ledger`: the privacy ledger, created or continued (a ledger that lags the state
  by the round a crash interrupted is completed from the state).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import to_dict
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.privacy import DPPlan
from common.privacy.ledger import LedgerWriter, read_ledger
from common.privacy.rounds import ledger_header
from common.rounds import ROUND_FIELDS, epsilon_prv
from common.run.config import RunConfig

__all__ = ["STATE_FILE", "RunOutputs", "ServerState", "open_ledger"]

STATE_FILE = "server_state.pt"


@dataclass
class ServerState:
    """Everything needed to continue a run: the model, the optimizer and the rounds so far."""

    round: int
    weights: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the state atomically (tensors and plain containers only)."""
        opt = self.optimizer
        payload = {
            "round": self.round,
            "weights": {
                k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.weights.items()
            },
            "optimizer": {
                "steps": opt["steps"],
                "m": {k: torch.from_numpy(v) for k, v in opt["m"].items()},
                "v": {k: torch.from_numpy(v) for k, v in opt["v"].items()},
            },
            "rounds": json.dumps(self.rounds),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> ServerState:
        """Read what :meth:`save` wrote."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        opt = payload["optimizer"]
        return cls(
            round=int(payload["round"]),
            weights={k: v.numpy() for k, v in payload["weights"].items()},
            optimizer={
                "steps": int(opt["steps"]),
                "m": {k: v.numpy() for k, v in opt["m"].items()},
                "v": {k: v.numpy() for k, v in opt["v"].items()},
            },
            rounds=json.loads(payload["rounds"]),
        )


def open_ledger(run_dir: Path, cfg: RunConfig, plan: DPPlan, state: ServerState) -> LedgerWriter:
    """Create ``RUN_DIR/ledger.jsonl``, or continue it when resuming.

    The server state is saved before the ledger line of a round, so after a crash between the
    two the ledger can lag one round behind the state: that line is written again from the
    state's record of the round.
    """
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        if state.round > 0:
            raise RuntimeError(f"{path} is missing but the run is at round {state.round}")
        return LedgerWriter.create(path, ledger_header(run_id=run_dir.name, cfg=cfg, plan=plan))
    writer = LedgerWriter.open_existing(path)
    rounds_in_ledger = sum(1 for r in read_ledger(path) if r.get("type") == "round")
    for record in state.rounds[rounds_in_ledger:]:
        writer.append_round(record["ledger"])
    return writer


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    """A round's ``rounds.csv`` row: ``record``, with its per-accountant epsilons filled in from
    its ledger record when the record predates them (a run resumed from an older state)."""
    ledger = record.get("ledger")
    if not isinstance(ledger, dict) or "epsilon_prv" in record:
        return record
    return {
        **record,
        "epsilon_rdp": record.get("epsilon_rdp", ledger.get("epsilon_rdp")),
        "epsilon_prv": epsilon_prv(ledger),
    }


class RunOutputs:
    """The files a run keeps up to date after every round."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.progress = run_dir / "progress.jsonl"

    def event(self, **fields: Any) -> None:
        """Append one event (``start``, ``nodes``, ``round``, ``done``) to ``progress.jsonl``."""
        fields["time"] = time.time()
        with self.progress.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields) + "\n")

    def write_rounds(self, rounds: list[dict[str, Any]], final: dict[str, Any] | None) -> None:
        """Rewrite ``rounds.csv`` and ``results.json`` (keeping what others added to it)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROUND_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for r in rounds:
            row = _csv_row(r)
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in ROUND_FIELDS})
        atomic_write_text(self.run_dir / "rounds.csv", buf.getvalue())
        results_path = self.run_dir / "results.json"
        previous = json.loads(results_path.read_text()) if results_path.exists() else {}
        atomic_write_json(
            results_path,
            {
                **previous,
                "config": to_dict(self.cfg),
                "rounds": rounds,
                "final": final,
            },
        )

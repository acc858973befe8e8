"""What a run keeps on disk between rounds: the server state and the files reported each round.

- :class:`ServerState` (``RUN_DIR/server_state.pt``): the model, the optimizer, every round's
  record so far (and the warm start's releases and summary, :mod:`server.warmstart`) and the
  :func:`~common.run.owner.config_hash` of the run's config, saved atomically after the warm
  start and after each round, so a killed run resumes after its last complete step with no
  gap or duplicate (and never runs its warm start twice), and never under another config.
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
from common.errors import FedrecError
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.privacy import DPPlan
from common.privacy.ledger import LedgerWriter, read_ledger
from common.privacy.rounds import ledger_header
from common.privacy.signing import server_signer
from common.rounds import ROUND_FIELDS, epsilon_prv
from common.run.config import RunConfig

__all__ = ["STATE_FILE", "RunOutputs", "ServerState", "open_ledger"]

STATE_FILE = "server_state.pt"


@dataclass
class ServerState:
    """Everything needed to continue a run: the model, the optimizer and the rounds so far.

    ``config_hash`` is the :func:`~common.run.owner.config_hash` of the config the run started
    with (``None`` in a state saved before fedrec recorded it). ``releases`` holds the warm
    start's release records (a round's record plus ``release``, with its ``ledger`` record
    under DP) and ``warm_start`` its summary (``results.json``'s ``warm_start``); ``None``
    until the warm start ran (or without one).
    """

    round: int
    weights: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    config_hash: str | None = None
    releases: list[dict[str, Any]] = field(default_factory=list)
    warm_start: dict[str, Any] | None = None

    def ledger_records(self) -> list[dict[str, Any]]:
        """The ledger records charged so far, in order: the releases', then the rounds'."""
        return [r["ledger"] for r in [*self.releases, *self.rounds] if r.get("ledger")]

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
            "config_hash": self.config_hash or "",
            "releases": json.dumps(self.releases),
            "warm_start": json.dumps(self.warm_start),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path, *, expect_config_hash: str | None = None) -> ServerState:
        """Read what :meth:`save` wrote.

        Raises
        ------
        FedrecError
            If ``expect_config_hash`` is given and the state records another config's hash (the
            folder holds another run); a state that predates the hash is not refused.
        """
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved = payload.get("config_hash") or None
        if expect_config_hash is not None and saved not in (None, expect_config_hash):
            raise FedrecError(
                f"{path} is the state of a run with another config (config hash {saved[:12]}, "
                f"not {expect_config_hash[:12]}): start this run in another folder, or with "
                "--force to start over"
            )
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
            config_hash=saved,
            releases=json.loads(payload.get("releases", "[]")),
            warm_start=json.loads(payload.get("warm_start", "null")),
        )

    @staticmethod
    def read_config_hash(path: Path) -> str | None:
        """The ``config_hash`` of the state saved at ``path``, without reading its tensors into
        memory (memory-mapped); ``None`` for a state that predates it."""
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        value = payload.get("config_hash")
        return str(value) if value else None


def open_ledger(run_dir: Path, cfg: RunConfig, plan: DPPlan, state: ServerState) -> LedgerWriter:
    """Create ``RUN_DIR/ledger.jsonl``, or continue it when resuming.

    The server state is saved before the ledger line of a round (and before the warm start's
    release lines), so after a crash between the two the ledger can lag one round (or the
    releases) behind the state: those lines are written again from the state's records
    (without the committee's co-signatures, which the state does not keep). Every line is
    signed with the server's key, ``RUN_DIR/signing/server.key`` (:mod:`common.privacy.signing`,
    made with the ledger).
    """
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        if state.round > 0 or state.releases:
            at = f"round {state.round}" if state.round > 0 else "its warm start"
            raise RuntimeError(f"{path} is missing but the run is past {at}")
        header = ledger_header(run_id=run_dir.name, cfg=cfg, plan=plan)
        return LedgerWriter.create(path, header, signer=server_signer(run_dir))
    writer = LedgerWriter.open_existing(path, signer=server_signer(run_dir))  # signed: its key
    kinds = [r.get("type") for r in read_ledger(path)]
    for record in state.releases[kinds.count("release") :]:
        writer.append_release(record["ledger"])
    for record in state.rounds[kinds.count("round") :]:
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
    """The files a run keeps up to date after every round.

    ``warm_start``: the warm start's summary, written into ``results.json`` with every update
    (``None`` until it ran, or without one).
    """

    def __init__(
        self, run_dir: Path, cfg: RunConfig, *, warm_start: dict[str, Any] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.progress = run_dir / "progress.jsonl"
        self.warm_start = warm_start

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
                "warm_start": self.warm_start,
            },
        )

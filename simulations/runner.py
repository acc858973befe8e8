"""``fedrec simulate``: prepare a run folder, run Flower's simulation, report, clean up.

The simulation runs in a child process started in its own session (:mod:`simulations.worker`),
so the whole tree it starts (Ray's GCS, raylet, actors) shares one process group that is
stopped as a unit on success, error or Ctrl-C: nothing outlives the command. The ServerApp
appends one JSON line per round to ``RUN_DIR/progress.jsonl``, which this process follows to
drive the progress display.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.he import ParamSet, init_keys
from common.io import atomic_write_json
from common.processes import interrupts_raise
from common.run.config import RunConfig, load_run_config
from common.run.folder import write_run_folder

__all__ = ["ProgressEvent", "SimulationOutcome", "prepare_run", "simulate"]

logger = logging.getLogger(__name__)

ProgressEvent = dict[str, Any]
"""One line of ``progress.jsonl``: ``{"event": "start" | "nodes" | "round" | "done", ...}``."""


@dataclass(frozen=True)
class SimulationOutcome:
    """How a run ended."""

    run_dir: Path
    returncode: int
    wall_seconds: float


def prepare_run(cfg: RunConfig, run_dir: Path, *, cache_dir: Path | None = None) -> int:
    """Write ``config.toml`` and ``data/`` into ``run_dir``; returns the number of clients.

    An encrypted run without a key folder gets one in ``run_dir/keys`` (the simulation plays
    the operator's ``fedrec keys init``); a named key folder must already exist.
    """
    n_clients = write_run_folder(cfg, run_dir, cache_dir=cache_dir).n_clients
    if cfg.encryption.enabled:
        keydir = cfg.encryption.keys_dir(run_dir)
        if cfg.encryption.keys is None and not (keydir / "client.ctx").exists():
            init_keys(keydir, params=ParamSet.FEDREC.params)
        elif not (keydir / "server.ctx").exists():
            raise FedrecError(
                f"encryption.keys: {keydir} holds no keys; run `fedrec keys init --out {keydir}`"
            )
    return n_clients


def resume_config(run_dir: Path) -> RunConfig:
    """The config of an existing run folder (for ``--resume``)."""
    if not (run_dir / "config.toml").is_file():
        raise FedrecError(f"{run_dir}: not a fedrec run folder (no config.toml)")
    return load_run_config(run_dir / "config.toml")


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after ``grace``."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _follow(path: Path, pos: int) -> tuple[list[ProgressEvent], int]:
    if not path.exists():
        return [], pos
    events = []
    with path.open("rb") as fh:
        fh.seek(pos)
        for line in fh:
            if not line.endswith(b"\n"):
                break
            pos += len(line)
            events.append(json.loads(line))
    return events, pos


def simulate(
    run_dir: Path,
    n_clients: int,
    cfg: RunConfig,
    *,
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> SimulationOutcome:
    """Run the prepared simulation in ``run_dir`` and wait for it; nothing is left running.

    Raises
    ------
    FedrecError
        If the simulation process fails; the message points at ``RUN_DIR/simulation.log``.
    """
    progress = run_dir / "progress.jsonl"
    pos = progress.stat().st_size if progress.exists() else 0
    log_path = run_dir / "simulation.log"
    start = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "simulations.worker",
        str(run_dir),
        str(n_clients),
        str(cfg.simulation.num_cpus_per_client),
    ]
    with interrupts_raise(), log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            done = False
            while True:
                events, pos = _follow(progress, pos)
                for event in events:
                    done = done or event.get("event") == "done"
                    if on_event is not None:
                        on_event(event)
                if proc.poll() is not None:
                    events, pos = _follow(progress, pos)
                    for event in events:
                        done = done or event.get("event") == "done"
                        if on_event is not None:
                            on_event(event)
                    break
                time.sleep(0.2)
        finally:
            _kill_group(proc)
    wall = time.monotonic() - start
    if proc.returncode != 0 or not done:
        tail = _last_error_line(log_path)
        raise FedrecError(f"simulation failed (exit {proc.returncode}): {tail} — see {log_path}")
    return SimulationOutcome(run_dir=run_dir, returncode=proc.returncode, wall_seconds=wall)


def _last_error_line(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "no output"


def finish_results(run_dir: Path, *, wall_seconds: float, reference: dict[str, Any] | None) -> None:
    """Add the wall time and the centralized reference to ``results.json``."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    results["wall_seconds"] = round(wall_seconds, 2)
    results["reference"] = reference
    atomic_write_json(path, results)


def central_reference(cfg: RunConfig, run_dir: Path, *, cache_dir: Path | None) -> dict[str, Any]:
    """Train the centralized Mult-VAE of the same architecture on the same split."""
    from simulations.central import CentralConfig, RecommenderKind, run_central

    central = CentralConfig(
        dataset=cfg.data.dataset,
        model=RecommenderKind(cfg.model.kind),
        dims=cfg.model.dims,
        dropout=cfg.model.dropout,
        beta_cap=cfg.model.beta_cap,
        seed=cfg.seed,
        min_rating=cfg.data.min_rating,
        n_heldout_users=cfg.data.n_heldout_users,
        cache_dir=cache_dir,
    )
    central = replace(central, epochs=cfg.reference_epochs)
    result = run_central(central, run_dir / "reference")
    dims = ",".join(str(d) for d in cfg.model.dims)
    return {"label": f"centralized {cfg.model.kind} [{dims}]", "test": result.test}

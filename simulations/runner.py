"""``fedrec simulate``: prepare a run folder, run Flower's simulation, report, clean up.

The simulation runs in a child process started in its own session (:mod:`simulations.worker`),
so the whole tree it starts (Ray's GCS, raylet, actors) shares one process group that is
stopped as a unit on success, error or Ctrl-C: nothing outlives the command. On an existing
Ray cluster (``ray_address``) only the driver is fedrec's: the actors run in the cluster's
raylets and Ray frees them when the driver disconnects or dies, while the cluster keeps
running (fedrec never stops a cluster it did not start). The ServerApp appends one JSON line
per round to ``RUN_DIR/progress.jsonl``, which this process follows to drive the progress
display.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
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


def _check_ray_head(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` Ray address.

    Ray itself retries an unreachable GCS for minutes. Other forms (``local``, ``auto``,
    ``ray://``) are left to Ray.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise FedrecError(
            f"Ray cluster {address}: no Ray head answers there ({err}); start one with "
            f"`ray start --head --port={port}` or check --ray-address / simulation.ray_address"
        ) from None


def simulate(
    run_dir: Path,
    n_clients: int,
    cfg: RunConfig,
    *,
    on_event: Callable[[ProgressEvent], None] | None = None,
    ray_address: str | None = None,
) -> SimulationOutcome:
    """Run the prepared simulation in ``run_dir`` and wait for it; nothing is left running.

    ``ray_address`` (else ``cfg.simulation.ray_address``) names an existing Ray cluster to run
    on, which is left running; without one the run starts and stops a local Ray of its own.

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
    address = ray_address if ray_address is not None else cfg.simulation.ray_address
    if address is not None:
        address = address.strip()
        if not address:
            raise FedrecError("--ray-address: give HOST:PORT of a Ray head (or 'local')")
        _check_ray_head(address)
        cmd.append(address)
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


PROVENANCE_PACKAGES = {
    "fedrec": "fedrec",
    "flower": "flwr",
    "torch": "torch",
    "opacus": "opacus",
    "tenseal": "tenseal",
}
"""What :func:`provenance` reports the version of: label -> distribution name."""


def _git(repo: Path, *args: str) -> str | None:
    """``git -C repo ARGS`` stdout stripped, or ``None`` if git is missing or fails."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """The code that produced a run: package versions and the git commit of fedrec's checkout.

    Returns
    -------
    dict
        ``{"fedrec": "0.1.0", "flower": ..., "torch": ..., "opacus": ..., "tenseal": ...,
        "python": ..., "git_commit": 40 hex digits or "unknown", "git_dirty": bool or None}``.
        A package that is not installed reads ``"not installed"``. The commit is that of the
        repository holding this package's source (an editable install), and ``"unknown"`` when
        the package is not in a git checkout of its own (e.g. installed from a wheel).
    """
    info: dict[str, Any] = {}
    for label, dist in PROVENANCE_PACKAGES.items():
        try:
            info[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[label] = "not installed"
    info["python"] = platform.python_version()
    root = Path(__file__).resolve().parent.parent
    toplevel = _git(root, "rev-parse", "--show-toplevel")
    commit = _git(root, "rev-parse", "HEAD") if toplevel is not None else None
    if toplevel is None or Path(toplevel).resolve() != root or not commit:
        info["git_commit"], info["git_dirty"] = "unknown", None
    else:
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        info["git_commit"] = commit
        info["git_dirty"] = None if status is None else bool(status)
    return info


def finish_results(run_dir: Path, *, wall_seconds: float, reference: dict[str, Any] | None) -> None:
    """Complete ``results.json`` of a finished run.

    Adds the wall time, the centralized reference (``None`` when not run), the popularity and
    EASE baselines on the run's own held-out test users
    (:func:`simulations.baselines.baselines_on_split`; ``None`` without training rows) and the
    :func:`provenance` of the code.
    """
    from simulations.baselines import baselines_on_split

    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    results["wall_seconds"] = round(wall_seconds, 2)
    results["reference"] = reference
    results["baselines"] = baselines_on_split(run_dir)
    results["provenance"] = provenance()
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

"""``fedrec simulate``: prepare a run folder, run Flower's simulation, report, clean up.

(Over 400 lines: a simulation's whole process life: prepare, start, follow, stop.)

The run folder has one owner: :func:`claim_run_dir` takes its lock (``RUN_DIR/.lock``,
:class:`common.run.owner.RunLock`) before anything is written there, refuses a folder in use,
takes over the lock of a run that died, and refuses to start a new run over another run's
state without ``--force``; :func:`resume_config` refuses a folder whose state or ledger belongs
to another config.

The simulation runs in a child process started in its own session (:mod:`simulations.worker`),
so the whole tree it starts (Ray's GCS, raylet, actors) shares one process group that is
stopped as a unit on success, error, Ctrl-C, SIGTERM or SIGHUP: nothing outlives the command.
The child inherits the run lock and dies with this process even when this one is killed
outright (SIGKILL): it watches its parent (:func:`common.processes.die_with_parent`) and then
stops its own group, so no orphan keeps writing the ledger. On an existing
Ray cluster (``ray_address``) only the driver is fedrec's: the actors run in the cluster's
raylets and Ray frees them when the driver disconnects or dies, while the cluster keeps
running (fedrec never stops a cluster it did not start). The ServerApp appends one JSON line
per round to ``RUN_DIR/progress.jsonl``, which this process follows to drive the progress
display.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.he import ParamSet, init_keys
from common.io import atomic_write_json
from common.privacy.signing import register_simulated_devices
from common.processes import interrupts_raise
from common.run.config import RunConfig, load_run_config
from common.run.folder import build_run_data, write_run_folder
from common.run.owner import RunLock, config_hash

__all__ = [
    "RUN_FILES",
    "ProgressEvent",
    "SimulationOutcome",
    "claim_run_dir",
    "prepare_run",
    "resume_config",
    "simulate",
]

logger = logging.getLogger(__name__)

ProgressEvent = dict[str, Any]
"""One line of ``progress.jsonl``: ``{"event": "start" | "nodes" | "round" | "done", ...}``."""


@dataclass(frozen=True)
class SimulationOutcome:
    """How a run ended."""

    run_dir: Path
    returncode: int
    wall_seconds: float


BLAS_THREADS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Thread counts of the BLAS libraries in the simulation's processes (an environment already
setting them wins)."""

RUN_OUTPUTS = ("server_state.pt", "progress.jsonl", "results.json", "rounds.csv", "ledger.jsonl")
"""What a run writes into its folder while it runs (``--force`` removes them first)."""


def prepare_run(
    cfg: RunConfig, run_dir: Path, *, cache_dir: Path | None = None, force: bool = False
) -> int:
    """Write ``config.toml`` and ``data/`` into ``run_dir``; returns the number of clients.

    The data is read and checked against ``cfg`` first, and a named key folder must exist: a
    refused run writes nothing (no run folder, or an existing one untouched). An encrypted run
    without a key folder gets one in ``run_dir/keys`` (the simulation plays the operator's
    ``fedrec keys init``). ``force`` then removes an earlier run's outputs (:data:`RUN_OUTPUTS`).

    Raises
    ------
    ConfigError
        For a value the data does not allow, with its ``key``.
    FedrecError
        If ``encryption.keys`` names a folder without keys.
    """
    data = build_run_data(cfg, cache_dir=cache_dir)
    keydir = cfg.encryption.keys_dir(run_dir)
    single_key = cfg.encryption.enabled and not cfg.encryption.threshold_mode
    named_keys = single_key and cfg.encryption.keys is not None
    if named_keys and not (keydir / "server.ctx").exists():
        raise FedrecError(
            f"encryption.keys: {keydir} holds no keys; run `fedrec keys init --out {keydir}`"
        )
    if force and run_dir.exists():
        for name in RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        if cfg.encryption.threshold_mode and cfg.encryption.keys is None and keydir.exists():
            # a new run needs a new ceremony: the old key's holders have spent their slots
            shutil.rmtree(keydir)
    n_clients = write_run_folder(cfg, run_dir, data=data).n_clients
    # threshold mode: the run's key ceremony makes the keys (server.threshold), no one else
    simulated_keys = single_key and cfg.encryption.keys is None
    if simulated_keys and not (keydir / "client.ctx").exists():
        init_keys(keydir, params=ParamSet.FEDREC.params)
    if cfg.encryption.enabled:  # the operator registers the committee's co-signing keys
        register_simulated_devices(run_dir, n_clients)
    return n_clients


RUN_FILES = ("server_state.pt", "ledger.jsonl", "results.json")
"""The files that say a folder holds a run (started, or finished)."""


def claim_run_dir(run_dir: Path, *, resume: bool = False, force: bool = False) -> RunLock:
    """Take ``run_dir``'s lock for this command, before anything is written there.

    ``resume``: the folder must be a run folder (``config.toml``). Otherwise the folder is
    created if needed (and removed again by :meth:`~common.run.owner.RunLock.release` if the
    command leaves it empty), and without ``force`` it must not hold a run already
    (:data:`RUN_FILES`): a new run never continues another run's state by accident.

    Raises
    ------
    common.run.owner.RunInUseError
        ``RUN is in use by pid P on HOST since T``: another command (or its worker) writes it.
    FedrecError
        Not a run folder (``resume``), or a run folder without ``force`` (naming ``--resume``
        and ``--force``).
    """
    if resume and not (run_dir / "config.toml").is_file():
        raise FedrecError(f"{run_dir}: not a fedrec run folder (no config.toml)")
    lock = RunLock.acquire(run_dir)
    if not resume and not force:
        found = [name for name in RUN_FILES if (run_dir / name).exists()]
        if found:
            lock.release()
            raise FedrecError(
                f"{run_dir} already holds a run ({', '.join(found)}): use --resume {run_dir} "
                "to continue it, or --force to start over"
            )
    return lock


def resume_config(run_dir: Path) -> RunConfig:
    """The config of an existing run folder (for ``--resume``).

    Raises
    ------
    FedrecError
        If the folder has no ``config.toml``, or if its server state or ledger header records
        the hash of another config (:func:`common.run.owner.config_hash`) than ``config.toml``
        holds. A state or ledger that predates the hash is not refused.
    """
    if not (run_dir / "config.toml").is_file():
        raise FedrecError(f"{run_dir}: not a fedrec run folder (no config.toml)")
    cfg = load_run_config(run_dir / "config.toml")
    expected = config_hash(cfg)
    for name, saved in _saved_config_hashes(run_dir).items():
        if saved is not None and saved != expected:
            raise FedrecError(
                f"{run_dir}: {name} belongs to another config than {run_dir / 'config.toml'} "
                f"(config hash {saved[:12]}, not {expected[:12]}); this run cannot be resumed: "
                f"start over with --out {run_dir} --force"
            )
    return cfg


def _saved_config_hashes(run_dir: Path) -> dict[str, str | None]:
    """The config hashes recorded by the run's server state and ledger header, if present."""
    from server.state import STATE_FILE, ServerState

    found: dict[str, str | None] = {}
    state = run_dir / STATE_FILE
    if state.exists():
        found[STATE_FILE] = ServerState.read_config_hash(state)
    ledger = run_dir / "ledger.jsonl"
    if ledger.exists():
        with ledger.open("rb") as fh:
            first = fh.readline()
        try:
            header = json.loads(first)
        except ValueError:
            header = None
        value = header.get("config_hash") if isinstance(header, dict) else None
        found["ledger.jsonl"] = value if isinstance(value, str) else None
    return found


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


@contextlib.contextmanager
def _holding(run_dir: Path, lock: RunLock | None) -> Iterator[RunLock]:
    """``lock``, or the lock of ``run_dir`` taken (and given up) around the block."""
    if lock is not None:
        yield lock
        return
    with RunLock.acquire(run_dir) as own:
        yield own


def _worker_env(lock: RunLock) -> dict[str, str]:
    """The worker's environment: this process as the parent it dies with, and the lock's fd.

    The kernel's parent-death signal follows the thread that started the worker, so it is
    armed only when that is this process's main thread; the worker's watchdog runs anyway.
    """
    from simulations.worker import LOCK_FD_ENV, PARENT_ENV, PDEATHSIG_ENV

    main = threading.current_thread() is threading.main_thread()
    return {
        # One BLAS thread per process: the server thread's NumPy calls (the privacy plan's
        # PRV discretization) otherwise spin OpenBLAS threads against Flower's polling
        # threads on a small machine, slowing a 2 s plan to minutes; clients are one CPU each.
        **BLAS_THREADS,
        **os.environ,
        PARENT_ENV: str(os.getpid()),
        PDEATHSIG_ENV: "1" if main else "0",
        LOCK_FD_ENV: str(lock.fileno()),
    }


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
    lock: RunLock | None = None,
) -> SimulationOutcome:
    """Run the prepared simulation in ``run_dir`` and wait for it; nothing is left running.

    ``ray_address`` (else ``cfg.simulation.ray_address``) names an existing Ray cluster to run
    on, which is left running; without one the run starts and stops a local Ray of its own.
    ``lock`` is the caller's lock of ``run_dir`` (:func:`claim_run_dir`); without one the run
    takes the lock itself for its duration. The worker inherits the lock and dies with this
    process (see the module docstring).

    Raises
    ------
    FedrecError
        If the simulation process fails, or no round applied an update (``no round applied an
        update ...: reasons``); the message points at ``RUN_DIR/simulation.log``.
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
    with interrupts_raise(), _holding(run_dir, lock) as held, log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(held.fileno(),),
            env=_worker_env(held),
        )
        try:
            held.record_worker(proc.pid)
            done = False
            error: str | None = None  # the ServerApp's reason for a run that trained nothing
            while True:
                events, pos = _follow(progress, pos)
                for event in events:
                    done = done or event.get("event") == "done"
                    error = error or event.get("error")
                    if on_event is not None:
                        on_event(event)
                if proc.poll() is not None:
                    events, pos = _follow(progress, pos)
                    for event in events:
                        done = done or event.get("event") == "done"
                        error = error or event.get("error")
                        if on_event is not None:
                            on_event(event)
                    break
                time.sleep(0.2)
        finally:
            _kill_group(proc)
    wall = time.monotonic() - start
    if error is not None:
        raise FedrecError(f"{error} — see {log_path}")
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
    (:func:`simulations.baselines.baselines_on_split`; ``None`` without training rows), every
    model's fairness, exposure and calibration (:func:`simulations.fairness.fairness_of_run`)
    and the :func:`provenance` of the code.
    """
    from simulations.baselines import baselines_on_split, fit_baselines
    from simulations.fairness import fairness_of_run

    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    results["wall_seconds"] = round(wall_seconds, 2)
    results["reference"] = reference
    fitted = fit_baselines(run_dir)
    results["baselines"] = baselines_on_split(run_dir, fitted=fitted)
    results["fairness"] = fairness_of_run(
        run_dir,
        baselines=fitted,
        labels=model_labels(results),
        adversary=(results.get("config") or {}).get("fairness"),
    )
    results["provenance"] = provenance()
    atomic_write_json(path, results)


def model_labels(results: dict[str, Any]) -> dict[str, str]:
    """Display names of a run's models by key (``federated``, ``popularity``, ``ease``,
    ``centralized``), as the results table names them."""
    warm = results.get("warm_start")
    rounds = (results.get("config") or {}).get("rounds")
    labels = {"federated": "warm start only" if warm and rounds == 0 else "federated"}
    for key in ("popularity", "ease"):
        entry = (results.get("baselines") or {}).get(key)
        if entry:
            labels[key] = str(entry["label"])
    if results.get("reference"):
        labels["centralized"] = str(results["reference"]["label"])
    return labels


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

"""``fedrec deploy local``: a whole fedrec deployment on this machine, end to end, measured.

What an operator and N devices do on separate machines, on 127.0.0.1 (see the README, "Deploy"):

1. the operator prepares the run folder (:mod:`server.deploy.provision`); here each client's rows
   are also exported as a device's history file (``OUT/devices/device-K/history.csv``);
2. a CA and a server certificate for the SuperLink; one authentication key pair per device;
   when the run encrypts in threshold mode, each device's signing key, registered by the
   operator (the key ceremony then runs among the devices inside the run); in single-key mode,
   CKKS keys (the server's folder gets only ``server.ctx``, each device its own ``client.ctx``);
3. ``flower-superlink`` with TLS and ``--enable-supernode-auth``; each device key registered;
4. per device, ``fedrec client join`` (the device's own command) with its history, keys and
   the CA;
5. ``flwr run`` of this repository's app with ``run-dir = OUT/run``, followed to its end.

Every process is stopped when :func:`deploy_loopback` returns or raises (Ctrl-C and SIGTERM
included). :class:`Loopback` exposes the steps for tests, e.g. to kill a device mid-run.
"""

from __future__ import annotations

import csv
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.privacy.signing import (
    DEVICE_KEY_FILE,
    load_or_create_signing_key,
    load_signing_key,
    public_key_hex,
    register_device,
)
from common.processes import interrupts_raise
from common.run.config import RunConfig
from server.deploy.certs import make_ca, make_node_keys, make_server_cert
from server.deploy.deployment import ClosesOnExit, Deployment, RunResult
from server.deploy.provision import Provisioned, prepare_deployment

__all__ = ["APP_DIR", "Loopback", "LoopbackResult", "deploy_loopback"]

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app shipped with ``flwr run`` (this repository: ``pyproject.toml``)."""

_SERVER_KEY_FILES = ("server.ctx", "fingerprint", "params.json")
_DEVICE_KEY_FILES = ("client.ctx", "fingerprint", "params.json")


@dataclass(frozen=True)
class LoopbackResult:
    """How a loopback deployment went, in numbers."""

    run: RunResult
    run_dir: Path
    histories: list[Path]
    """Each device's history file; its ledger and model copy lie next to it."""
    wall_seconds: float
    """From preparing the data to the last process stopped."""
    startup_seconds: float
    """From starting the SuperLink until every device was online."""
    rounds: list[dict[str, str]]
    """``rounds.csv`` of the run, one dict per round."""

    def _mean(self, key: str, per: str | None = None) -> float:
        values = []
        for row in self.rounds:
            if row.get(key) in (None, ""):
                continue
            count = float(row[per]) if per is not None else 1.0
            if count > 0:
                values.append(float(row[key]) / count)
        return sum(values) / len(values) if values else float("nan")

    @property
    def round_seconds(self) -> float:
        """Mean server-side duration of a round (send, train, collect, aggregate, evaluate)."""
        return self._mean("seconds")

    @property
    def bytes_down_per_device(self) -> float:
        """Mean bytes the server sent each invited device in a round's training exchange."""
        return self._mean("bytes_down", per="sampled")

    @property
    def bytes_up_per_device(self) -> float:
        """Mean bytes each device that answered sent back in a round's training exchange."""
        return self._mean("bytes_up", per="returned")


def _copy_keys(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in names:
        if (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
    return dst


class Loopback(ClosesOnExit):
    """A prepared run, a TLS SuperLink and one ``fedrec client join`` device per client.

    Parameters
    ----------
    cfg:
        The run; one device per client of its partition.
    out:
        Folder for everything: ``run/``, ``devices/``, ``certs/``, ``keys/``, ``logs/``.
    cache_dir:
        Data cache (``$FEDREC_DATA``).
    budget:
        Each device's own epsilon budget (``fedrec client join --budget``); None: the run's.
    startup_timeout:
        Seconds for the SuperLink and each device to come up.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        *,
        cache_dir: Path | None = None,
        budget: float | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out).resolve()
        self.cache_dir = cache_dir
        self.budget = budget
        self.run_dir = self.out / "run"
        self.certs = self.out / "certs"
        self.deployment = Deployment(self.out, startup_timeout=startup_timeout)
        self.provisioned: Provisioned | None = None
        self.devices: list[str] = []

    def prepare(self) -> Provisioned:
        """Run folder, device histories, certificates and (if the run encrypts) CKKS keys."""
        self.provisioned = prepare_deployment(
            self.cfg, self.run_dir, cache_dir=self.cache_dir, export_dir=self.out / "devices"
        )
        make_ca(self.certs)
        make_server_cert(self.certs, host=self.deployment.host)
        if self.cfg.encryption.enabled and not self.cfg.encryption.threshold_mode:
            from common.he import ParamSet, init_keys

            authority = self.out / "keys"  # the key authority's copy of everything
            if not (authority / "client.ctx").exists():
                init_keys(authority, params=ParamSet("fedrec").params)
            _copy_keys(authority, self.cfg.encryption.keys_dir(self.run_dir), _SERVER_KEY_FILES)
        return self.provisioned

    def device_command(self, k: int, auth_key: Path) -> list[str]:
        """``fedrec client join`` of device ``k``, as that device would run it."""
        assert self.provisioned is not None, "call prepare() first"
        history = self.provisioned.histories[k]
        cmd = [
            sys.executable, "-m", "simulations.cli", "client", "join",
            "--superlink", self.deployment.address,
            "--data", str(history),
            "--ca", str(self.certs / "ca.crt"),
            "--auth-key", str(auth_key),
        ]  # fmt: skip
        if self.cfg.encryption.threshold_mode:
            # the device's own folder: its signing key now, its key share after the ceremony
            cmd += ["--keys", str(self._device_keys(k))]
        elif self.cfg.encryption.enabled:
            keys = _copy_keys(self.out / "keys", history.parent / "keys", _DEVICE_KEY_FILES)
            cmd += ["--keys", str(keys)]
        if self.budget is not None:
            cmd += ["--budget", repr(self.budget)]
        return cmd

    def _device_keys(self, k: int) -> Path:
        """Device ``k``'s key folder, with its signing key (made once, as the device would)."""
        assert self.provisioned is not None, "call prepare() first"
        folder = self.provisioned.histories[k].parent / "keys"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        load_or_create_signing_key(folder / DEVICE_KEY_FILE)
        return folder

    def start(self) -> float:
        """Start the SuperLink, register every device's key, start the devices; returns the
        seconds until all were online."""
        assert self.provisioned is not None, "call prepare() first"
        start = time.monotonic()
        self.deployment.start_superlink()
        commands = []
        for k in range(self.provisioned.n_clients):
            name = f"device-{k}"
            keys = make_node_keys(self.certs / "nodes", name)
            node_id = self.deployment.register_node(keys.public_key, name=name)
            commands.append((name, self.device_command(k, keys.private_key)))
            if self.cfg.encryption.threshold_mode:  # the operator registers its signing key
                signing = load_signing_key(self._device_keys(k) / DEVICE_KEY_FILE)
                register_device(self.run_dir, node_id % (2**31 - 1), public_key_hex(signing))
        for name, cmd in commands:
            home = self.provisioned.histories[int(name.split("-")[1])].parent
            self.deployment.start_node(name, cmd, home, wait=False)
            self.devices.append(name)
        for name in self.devices:
            self.deployment.wait_online(name)
        return time.monotonic() - start

    def run(self, *, timeout: float = 900.0) -> RunResult:
        """``flwr run`` of the fedrec app on the prepared run folder, followed to its end."""
        run_config = {"run-dir": str(self.run_dir), "config": str(self.run_dir / "config.toml")}
        return self.deployment.run_app(APP_DIR, run_config, timeout=timeout)

    def rounds(self) -> list[dict[str, str]]:
        """``rounds.csv`` of the run so far."""
        path = self.run_dir / "rounds.csv"
        if not path.exists():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def close(self) -> None:
        """Stop every process (devices first, then the SuperLink)."""
        self.deployment.close()


def deploy_loopback(
    cfg: RunConfig,
    out: Path,
    *,
    cache_dir: Path | None = None,
    budget: float | None = None,
    timeout: float = 900.0,
    startup_timeout: float = 120.0,
) -> LoopbackResult:
    """Prepare, start, run and stop a whole deployment on loopback (see module docstring).

    Raises
    ------
    server.deploy.DeployError
        If a step fails; every process is stopped first.
    """
    start = time.monotonic()
    with (
        interrupts_raise(),
        Loopback(
            cfg, out, cache_dir=cache_dir, budget=budget, startup_timeout=startup_timeout
        ) as lb,
    ):
        provisioned = lb.prepare()
        startup = lb.start()
        result = lb.run(timeout=timeout)
    return LoopbackResult(
        run=result,
        run_dir=lb.run_dir,
        histories=provisioned.histories,
        wall_seconds=time.monotonic() - start,
        startup_seconds=startup,
        rounds=lb.rounds(),
    )

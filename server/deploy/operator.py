"""The operator's ``flwr`` CLI against one SuperLink: register device keys, run apps.

In Flower 1.42 the operator talks to the SuperLink's Control API with the ``flwr`` command,
which finds the SuperLink through ``$FLWR_HOME/config.toml``: a connection
(``[superlink.CONNECTION]``) with its ``address`` and the CA (``root-certificates``) that
signed its TLS certificate. :class:`Operator` writes that file and runs:

- ``flwr supernode register NODE.pub CONNECTION``: admit a device's public key
  (the SuperLink runs with ``--enable-supernode-auth``);
- ``flwr run APP CONNECTION --run-config RUN.toml --format json``: ship the app folder as a
  FAB and start a run; ``flwr log RUN_ID CONNECTION --stream`` follows the ServerApp's log
  until the run ends; ``flwr ls CONNECTION --run-id RUN_ID --format json`` gives its status.

``flwr ... --format json`` exits 0 even when the SuperLink refuses a request; the JSON then
says ``"success": false``, which :meth:`Operator.flwr_json` turns into a :class:`DeployError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common.errors import FedrecError
from common.io import atomic_write_bytes, atomic_write_text
from common.processes import flower_bin, flower_env, signal_quietly

__all__ = [
    "CONNECTION",
    "ConfigValue",
    "DeployError",
    "Operator",
    "RunResult",
    "flower_log_tail",
]

logger = logging.getLogger(__name__)

ConfigValue = str | int | float | bool
"""A value of a Flower run or node config (Flower's ``UserConfigValue``)."""

CONNECTION = "fedrec-deploy"
"""Name of the SuperLink connection written to the operator's ``config.toml``."""

_FINISHED = "finished"


class DeployError(FedrecError):
    """A deployment step failed; the message names the step and quotes the process log."""


@dataclass(frozen=True)
class RunResult:
    """How a run launched by :meth:`Operator.run_app` ended."""

    run_id: int
    status: str
    """Flower's run status, e.g. ``finished:completed`` or ``finished:failed``."""
    seconds: float
    """From ``flwr run`` to the end of the run, wall clock."""
    log_path: Path
    """The ServerApp's log as streamed by ``flwr log``."""

    @property
    def completed(self) -> bool:
        """True when Flower reports the run as finished and completed."""
        return self.status == "finished:completed"


def flower_log_tail(path: Path, n_lines: int = 15) -> str:
    """The end of a process log; from Flower's last ``Exit Code:`` report if there is one.

    A SuperNode's SuperExec writes to the same log and may add retry warnings after the
    SuperNode's own exit report, so a plain tail can miss the reason.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    exits = [i for i, line in enumerate(lines) if "Exit Code:" in line]
    if exits:
        return "\n".join(lines[exits[-1] : exits[-1] + 6])
    return "\n".join(lines[-n_lines:])


class Operator:
    """The ``flwr`` CLI of an operator, pointed at one SuperLink over TLS.

    Parameters
    ----------
    home:
        ``$FLWR_HOME`` of the CLI (``config.toml``, the last run's ``run-config.toml``).
    address:
        ``HOST:PORT`` of the SuperLink; HOST must be a name in its certificate.
    ca_cert:
        CA certificate that signed the SuperLink's certificate.
    logs:
        Folder for ``run-RUN_ID.log`` (the ServerApp's log); default ``home/logs``.
    """

    def __init__(
        self, home: Path, *, address: str, ca_cert: Path, logs: Path | None = None
    ) -> None:
        self.home = Path(home).resolve()
        self.address = address
        self.ca_cert = Path(ca_cert).resolve()
        self.logs = Path(logs) if logs is not None else self.home / "logs"
        self.seen_pids: set[int] = set()
        """Processes it started (``flwr log`` streams), for leak checks."""
        self._write_config()

    def _write_config(self) -> None:
        """``$FLWR_HOME/config.toml`` of the operator's ``flwr`` CLI: one TLS connection."""
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": self.address, "root-certificates": str(self.ca_cert)},
            }
        }
        atomic_write_text(self.home / "config.toml", tomli_w.dumps(config))

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the operator's ``flwr`` CLI against this SuperLink; raise on failure if ``check``."""
        cmd = [flower_bin("flwr"), *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=flower_env(self.home),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )
        if check and proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()[-1500:]
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): {out}")
        return proc

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, object]:
        """Run ``flwr ARGS --format json`` and return its JSON; raise unless it succeeded.

        ``flwr run --format json`` exits 0 even when the SuperLink refuses the run; the JSON
        then says ``"success": false`` and carries an ``error-message``.
        """
        proc = self.flwr(*args, "--format", "json", timeout=timeout, check=False)
        try:
            reply = json.loads(proc.stdout)
        except json.JSONDecodeError:
            reply = {}
        if proc.returncode != 0 or not isinstance(reply, dict) or not reply.get("success"):
            detail = reply.get("error-message") if isinstance(reply, dict) else None
            detail = detail or (proc.stdout + proc.stderr).strip()[-1500:]
            raise DeployError(f"`flwr {' '.join(args)}` failed: {detail}")
        return reply

    def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a SuperNode's OpenSSH public key with the SuperLink; returns its node id."""
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION]
        if name is not None:
            args += ["--name", name]
        node_id = int(str(self.flwr_json(*args)["node-id"]))
        logger.info("registered %s as node %d", name or public_key, node_id)
        return node_id

    def run_app(
        self, app_dir: Path, run_config: Mapping[str, ConfigValue], *, timeout: float = 600.0
    ) -> RunResult:
        """Ship ``app_dir`` as a FAB with ``flwr run``, follow its log, return its final status.

        The run is stopped (``flwr stop``) if it has not finished within ``timeout`` seconds,
        and a :class:`DeployError` is raised.
        """
        start = time.monotonic()
        run_toml = self.home / "run-config.toml"
        atomic_write_bytes(run_toml, tomli_w.dumps(dict(run_config)).encode())
        app = str(Path(app_dir).resolve())
        reply = self.flwr_json("run", app, CONNECTION, "--run-config", str(run_toml))
        run_id = int(str(reply["run-id"]))
        logger.info("started run %d from %s", run_id, app)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"run-{run_id}.log"
        status = ""
        with log_path.open("ab") as log:
            stream = subprocess.Popen(
                [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=flower_env(self.home),
                start_new_session=True,
            )
            self.seen_pids.add(stream.pid)
            try:
                deadline = start + timeout
                while (left := deadline - time.monotonic()) > 0:
                    if stream.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            stream.wait(timeout=min(left, 5.0))
                        continue
                    # The stream ends with the run; if it ended early, poll the status
                    status = self.run_status(run_id)
                    if status.startswith(_FINISHED):
                        break
                    time.sleep(min(5.0, left))
            finally:
                if stream.poll() is None:
                    signal_quietly(stream.pid, signal.SIGTERM, group=True)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        stream.wait(timeout=5)
                    signal_quietly(stream.pid, signal.SIGKILL, group=True)
                    stream.wait()
        seconds = time.monotonic() - start
        if not status.startswith(_FINISHED):
            self.flwr("stop", str(run_id), CONNECTION, check=False)
            raise DeployError(
                f"run {run_id} did not finish within {timeout:.0f} s (status {status!r}); "
                f"stopped it. ServerApp log:\n{flower_log_tail(log_path)}"
            )
        logger.info("run %d %s in %.1f s", run_id, status, seconds)
        return RunResult(run_id=run_id, status=status, seconds=seconds, log_path=log_path)

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"]) if isinstance(runs, list) and runs else ""

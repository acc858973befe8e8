"""A networked Flower 1.42 deployment on one machine: TLS SuperLink, authenticated SuperNodes.

(Over 400 lines: one deployment's processes: started, watched, stopped.)

This is the process manager behind the deployment test and the operator's dry run. It drives
Flower's own command-line tools, exactly as an operator would on real machines:

1. ``flower-superlink --ssl-ca-certfile CA --ssl-certfile CRT --ssl-keyfile KEY
   --enable-supernode-auth --host H --port P --disable-runtime-dependency-installation``.
   In 1.42 one HTTPS port serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI)
   and the Runtime API (ServerApp). With ``--enable-supernode-auth`` nodes cannot register
   themselves: the operator registers each node's public key first.
2. ``flwr supernode register NODE.pub CONNECTION`` for every device key (the operator's
   ``flwr`` CLI: :class:`server.deploy.operator.Operator`).
3. ``flower-supernode --superlink H:P --root-certificates CA --auth-supernode-private-key NODE
   --node-config NODE.toml --port RUNTIME_PORT`` per device. The SuperNode runs each ClientApp
   call in a fresh ``flwr-clientapp`` subprocess (``--isolation subprocess``, the default),
   which installs the run's FAB (the app folder as shipped by ``flwr run``) under
   ``$FLWR_HOME/apps/`` and imports it from there; its dependencies (torch, ...) come from the
   environment the SuperNode runs in (runtime dependency installation is off by default).
4. ``flwr run APP CONNECTION --run-config RUN.toml``, followed to its end (``Operator``).

Every process gets its own session; :meth:`Deployment.close` stops each one's process group
and every descendant (the SuperLink starts its ``flower-superexec`` in a session of its own),
so nothing outlives the deployment, on success, error or Ctrl-C.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import tomli_w

from common.io import atomic_write_bytes
from common.processes import (
    flower_bin,
    flower_env,
    free_port,
    interrupts_raise,
    is_alive,
    related_pids,
    stop_tree,
)
from server.deploy.certs import make_ca, make_node_keys, make_server_cert
from server.deploy.operator import ConfigValue, DeployError, Operator, RunResult, flower_log_tail

__all__ = [
    "DeployError",
    "Deployment",
    "RunResult",
    "SuperNodeSpec",
    "deploy_local",
]

logger = logging.getLogger(__name__)

_NODE_ONLINE_MARK = "SuperNode ID:"  # flower-supernode logs this once its key is activated


@dataclass(frozen=True)
class SuperNodeSpec:
    """One device: its authentication key and its node config."""

    name: str
    """A plain name, used for its folder and log file."""
    private_key: Path | None
    """OpenSSH private key (``--auth-supernode-private-key``); None: no node authentication."""
    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    """``context.node_config`` of its ClientApp, e.g. ``{"partition-id": 0}``."""
    insecure: bool = False
    """Connect without TLS (only to show that a TLS SuperLink refuses it)."""
    root_certificates: Path | None = None
    """CA the node trusts for the SuperLink's certificate; default: the deployment's CA."""
    max_retries: int | None = None
    """Give up connecting after this many retries (Flower's default: never)."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0
    """Size of the log when the process started (logs are appended to across restarts)."""
    started: float = field(default_factory=time.monotonic)

    def log_text(self) -> str:
        """What this process wrote to its log."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")


class ClosesOnExit:
    """A ``with`` block calls :meth:`close` on the way out, on success, error or Ctrl-C."""

    def close(self) -> None:
        """Stop what the object started."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Deployment(ClosesOnExit):
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, on this machine.

    Use it as a context manager: leaving the block stops every process it started.

    Parameters
    ----------
    work_dir:
        Folder for certificates, Flower homes and logs (``logs/*.log``). Created if needed.
    host:
        Address the SuperLink binds and the nodes dial; it must be in the server
        certificate's names (see :func:`server.deploy.certs.make_server_cert`).
    port:
        SuperLink port (Fleet, Control and Runtime APIs); default: a free port.
    ca_cert, server_cert, server_key:
        TLS files of the SuperLink; default ``work_dir/certs/{ca.crt,server.crt,server.key}``.
    startup_timeout:
        Seconds to wait for the SuperLink to answer and for each SuperNode to come online.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ca_cert: Path | None = None,
        server_cert: Path | None = None,
        server_key: Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {startup_timeout}")
        self.work_dir = Path(work_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        certs = self.work_dir / "certs"
        self.ca_cert = Path(ca_cert or certs / "ca.crt").resolve()
        self.server_cert = Path(server_cert or certs / "server.crt").resolve()
        self.server_key = Path(server_key or certs / "server.key").resolve()
        self.startup_timeout = startup_timeout
        self.logs = self.work_dir / "logs"
        self._children: list[_Child] = []
        self._seen_pids: set[int] = set()
        self.operator = Operator(
            self.work_dir / "operator", address=self.address, ca_cert=self.ca_cert, logs=self.logs
        )
        """The operator's ``flwr`` CLI against this SuperLink."""

    # ----------------------------------------------------------------------------- plumbing

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, cmd: Sequence[str], flwr_home: Path) -> _Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        logger.debug("starting %s: %s", name, " ".join(cmd))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=flwr_home,
                env=flower_env(flwr_home),
                start_new_session=True,
            )
        child = _Child(name, proc, log_path, offset)
        self._children.append(child)
        self._seen_pids.add(proc.pid)
        return child

    # ---------------------------------------------------------------------------- SuperLink

    def start_superlink(self) -> float:
        """Start ``flower-superlink`` with TLS and node authentication; wait until it answers.

        Returns
        -------
        float
            Seconds from start until ``GET /health`` succeeded over TLS (checked against
            the CA, so a wrong certificate fails here).
        """
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise DeployError(f"{path}: missing TLS file (see server.deploy.certs)")
        cmd = [
            flower_bin("flower-superlink"),
            "--ssl-ca-certfile", str(self.ca_cert),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
            "--enable-supernode-auth",
            "--host", self.host,
            "--port", str(self.port),
            "--database", str(self.work_dir / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        start = time.monotonic()
        child = self._spawn("superlink", cmd, self.work_dir / "superlink")
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        deadline = start + self.startup_timeout
        last_error = ""
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise DeployError(
                    f"flower-superlink exited with {child.proc.returncode}:\n"
                    f"{flower_log_tail(child.log_path)}"
                )
            conn = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    elapsed = time.monotonic() - start
                    logger.info("SuperLink up on https://%s in %.1f s", self.address, elapsed)
                    return elapsed
            except ssl.SSLError as err:
                raise DeployError(f"TLS to the SuperLink failed: {err}") from err
            except OSError as err:
                last_error = str(err)
            finally:
                conn.close()
            time.sleep(0.2)
        raise DeployError(
            f"SuperLink did not answer on {self.address} within {self.startup_timeout:.0f} s "
            f"({last_error}):\n{flower_log_tail(child.log_path)}"
        )

    def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink (:meth:`Operator.register_node`)."""
        return self.operator.register_node(public_key, name=name)

    # ---------------------------------------------------------------------------- SuperNodes

    def start_supernode(self, spec: SuperNodeSpec, *, wait: bool = True) -> float:
        """Start one ``flower-supernode`` from ``spec``; returns, raises as :meth:`start_node`."""
        home = self.work_dir / "nodes" / spec.name
        home.mkdir(parents=True, exist_ok=True)
        node_config = home / "node-config.toml"
        # A TOML file avoids quoting `key="value"` pairs on a command line
        atomic_write_bytes(node_config, tomli_w.dumps(dict(spec.node_config)).encode())
        cmd = [flower_bin("flower-supernode"), "--superlink", self.address]
        if spec.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(Path(spec.root_certificates or self.ca_cert))]
        if spec.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(spec.private_key).resolve())]
        if spec.node_config:
            cmd += ["--node-config", str(node_config)]
        if spec.max_retries is not None:
            cmd += ["--max-retries", str(spec.max_retries)]
        # Each SuperNode serves its own Runtime API (for its ClientApp processes) on loopback
        cmd += ["--port", str(free_port("127.0.0.1"))]
        return self.start_node(f"supernode-{spec.name}", cmd, home / "flwr-home", wait=wait)

    def start_node(
        self, name: str, cmd: Sequence[str], flwr_home: Path, *, wait: bool = True
    ) -> float:
        """Start a process that runs a SuperNode (``flower-supernode`` or ``fedrec client
        join``); with ``wait``, return once its log shows that the SuperLink accepted it.

        Returns
        -------
        float
            Seconds until the node logged its node id (0.0 when not waiting).

        Raises
        ------
        DeployError
            If the node exits before it comes online (refused key, plaintext to a TLS
            SuperLink, ...) or does not come online in time; the message quotes its log.
        """
        self._spawn(name, cmd, flwr_home)
        return self.wait_online(name) if wait else 0.0

    def wait_online(self, name: str) -> float:
        """Wait until node process ``name`` logs its node id; seconds since it started.

        Raises
        ------
        DeployError
            If it exits first or is not online within the startup timeout.
        """
        child = next(c for c in self._children if c.name == name)
        start = child.started
        deadline = start + self.startup_timeout
        while time.monotonic() < deadline:
            if _NODE_ONLINE_MARK in child.log_text():
                elapsed = time.monotonic() - start
                logger.info("%s online in %.1f s", name, elapsed)
                return elapsed
            if child.proc.poll() is not None:
                log = flower_log_tail(child.log_path)
                raise DeployError(f"{name} exited with {child.proc.returncode}:\n{log}")
            time.sleep(0.2)
        log = flower_log_tail(child.log_path)
        raise DeployError(f"{name} not online within {self.startup_timeout:.0f} s:\n{log}")

    # ---------------------------------------------------------------------------------- runs

    def run_app(
        self, app_dir: Path, run_config: Mapping[str, ConfigValue], *, timeout: float = 600.0
    ) -> RunResult:
        """Ship ``app_dir`` with ``flwr run`` and follow the run (:meth:`Operator.run_app`)."""
        return self.operator.run_app(app_dir, run_config, timeout=timeout)

    # ------------------------------------------------------------------------------ shutdown

    def pids(self) -> set[int]:
        """Every process id this deployment started or saw under its processes."""
        for child in self._children:
            self._seen_pids.update(related_pids(child.proc.pid))
        return self._seen_pids | self.operator.seen_pids

    def alive_pids(self) -> set[int]:
        """The processes of :meth:`pids` still running."""
        return {pid for pid in self.pids() if is_alive(pid)}

    def stop(self, name: str, *, grace: float = 5.0, kill: bool = False) -> None:
        """Stop one started process (``superlink`` or ``supernode-NAME``) and its descendants.

        With ``kill``, SIGKILL at once: the process vanishes as a crashed device or a lost
        machine does, without deactivating its node at the SuperLink.
        """
        for child in [c for c in self._children if c.name == name]:
            self._seen_pids.update(stop_tree(child.proc, grace=0.0 if kill else grace))
            self._children.remove(child)

    def close(self, grace: float = 5.0) -> None:
        """Stop SuperNodes, then the SuperLink: SIGTERM to each process group and descendant,
        SIGKILL after ``grace`` seconds to what is left."""
        # SuperNodes first, so that they deactivate themselves while the SuperLink is up
        for child in sorted(self._children, key=lambda c: c.name == "superlink"):
            self._seen_pids.update(stop_tree(child.proc, grace=grace))
        self._children.clear()


def deploy_local(
    app_dir: Path,
    run_config: Mapping[str, ConfigValue],
    *,
    work_dir: Path,
    node_configs: Sequence[Mapping[str, ConfigValue]],
    host: str = "127.0.0.1",
    timeout: float = 600.0,
) -> RunResult:
    """Certificates, a TLS SuperLink, one authenticated SuperNode per node config, one run.

    Everything is stopped before this returns or raises (Ctrl-C and SIGTERM included).

    Parameters
    ----------
    app_dir:
        Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``), shipped as a FAB.
    run_config:
        ``--run-config`` of the run.
    work_dir:
        Folder for certificates, keys, Flower homes and logs.
    node_configs:
        One node config per SuperNode, e.g. ``[{"partition-id": 0}, {"partition-id": 1}]``.
    host:
        SuperLink address; put in the server certificate.
    timeout:
        Seconds the run may take before it is stopped.
    """
    if not node_configs:
        raise ValueError("node_configs must name at least one SuperNode")
    work_dir = Path(work_dir).resolve()
    certs = work_dir / "certs"
    make_ca(certs)
    make_server_cert(certs, host=host)
    with (
        interrupts_raise(),
        Deployment(work_dir, host=host) as deployment,
    ):
        deployment.start_superlink()
        specs = []
        for i, node_config in enumerate(node_configs):
            keys = make_node_keys(certs / "nodes", f"node-{i}")
            deployment.register_node(keys.public_key, name=f"node-{i}")
            specs.append(SuperNodeSpec(f"node-{i}", keys.private_key, node_config))
        for spec in specs:
            deployment.start_supernode(spec)
        return deployment.run_app(app_dir, run_config, timeout=timeout)

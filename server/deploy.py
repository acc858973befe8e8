"""A networked Flower 1.42 deployment on one machine: TLS SuperLink, authenticated SuperNodes.

This is the process manager behind the deployment test and the operator's dry run. It drives
Flower's own command-line tools, exactly as an operator would on real machines:

1. ``flower-superlink --ssl-ca-certfile CA --ssl-certfile CRT --ssl-keyfile KEY
   --enable-supernode-auth --host H --port P --disable-runtime-dependency-installation``.
   In 1.42 one HTTPS port serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI)
   and the Runtime API (ServerApp). With ``--enable-supernode-auth`` nodes cannot register
   themselves: the operator registers each node's public key first.
2. ``flwr supernode register NODE.pub CONNECTION`` for every device key. The CLI finds the
   SuperLink through ``$FLWR_HOME/config.toml`` (``[superlink.CONNECTION]`` with ``address``
   and ``root-certificates``).
3. ``flower-supernode --superlink H:P --root-certificates CA --auth-supernode-private-key NODE
   --node-config NODE.toml --port RUNTIME_PORT`` per device. The SuperNode runs each ClientApp
   call in a fresh ``flwr-clientapp`` subprocess (``--isolation subprocess``, the default),
   which installs the run's FAB (the app folder as shipped by ``flwr run``) under
   ``$FLWR_HOME/apps/`` and imports it from there; its dependencies (torch, ...) come from the
   environment the SuperNode runs in (runtime dependency installation is off by default).
4. ``flwr run APP CONNECTION --run-config RUN.toml --format json``; ``flwr log RUN_ID
   CONNECTION --stream`` follows the ServerApp's log and returns when the run ends;
   ``flwr ls CONNECTION --run-id RUN_ID --format json`` gives its final status.

Every process gets its own session; :meth:`Deployment.close` stops each one's process group
and every descendant (the SuperLink starts its ``flower-superexec`` in a session of its own),
so nothing outlives the deployment, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import tomli_w

from common.deploy_certs import make_ca, make_node_keys, make_server_cert
from common.errors import FedrecError
from common.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "DeployError",
    "Deployment",
    "RunResult",
    "SuperNodeSpec",
    "deploy_local",
    "free_port",
    "main",
]

logger = logging.getLogger(__name__)

ConfigValue = str | int | float | bool
"""A value of a Flower run or node config (Flower's ``UserConfigValue``)."""

CONNECTION = "fedrec-deploy"
"""Name of the SuperLink connection written to the operator's ``config.toml``."""

_FINISHED = "finished"
_NODE_ONLINE_MARK = "SuperNode ID:"  # flower-supernode logs this once its key is activated


class DeployError(FedrecError):
    """A deployment step failed; the message names the step and quotes the process log."""


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


@dataclass(frozen=True)
class RunResult:
    """How a run launched by :meth:`Deployment.run_app` ended."""

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


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n_lines: int = 15) -> str:
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


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group id) of every process, from /proc (Linux)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()  # state, ppid, pgrp, ...
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _related(pid: int) -> list[int]:
    """``pid``, the members of its process group and all their descendants.

    The group matters once the leader has exited: its children (a SuperNode's SuperExec)
    are re-parented to init but stay in the group.
    """
    table = _proc_table()
    found = {pid} | {p for p, (_, pgid) in table.items() if pgid == pid}
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    return True


def _wait_gone(proc: subprocess.Popen[bytes], pids: Sequence[int], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for all ``pids`` to exit (reaping ``proc``)."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        if not any(_alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _signal_quietly(pid: int, sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


class Deployment:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, on this machine.

    Use it as a context manager: leaving the block stops every process it started.

    Parameters
    ----------
    work_dir:
        Folder for certificates, Flower homes and logs (``logs/*.log``). Created if needed.
    host:
        Address the SuperLink binds and the nodes dial; it must be in the server
        certificate's names (see :func:`common.deploy_certs.make_server_cert`).
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
        self.operator_home = self.work_dir / "operator"
        self._children: list[_Child] = []
        self._seen_pids: set[int] = set()
        self._write_operator_config()

    # ----------------------------------------------------------------------------- plumbing

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink."""
        return f"{self.host}:{self.port}"

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        env["FLWR_HOME"] = str(flwr_home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env.pop("PYTHONPATH", None)  # as on a device: the app comes from its FAB
        return env

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _write_operator_config(self) -> None:
        """``$FLWR_HOME/config.toml`` of the operator's ``flwr`` CLI: one TLS connection."""
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": self.address, "root-certificates": str(self.ca_cert)},
            }
        }
        atomic_write_text(self.operator_home / "config.toml", tomli_w.dumps(config))

    def _spawn(self, name: str, cmd: Sequence[str], flwr_home: Path) -> _Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        logger.debug("starting %s: %s", name, " ".join(cmd))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=flwr_home,
                env=self._env(flwr_home),
                start_new_session=True,
            )
        child = _Child(name, proc, log_path)
        self._children.append(child)
        self._seen_pids.add(proc.pid)
        return child

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the operator's ``flwr`` CLI against this SuperLink; raise on failure if ``check``."""
        cmd = [self._bin("flwr"), *args]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(self.operator_home),
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
                raise DeployError(f"{path}: missing TLS file (see common.deploy_certs)")
        cmd = [
            self._bin("flower-superlink"),
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
                    f"{_tail(child.log_path)}"
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
            f"({last_error}):\n{_tail(child.log_path)}"
        )

    def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        """Register a SuperNode's OpenSSH public key with the SuperLink; returns its node id."""
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION]
        if name is not None:
            args += ["--name", name]
        node_id = int(str(self.flwr_json(*args)["node-id"]))
        logger.info("registered %s as node %d", name or public_key, node_id)
        return node_id

    # ---------------------------------------------------------------------------- SuperNodes

    def start_supernode(self, spec: SuperNodeSpec, *, wait: bool = True) -> float:
        """Start one ``flower-supernode``; with ``wait``, return once the SuperLink accepted it.

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
        home = self.work_dir / "nodes" / spec.name
        home.mkdir(parents=True, exist_ok=True)
        node_config = home / "node-config.toml"
        # A TOML file avoids quoting `key="value"` pairs on a command line
        atomic_write_bytes(node_config, tomli_w.dumps(dict(spec.node_config)).encode())
        cmd = [self._bin("flower-supernode"), "--superlink", self.address]
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
        start = time.monotonic()
        child = self._spawn(f"supernode-{spec.name}", cmd, home / "flwr-home")
        if not wait:
            return 0.0
        deadline = start + self.startup_timeout
        while time.monotonic() < deadline:
            if _NODE_ONLINE_MARK in child.log_path.read_text(errors="replace"):
                elapsed = time.monotonic() - start
                logger.info("SuperNode %s online in %.1f s", spec.name, elapsed)
                return elapsed
            if child.proc.poll() is not None:
                raise DeployError(
                    f"SuperNode {spec.name} exited with {child.proc.returncode}:\n"
                    f"{_tail(child.log_path)}"
                )
            time.sleep(0.2)
        raise DeployError(
            f"SuperNode {spec.name} not online within {self.startup_timeout:.0f} s:\n"
            f"{_tail(child.log_path)}"
        )

    # ---------------------------------------------------------------------------------- runs

    def run_app(
        self, app_dir: Path, run_config: Mapping[str, ConfigValue], *, timeout: float = 600.0
    ) -> RunResult:
        """Ship ``app_dir`` as a FAB with ``flwr run``, follow its log, return its final status.

        The run is stopped (``flwr stop``) if it has not finished within ``timeout`` seconds,
        and a :class:`DeployError` is raised.
        """
        start = time.monotonic()
        run_toml = self.work_dir / "run-config.toml"
        atomic_write_bytes(run_toml, tomli_w.dumps(dict(run_config)).encode())
        app = str(Path(app_dir).resolve())
        reply = self.flwr_json("run", app, CONNECTION, "--run-config", str(run_toml))
        run_id = int(str(reply["run-id"]))
        logger.info("started run %d from %s", run_id, app)
        log_path = self.logs / f"run-{run_id}.log"
        status = ""
        with log_path.open("ab") as log:
            stream = subprocess.Popen(
                [self._bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(self.operator_home),
                start_new_session=True,
            )
            self._seen_pids.add(stream.pid)
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
                    _signal_quietly(stream.pid, signal.SIGTERM, group=True)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        stream.wait(timeout=5)
                    _signal_quietly(stream.pid, signal.SIGKILL, group=True)
                    stream.wait()
        seconds = time.monotonic() - start
        if not status.startswith(_FINISHED):
            self.flwr("stop", str(run_id), CONNECTION, check=False)
            raise DeployError(
                f"run {run_id} did not finish within {timeout:.0f} s (status {status!r}); "
                f"stopped it. ServerApp log:\n{_tail(log_path)}"
            )
        logger.info("run %d %s in %.1f s", run_id, status, seconds)
        return RunResult(run_id=run_id, status=status, seconds=seconds, log_path=log_path)

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"]) if isinstance(runs, list) and runs else ""

    # ------------------------------------------------------------------------------ shutdown

    def pids(self) -> set[int]:
        """Every process id this deployment started or saw under its processes."""
        for child in self._children:
            self._seen_pids.update(_related(child.proc.pid))
        return set(self._seen_pids)

    def alive_pids(self) -> set[int]:
        """The processes of :meth:`pids` still running."""
        return {pid for pid in self.pids() if _alive(pid)}

    def close(self, grace: float = 5.0) -> None:
        """Stop SuperNodes, then the SuperLink: SIGTERM to each process group and descendant,
        SIGKILL after ``grace`` seconds to what is left."""
        own_group = os.getpgrp()
        # SuperNodes first, so that they deactivate themselves while the SuperLink is up
        for child in sorted(self._children, key=lambda c: c.name == "superlink"):
            targets = _related(child.proc.pid)
            self._seen_pids.update(targets)
            groups = {child.proc.pid}  # the session leader's group outlives the leader
            for pid in targets:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    groups.add(os.getpgid(pid))
            groups.discard(own_group)
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
                for group in groups:
                    _signal_quietly(group, sig, group=True)
                for pid in targets:
                    _signal_quietly(pid, sig, group=False)
                if _wait_gone(child.proc, targets, wait):
                    break
        self._children.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def _interrupts_raise() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM SystemExit, so ``finally`` blocks run."""
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


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
        _interrupts_raise(),
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


def _parse_value(text: str) -> ConfigValue:
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            return parse(text)
    if text in ("true", "false"):
        return text == "true"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m server.deploy``: a loopback deployment of the fedrec app (or another app)."""
    parser = argparse.ArgumentParser(
        description="Run a Flower app on a loopback deployment: TLS SuperLink, authenticated "
        "SuperNodes; everything is stopped at the end."
    )
    parser.add_argument(
        "--app",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="Flower app folder shipped as the FAB (default: this repository)",
    )
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, partition-id 0..N-1")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument(
        "--run-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="run config; keys must be declared in the app's [tool.flwr.app.config]",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_config = {
        key: _parse_value(value)
        for key, _, value in (item.partition("=") for item in args.run_config)
    }
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fedrec-deploy-"))
    try:
        result = deploy_local(
            args.app,
            run_config,
            work_dir=work_dir,
            node_configs=[{"partition-id": i} for i in range(args.nodes)],
            timeout=args.timeout,
        )
    except FedrecError as err:
        logger.error("%s", err)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: every process was stopped; logs in %s", work_dir / "logs")
        return 130
    logger.info("run %d: %s; logs in %s", result.run_id, result.status, work_dir / "logs")
    return 0 if result.completed else 1


if __name__ == "__main__":
    raise SystemExit(main())

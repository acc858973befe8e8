"""Starting Flower's processes and stopping them with everything they started.

Flower 1.42 processes start others by name: ``flower-superlink`` and ``flower-supernode`` each
start a ``flower-superexec`` (in a session of its own), which starts one ``flwr-serverapp`` per
run or one ``flwr-clientapp`` per message. Stopping the parent does not stop them, so fedrec
starts each Flower process in a new session and, to stop it, signals its process group and
every descendant found in ``/proc`` (Linux): SIGTERM first, SIGKILL after a grace period.

Used by the loopback deployment (:mod:`server.deploy.deployment`) and by a device joining a
federation (:mod:`client.join`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "SUPEREXEC_POLL_SECONDS",
    "flower_bin",
    "flower_env",
    "free_port",
    "interrupts_raise",
    "is_alive",
    "related_pids",
    "signal_quietly",
    "stop_tree",
    "wait_gone",
]

SUPEREXEC_POLL_SECONDS = 0.1
"""How often a SuperExec asks its SuperLink or SuperNode for a task to launch (a ServerApp
run, a ClientApp message). Flower's default is 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
on the node's own loopback API a shorter poll costs nothing and saves up to 1 s per message."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower command installed next to this Python (``flwr``, ``flower-supernode``)."""
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment of a Flower process whose state lives in ``flwr_home`` (``FLWR_HOME``).

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name, so
    this Python's ``bin`` folder goes first on ``PATH``. Telemetry, update checks and runtime
    dependency installation are off (a device runs the app with what is installed);
    ``PYTHONPATH`` is dropped so that the app is imported from its FAB, as on a device.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_SECONDS))
    env.pop("PYTHONPATH", None)
    return env


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


def related_pids(pid: int) -> list[int]:
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


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2] != "Z"
    return True


def wait_gone(proc: subprocess.Popen[bytes], pids: Sequence[int], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for all ``pids`` to exit (reaping ``proc``)."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        if not any(is_alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def signal_quietly(pid: int, sig: signal.Signals, *, group: bool) -> None:
    """Send ``sig`` to a process (or its group), ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_tree(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> list[int]:
    """Stop ``proc`` (started with ``start_new_session=True``), its group and descendants.

    SIGTERM to every process group involved and to each process, SIGKILL to what is left
    after ``grace`` seconds. The caller's own process group is never signalled.

    Returns
    -------
    list[int]
        The process ids that were found and signalled.
    """
    targets = related_pids(proc.pid)
    groups = {proc.pid}  # the session leader's group outlives the leader
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    groups.discard(os.getpgrp())
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        for group in groups:
            signal_quietly(group, sig, group=True)
        for pid in targets:
            signal_quietly(pid, sig, group=False)
        if wait_gone(proc, targets, wait):
            break
    return targets


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM SystemExit, so ``finally`` blocks run."""
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)

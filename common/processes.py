"""Starting Flower's processes and stopping them with everything they started.

Flower 1.42 processes start others by name: ``flower-superlink`` and ``flower-supernode`` each
start a ``flower-superexec`` (in a session of its own), which starts one ``flwr-serverapp`` per
run or one ``flwr-clientapp`` per message. Stopping the parent does not stop them, so fedrec
starts each Flower process in a new session and, to stop it, signals its process group and
every descendant found in ``/proc`` (Linux): SIGTERM first, SIGKILL after a grace period.

Used by the loopback deployment (:mod:`server.deploy.deployment`) and by a device joining a
federation (:mod:`client.join`).

The other direction, a child that must not outlive its parent (``fedrec simulate``'s worker,
:mod:`simulations.worker`), is :func:`die_with_parent`: on Linux the kernel sends the child
SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), and on every platform a watchdog
thread polls the parent pid; either way the child then stops its whole process group
(:func:`stop_own_group`), which holds everything it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = [
    "SUPEREXEC_POLL_SECONDS",
    "boot_id",
    "die_with_parent",
    "flower_bin",
    "flower_env",
    "free_port",
    "group_alive",
    "interrupts_raise",
    "is_alive",
    "related_pids",
    "set_parent_death_signal",
    "signal_quietly",
    "start_time",
    "stop_group",
    "stop_own_group",
    "stop_tree",
    "wait_gone",
]

logger = logging.getLogger(__name__)

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
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP (a closed terminal) SystemExit with
    exit code 128 + the signal number, so ``finally`` blocks run.

    A SIGHUP that was ignored on entry (``nohup fedrec ...``) stays ignored: the user asked the
    command to outlive its terminal.
    """
    hup = getattr(signal, "SIGHUP", None)
    exits = [signal.SIGTERM]
    if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
        exits.append(hup)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old = {sig: signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum)) for sig in exits}
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------- a child that dies with us

PR_SET_PDEATHSIG = 1
"""``prctl`` option (``<linux/prctl.h>``): the signal a process gets when its parent dies."""


def set_parent_death_signal(sig: signal.Signals) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    The signal comes when the parent *thread* that started this process exits, so the parent
    must start it from a thread that lives as long as the parent (its main thread). The setting
    survives ``exec`` but is cleared in children, and it does not fire if the parent died
    before the call: check ``os.getppid()`` after it.

    Returns
    -------
    bool
        Whether the kernel took the setting (``False`` on other platforms).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def boot_id() -> str | None:
    """This host's boot id (Linux), which tells a pid of this boot from one of an earlier boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux; ``None`` elsewhere or if gone).

    With the pid it names one process of one boot: a later process that reuses the pid has
    another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])  # field 22, starttime


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return any(
        pg == pgid and is_alive(pid) for pid, (_, pg) in _proc_table().items()
    )  # a group of zombies only is gone


def stop_group(pgid: int, *, grace: float = 5.0, kill_wait: float = 5.0) -> bool:
    """SIGTERM process group ``pgid``, SIGKILL it after ``grace`` seconds, wait until it is gone.

    Never signals the caller's own group. Returns whether the group is gone.
    """
    if pgid == os.getpgrp():
        raise ValueError(f"refusing to stop this process's own group {pgid}")
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        signal_quietly(pgid, sig, group=True)
        deadline = time.monotonic() + wait
        while group_alive(pgid):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        else:
            return True
    return not group_alive(pgid)


def _group_members(pgid: int) -> list[int]:
    """The pids in process group ``pgid``: from ``/proc`` on Linux, else from ``ps`` (POSIX)."""
    if Path("/proc").is_dir():
        return [p for p, (_, pg) in _proc_table().items() if pg == pgid]
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,pgid="], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split() for line in out.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 2 and r[1] == str(pgid)]


def stop_own_group(*, grace: float = 3.0, code: int = 128 + signal.SIGTERM) -> NoReturn:
    """Stop this process and the process group it leads (everything it started), then exit.

    SIGTERM to each other member of the group, up to ``grace`` seconds for them to exit, then
    SIGKILL to the whole group, this process included. A process that does not lead its group
    (started by hand in a shell's group) exits alone: the group is not its own.
    """
    me = os.getpid()
    if os.getpgrp() != me:
        os._exit(code)
    others = [pid for pid in _group_members(me) if pid != me]
    for pid in others:
        signal_quietly(pid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + grace
    while any(is_alive(p) for p in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_quietly(me, signal.SIGKILL, group=True)
    os._exit(code)  # not reached: SIGKILL above


def die_with_parent(parent: int, *, poll: float = 0.25, pdeathsig: bool = True) -> None:
    """Make this process and its process group stop when process ``parent`` is gone.

    Call it first thing in a child started in its own session by ``parent`` (for
    ``fedrec simulate``'s worker, from :mod:`simulations.worker`). Three mechanisms, any of
    which suffices:

    - on Linux (``pdeathsig``), the kernel sends SIGTERM when the parent dies (even by
      SIGKILL), and this process's SIGTERM and SIGHUP handlers wake the watchdog;
    - a daemon watchdog thread polls ``os.getppid()`` every ``poll`` seconds: a child whose
      parent has died is re-parented (to init or a subreaper), on every POSIX platform;
    - a parent that died before this call is noticed at once.

    The watchdog then stops the whole group (:func:`stop_own_group`). Without ``pdeathsig``
    (the parent started this process from a thread that may exit before it does) only the
    watchdog runs. SIGTERM or SIGHUP from anyone else stops the group too. Must be called
    from the main thread (it installs signal handlers).
    """
    if pdeathsig:
        set_parent_death_signal(signal.SIGTERM)
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        wake.set()

    for sig in (signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
        signal.signal(sig, on_signal)

    def watch() -> None:
        while not wake.wait(poll) and os.getppid() == parent:
            pass
        if os.getppid() != parent:
            logger.error("parent process %d is gone: stopping this process group", parent)
        else:
            logger.warning("stopped by a signal: stopping this process group")
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        stop_own_group()

    if os.getppid() != parent:  # died before the kernel could be told
        logger.error("parent process %d is gone already: stopping", parent)
        stop_own_group()
    threading.Thread(target=watch, name="fedrec-parent-watchdog", daemon=True).start()

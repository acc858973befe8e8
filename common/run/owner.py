"""Who owns a run folder (:class:`RunLock`) and which run it holds (:func:`config_hash`).

A run folder has one writer at a time. ``fedrec simulate`` takes ``RUN_DIR/.lock`` before it
writes anything there and keeps it for the command's whole life; its worker process inherits
the lock's file descriptor, so the lock stays taken as long as either of them lives. The lock
is an ``flock`` on that open file: the kernel drops it when the last holder exits, however it
exits, which makes telling a live owner from a dead one exact on one host (and on network file
systems whose client maps ``flock`` to byte-range locks, as Linux's NFS does). The file names
the owner (pid, host, start time, command and, once started, the worker's pid) for the message
that refuses a second command, and a file whose lock is free is what a dead owner left behind:
the next command takes it over with a warning, after stopping what is left of the dead run's
process group.

:func:`config_hash` is the SHA-256 of a config's canonical TOML (the text of
``RUN_DIR/config.toml``); the server state and the ledger header carry it, so a folder holding
another run's state is never mistaken for the run being started or resumed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import to_toml
from common.errors import FedrecError
from common.processes import boot_id, group_alive, is_alive, start_time, stop_group

if TYPE_CHECKING:
    from common.run.config import RunConfig

__all__ = ["LOCK_FILE", "LockInfo", "RunInUseError", "RunLock", "config_hash"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock's name in the run folder."""

LOCK_DIR_MODE = 0o700
"""Mode of a run folder the lock creates: owner-only, as :data:`common.run.folder.RUN_DIR_MODE`."""
LOCK_FILE_MODE = 0o600
"""Mode of the lock file (only its owner's commands open it)."""

ORPHAN_WAIT_SECONDS = 20.0
"""How long :meth:`RunLock.acquire` waits for a lock held only by the worker of a command that
has died: such a worker notices within a second and stops its process group within seconds."""


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 (hex) of ``cfg``'s canonical TOML, the text ``RUN_DIR/config.toml`` holds."""
    return hashlib.sha256(to_toml(cfg).encode()).hexdigest()


class RunInUseError(FedrecError):
    """The run folder is locked by a command or worker that is still alive."""


@dataclass(frozen=True)
class LockInfo:
    """What the lock file says about its owner.

    Attributes
    ----------
    pid:
        The owning command's process id.
    host:
        The host it runs on.
    started:
        When it took the lock (seconds since the epoch).
    command:
        Its command line.
    boot:
        The host's boot id when known, so a pid of an earlier boot is not taken for a live one.
    worker:
        The pid of its worker process, which leads the process group of everything the run
        started; ``None`` until the worker starts.
    worker_started:
        The worker's start time (:func:`common.processes.start_time`), when known.
    """

    pid: int
    host: str
    started: float
    command: str
    boot: str | None = None
    worker: int | None = None
    worker_started: int | None = None

    @classmethod
    def of_this_process(cls) -> LockInfo:
        """The info of a lock taken by this process now."""
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.time(),
            command=" ".join(sys.argv)[:1000],
            boot=boot_id(),
        )

    @classmethod
    def parse(cls, text: str) -> LockInfo | None:
        """The info in a lock file's text, ``None`` if it is empty or not a lock record."""
        try:
            raw: Any = json.loads(text)
            return cls(
                pid=int(raw["pid"]),
                host=str(raw["host"]),
                started=float(raw["started"]),
                command=str(raw.get("command", "")),
                boot=raw.get("boot"),
                worker=None if raw.get("worker") is None else int(raw["worker"]),
                worker_started=(
                    None if raw.get("worker_started") is None else int(raw["worker_started"])
                ),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def local(self) -> bool:
        """Whether the owner ran on this host during this boot (its pids mean something here)."""
        if self.host != socket.gethostname():
            return False
        here = boot_id()
        return self.boot is None or here is None or self.boot == here

    def since(self) -> str:
        """The start time, local and to the second (``2025-01-31 12:00:00``)."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))


def _read_fd(fd: int) -> str:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)
        offset += len(chunk)


def _write_fd(fd: int, text: str) -> None:
    data = text.encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _release(fd: int, path: Path, created_dir: bool) -> None:
    """Close this holder's descriptor; remove the file if nobody else holds the lock.

    The worker shares the lock through its inherited descriptor: while it lives the lock stays
    taken and the file stays. Otherwise the file is removed while locked (another command that
    opened it meanwhile sees that its file is no longer the one at ``path`` and starts over),
    and so is the folder if the lock created it and nothing else was written there.
    """
    with contextlib.suppress(OSError):
        os.close(fd)
    try:
        probe = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not (_try_flock(probe) and _same_file(probe, path)):
            return
        path.unlink(missing_ok=True)
    except OSError:
        return
    finally:
        os.close(probe)
    if created_dir:
        with contextlib.suppress(OSError):  # not empty: the run wrote something
            path.parent.rmdir()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class RunLock:
    """The exclusive lock of one run folder, held until :meth:`release` (or the holder's exit).

    Take it with :meth:`acquire`. A child process that must count as a holder gets
    :meth:`fileno` in ``pass_fds``; it then keeps the lock taken for as long as it lives, even
    if this process dies first.
    """

    def __init__(self, path: Path, fd: int, info: LockInfo, *, created_dir: bool = False) -> None:
        self.path = path
        self.info = info
        self._fd = fd
        self._finalizer = weakref.finalize(self, _release, fd, path, created_dir)

    @classmethod
    def acquire(cls, run_dir: Path, *, orphan_wait: float = ORPHAN_WAIT_SECONDS) -> RunLock:
        """Take the lock of ``run_dir`` (created if missing), or refuse.

        A lock held by a live command is refused at once. A lock held only by the worker of a
        command that has died (on this host) is waited for, up to ``orphan_wait`` seconds: the
        worker stops itself when its parent is gone. A lock file whose lock is free was left by
        an owner that died: it is taken over with a warning, after what is left of that run's
        process group (Ray's processes) has been stopped, so two runs never write the folder
        at the same time.

        Raises
        ------
        RunInUseError
            ``RUN is in use by pid P on HOST since T``, when the lock is held.
        FedrecError
            When a dead run's processes cannot be stopped.
        """
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        created_dir = False
        first_refused: float | None = None
        warned = False
        while True:
            if not run_dir.is_dir():
                run_dir.mkdir(mode=LOCK_DIR_MODE, parents=True, exist_ok=True)
                created_dir = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
            except FileNotFoundError:  # the folder was removed meanwhile (a refused run's)
                continue
            try:
                locked = _try_flock(fd)
                if locked and not _same_file(fd, path):  # released and removed meanwhile
                    os.close(fd)
                    continue
                text = _read_fd(fd)
            except BaseException:
                os.close(fd)
                raise
            previous = LockInfo.parse(text) if text.strip() else None
            if locked:
                return cls._take(
                    path, fd, previous, had_text=bool(text.strip()), created_dir=created_dir
                )
            os.close(fd)
            now = time.monotonic()
            first_refused = now if first_refused is None else first_refused
            # no owner named yet: it is being written; an orphaned worker: it is stopping
            orphaned = previous is not None and _orphaned(previous)
            wait = 1.0 if previous is None else orphan_wait if orphaned else 0.0
            if orphaned and not warned and previous is not None:
                warned = True
                logger.warning(
                    "%s: its owner (pid %d) is gone; waiting up to %.0f s for its simulation "
                    "worker (pid %s) to stop",
                    run_dir,
                    previous.pid,
                    orphan_wait,
                    previous.worker,
                )
            if now - first_refused >= wait:
                raise RunInUseError(_in_use(run_dir, previous))
            time.sleep(0.2)

    @classmethod
    def _take(
        cls, path: Path, fd: int, previous: LockInfo | None, *, had_text: bool, created_dir: bool
    ) -> RunLock:
        """Own the lock just taken on ``fd``: stop a dead owner's leftovers, write our info."""
        run_dir = path.parent
        try:
            if had_text:
                who = (
                    f"pid {previous.pid} on {previous.host} since {previous.since()}"
                    if previous is not None
                    else "an unknown owner"
                )
                logger.warning("%s: taking over the stale lock of %s (it has died)", run_dir, who)
                if previous is not None:
                    _stop_leftovers(run_dir, previous)
            info = LockInfo.of_this_process()
            _write_fd(fd, json.dumps(asdict(info)) + "\n")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, info, created_dir=created_dir)

    def fileno(self) -> int:
        """The locked file descriptor, for ``pass_fds`` of a child that must hold the lock."""
        return self._fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock (not yet released)."""
        return self._finalizer.alive

    def record_worker(self, pid: int) -> None:
        """Name the worker process (the leader of the run's process group) in the lock file."""
        fields = {**asdict(self.info), "worker": pid, "worker_started": start_time(pid)}
        self.info = LockInfo(**fields)
        _write_fd(self._fd, json.dumps(asdict(self.info)) + "\n")

    def release(self) -> None:
        """Give the lock up (a no-op the second time); the file goes once nobody holds it."""
        self._finalizer()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _orphaned(info: LockInfo | None) -> bool:
    """Whether a held lock belongs to a worker whose command has died on this host."""
    return (
        info is not None
        and info.worker is not None
        and info.local()
        and not is_alive(info.pid)
        and is_alive(info.worker)
    )


def _in_use(run_dir: Path, info: LockInfo | None) -> str:
    if info is None:
        return f"{run_dir} is in use by another fedrec command (its lock file names no owner yet)"
    line = f"{run_dir} is in use by pid {info.pid} on {info.host} since {info.since()}"
    if info.local() and not is_alive(info.pid):
        holder = (
            "a process it started" if info.worker is None else f"its worker, pid {info.worker},"
        )
        line += f" (the command has died; {holder} still holds the lock)"
    return line


def _stop_leftovers(run_dir: Path, info: LockInfo) -> None:
    """Stop what is left of a dead owner's process group (its worker led it), if anything.

    Only on the owner's host and boot, and only when the group is still that worker's: a live
    group leader with another start time is a new process that reused the pid (Linux does not
    hand out a pid while a process group of that number exists, so a group without its leader
    is the old one).
    """
    pgid = info.worker
    if pgid is None or not info.local() or not group_alive(pgid):
        return
    leader_start = start_time(pgid)
    if (
        leader_start is not None
        and info.worker_started is not None
        and leader_start != info.worker_started
    ):
        return
    logger.warning(
        "%s: stopping what is left of the dead run's processes (process group %d)", run_dir, pgid
    )
    if not stop_group(pgid):
        raise FedrecError(
            f"{run_dir}: the processes of a dead run (process group {pgid}) do not stop; "
            f"stop them (kill -KILL -- -{pgid}) and try again"
        )

"""One owner per run folder, and a worker that dies with ``fedrec simulate``.

The fast tests drive :class:`common.run.owner.RunLock` and
:func:`common.processes.die_with_parent` with small helper processes; the slow ones kill a
tiny DP run's command (SIGKILL, SIGHUP) mid-way and check that nothing of it survives and that
``--resume`` then releases every round exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from common.errors import FedrecError
from common.processes import group_alive, is_alive
from common.run.owner import LOCK_FILE, RunInUseError, RunLock, config_hash

if TYPE_CHECKING:
    from server.state import ServerState

ROOT = Path(__file__).resolve().parents[2]
FEDREC = [sys.executable, "-m", "simulations.cli"]


def _default_hangup() -> None:
    """In a child: SIGHUP terminates again, even when the test runs under ``nohup``."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _python(code: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Run ``code`` in a fresh Python of this checkout (stdout piped, one line per event)."""
    return subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_default_hangup,
        **kwargs,
    )


def _wait_until(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


HOLD_AND_DIE = """
import os, signal, subprocess, sys
from pathlib import Path
from common.run.owner import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
mode = sys.argv[2]
if mode != "none":  # a 'worker' in its own session, sharing the lock ('inherit') or not
    fds = (lock.fileno(),) if mode == "inherit" else ()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(float(__import__('sys').argv[1]))",
         sys.argv[3]], pass_fds=fds, start_new_session=True)
    lock.record_worker(child.pid)
    print(child.pid, flush=True)
else:
    print(0, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)  # no release: the kernel drops this process's share
"""


def _dead_owner(run_dir: Path, mode: str, sleep: float = 60.0) -> int:
    """A process takes ``run_dir``'s lock (with a worker per ``mode``) and dies by SIGKILL;
    returns the worker's pid (0 without one)."""
    proc = _python(HOLD_AND_DIE, str(run_dir), mode, str(sleep), stdin=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    worker = int(proc.stdout.readline())
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return worker


def test_a_held_lock_is_refused_naming_its_owner(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLock.acquire(run_dir) as lock:
        info = json.loads((run_dir / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == lock.info.host
        start = time.monotonic()
        with pytest.raises(RunInUseError) as err:
            RunLock.acquire(run_dir)
        assert time.monotonic() - start < 1.0  # a live owner: refused at once
        message = str(err.value)
        assert message.startswith(f"{run_dir} is in use by pid {os.getpid()} on {info['host']}")
        assert " since " in message and "\n" not in message
    assert not (run_dir / LOCK_FILE).exists()
    assert not run_dir.exists()  # the lock made the folder and nothing else was written
    RunLock.acquire(run_dir).release()  # free again


def test_the_lock_is_released_when_its_holder_exits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    for ending in ("pass", "raise SystemExit(3)", "raise RuntimeError('boom')"):
        code = f"""
            import sys
            from pathlib import Path
            from common.run.owner import RunLock
            lock = RunLock.acquire(Path(sys.argv[1]))
            {ending}
        """
        proc = _python(code, str(run_dir), stderr=subprocess.DEVNULL)
        proc.communicate(timeout=30)
        assert proc.returncode != 0 or ending == "pass"
        assert not (run_dir / LOCK_FILE).exists(), ending
    with caplog.at_level(logging.WARNING):
        RunLock.acquire(run_dir).release()
    assert "stale" not in caplog.text
    assert run_dir.is_dir()  # a folder the lock did not make stays


def test_a_dead_owners_lock_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    _dead_owner(run_dir, "none")
    stale = json.loads((run_dir / LOCK_FILE).read_text())
    assert not is_alive(stale["pid"])
    with caplog.at_level(logging.WARNING), RunLock.acquire(run_dir) as lock:
        assert f"taking over the stale lock of pid {stale['pid']}" in caplog.text
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.held
    assert not lock.held


def test_an_orphaned_worker_keeps_the_lock_until_it_is_gone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    worker = _dead_owner(run_dir, "inherit", sleep=4.0)
    assert is_alive(worker)
    with pytest.raises(RunInUseError, match=rf"its worker, pid {worker}, still holds the lock"):
        RunLock.acquire(run_dir, orphan_wait=0.3)  # the worker still writes: refused
    start = time.monotonic()
    with RunLock.acquire(run_dir, orphan_wait=30.0):  # waits for it instead
        assert not is_alive(worker)
    assert time.monotonic() - start < 15


def test_a_dead_runs_leftover_processes_are_stopped_before_the_takeover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    worker = _dead_owner(run_dir, "separate")  # lock free, but its 'worker' group lives on
    assert group_alive(worker)
    with caplog.at_level(logging.WARNING), RunLock.acquire(run_dir):
        assert not group_alive(worker)
    assert "stopping what is left of the dead run" in caplog.text


WORKER = """
import subprocess, sys, time
from common.processes import die_with_parent
die_with_parent(int(sys.argv[1]), pdeathsig=sys.argv[2] == "1")
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # like Ray's processes
time.sleep(60)
"""

PARENT = """
import subprocess, sys, os, time
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]], start_new_session=True
)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("pdeathsig", ["1", "0"], ids=["pdeathsig", "watchdog-only"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_a_worker_and_its_group_die_with_their_parent(pdeathsig: str, sig: int) -> None:
    parent = _python(PARENT, textwrap.dedent(WORKER), pdeathsig)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    assert _wait_until(lambda: len(_group(worker)) >= 2, 20)  # the worker and its child
    os.kill(parent.pid, sig)
    parent.wait(timeout=10)
    start = time.monotonic()
    assert _wait_until(lambda: not group_alive(worker), 10), _group(worker)
    assert time.monotonic() - start < 5


def _group(pgid: int) -> list[str]:
    """``pid args`` of each live process in group ``pgid``."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True
    ).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [
        f"{r[0]} {r[3] if len(r) > 3 else ''}"
        for r in rows
        if int(r[1]) == pgid and "Z" not in r[2]
    ]


# ---------------------------------------------------------------- the run folder and its config


def _tiny_config(path: Path, data: Path, rounds: int) -> Path:
    path.write_text(
        "\n".join(
            [
                'name = "tiny lock"',
                f"rounds = {rounds}",
                f"eval_every = {rounds}",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "lr = 0.01",
                "round_timeout = 30",
            ]
        )
        + "\n"
    )
    return path


def test_the_config_hash_is_that_of_config_toml(tmp_path: Path) -> None:
    from common.config import to_toml
    from common.run.config import load_run_config

    cfg = load_run_config(None, ["rounds=7", "seed=5"])
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    again = load_run_config(tmp_path / "config.toml")
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_run_config(None, ["rounds=8", "seed=5"])) != config_hash(cfg)


def _state(config_hash_: str | None) -> ServerState:
    from server.state import ServerState

    return ServerState(
        round=1,
        weights={"w": np.zeros(3, dtype=np.float32)},
        optimizer={"steps": 0, "m": {}, "v": {}},
        config_hash=config_hash_,
    )


def test_a_new_run_never_continues_another_runs_state(tmp_path: Path) -> None:
    from simulations.runner import claim_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "server_state.pt").write_bytes(b"old")
    with pytest.raises(FedrecError) as err:
        claim_run_dir(run_dir)
    message = str(err.value)
    assert "server_state.pt" in message and f"--resume {run_dir}" in message
    assert "--force" in message
    assert not (run_dir / LOCK_FILE).exists()  # refused: the lock was given back
    claim_run_dir(run_dir, force=True).release()
    with pytest.raises(FedrecError, match="not a fedrec run folder"):
        claim_run_dir(tmp_path / "elsewhere", resume=True)
    assert not (tmp_path / "elsewhere").exists()


def test_the_cli_refuses_out_into_a_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.jsonl").write_text("{}\n")
    proc = subprocess.run(
        [*FEDREC, "simulate", "--out", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--resume" in errors[0] and "--force" in errors[0], proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["ledger.jsonl"]


def test_resume_refuses_a_state_or_ledger_of_another_config(tmp_path: Path) -> None:
    from common.config import to_toml
    from common.run.config import load_run_config
    from server.state import STATE_FILE, ServerState
    from simulations.runner import resume_config

    cfg = load_run_config(None, ["rounds=3"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(to_toml(cfg))
    state_path = run_dir / STATE_FILE
    _state(None).save(state_path)
    assert resume_config(run_dir) == cfg  # a state from before the hash: not refused
    _state(config_hash(cfg)).save(state_path)
    assert resume_config(run_dir) == cfg
    assert ServerState.load(state_path, expect_config_hash=config_hash(cfg)).round == 1
    other = config_hash(load_run_config(None, ["rounds=4"]))
    (run_dir / "ledger.jsonl").write_text(json.dumps({"type": "header", "config_hash": other}))
    with pytest.raises(FedrecError, match=r"ledger\.jsonl belongs to another config"):
        resume_config(run_dir)
    (run_dir / "ledger.jsonl").unlink()
    _state(other).save(state_path)
    with pytest.raises(FedrecError, match=r"server_state\.pt belongs to another config"):
        resume_config(run_dir)
    with pytest.raises(FedrecError, match="another config"):
        ServerState.load(state_path, expect_config_hash=config_hash(cfg))


# ------------------------------------------------------------------ a killed command, end to end


def _run_processes(run_dir: Path, pgid: int) -> list[str]:
    """Live processes of a run: its command line names the folder, or it is in the worker's
    process group (Ray's GCS, raylet and actors)."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True
    ).stdout
    found = []
    for line in out.splitlines():
        pid, group, stat, *args = line.split(None, 3)
        command = args[0] if args else ""
        if "Z" in stat or int(pid) == os.getpid() or "ps -eo" in command:
            continue
        if int(group) == pgid or str(run_dir) in command:
            found.append(f"{pid} {command[:120]}")
    return found


def _rounds_done(run_dir: Path) -> int:
    progress = run_dir / "progress.jsonl"
    lines = progress.read_text().splitlines() if progress.exists() else []
    return max([json.loads(x).get("round", 0) for x in lines] or [0])


def _kill_mid_run(cmd: list[str], run_dir: Path, sig: int, after: int) -> float:
    """Start ``cmd``, send ``sig`` to that process alone once round ``after`` is done, and wait
    until no process of the run is left; returns how long that took (seconds)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_default_hangup,
    )
    try:
        assert _wait_until(lambda: _rounds_done(run_dir) >= after or proc.poll() is not None, 240)
        assert proc.poll() is None, "the run ended before it could be killed"
        worker = json.loads((run_dir / LOCK_FILE).read_text())["worker"]
        assert worker is not None and group_alive(worker)
        os.kill(proc.pid, sig)  # the command only, not its group
        proc.wait(timeout=30)
        start = time.monotonic()
        gone = _wait_until(lambda: not _run_processes(run_dir, worker), 15)
        assert gone, _run_processes(run_dir, worker)
        return time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_killed_command_leaves_nothing_and_resumes_each_round_once(tmp_path: Path) -> None:
    """SIGKILL of a fresh run, SIGHUP of its resume, then a resume to the end: the ledger
    holds every round once and verifies."""
    from common.data import synthesize

    rounds = 9
    data = synthesize(60, 40, seed=3, out_dir=tmp_path / "synth")
    cfg = _tiny_config(tmp_path / "tiny.toml", data, rounds)
    run_dir = tmp_path / "run"
    dp = ["--set", "privacy.mode=client", "--set", "privacy.noise_multiplier=1.0"]
    fresh = [*FEDREC, "simulate", "--config", str(cfg), "--out", str(run_dir), *dp]
    resume = [*FEDREC, "simulate", "--resume", str(run_dir)]
    assert _kill_mid_run(fresh, run_dir, signal.SIGKILL, after=2) < 15
    first = _rounds_done(run_dir)
    assert (run_dir / LOCK_FILE).exists()  # the dead command's lock, taken over below
    assert _kill_mid_run(resume, run_dir, signal.SIGHUP, after=first + 2) < 15
    second = _rounds_done(run_dir)
    assert 2 <= first < second < rounds, (first, second)
    assert not (run_dir / LOCK_FILE).exists()  # SIGHUP: the command released it

    resumed = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["type"] == "round"] == list(range(1, rounds + 1))
    assert [r["type"] for r in records].count("final") == 1
    audit = subprocess.run(
        [*FEDREC, "audit", "verify", str(run_dir), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert json.loads(audit.stdout)["status"] == "verified"
    assert not (run_dir / LOCK_FILE).exists()

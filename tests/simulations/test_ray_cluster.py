"""`fedrec simulate` on an existing Ray cluster (``--ray-address``, ``simulation.ray_address``).

The end-to-end tests start a one-node Ray head of their own on loopback and run tiny
simulations on it. The head runs as ``ray start --head --block`` in a session of its own and is
stopped through that process tree (never ``ray stop``, which stops every Ray on the machine,
other people's local runs included). Its processes are recognized by the head's own
``--temp-dir``, which every one of them carries in its arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.data import synthesize
from common.processes import free_port, is_alive, stop_tree

FEDREC = [sys.executable, "-m", "simulations.cli"]
RAY = str(Path(sys.executable).parent / "ray")


def _config(path: Path, data: Path) -> Path:
    """The tiny run of ``test_simulate.py`` (2 rounds, 52 training users)."""
    lines = [
        'name = "tiny on a cluster"',
        "rounds = 2",
        "eval_every = 1",
        "reference = false",
        "[data]",
        f'dataset = "{data}"',
        "n_heldout_users = 8",
        "[model]",
        "dims = [16, 8]",
        "[server]",
        "sample_rate = 0.5",
        "lr = 0.01",
        "round_timeout = 120",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- fast: how the address reaches the worker and Flower's backend config -----------------


def test_local_backend_declares_cpus_and_ignores_ray_address_env() -> None:
    from simulations.worker import backend_config

    cfg = backend_config(0.5)
    assert cfg["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert cfg["init_args"]["address"] == "local"  # a RAY_ADDRESS in the env does not redirect
    assert cfg["init_args"]["num_cpus"] == (os.cpu_count() or 1)
    assert backend_config(0.5, "local") == cfg


def test_cluster_backend_passes_the_address_and_no_resources() -> None:
    from simulations.worker import backend_config

    cfg = backend_config(1.0, "10.0.0.5:6379")
    assert cfg["init_args"]["address"] == "10.0.0.5:6379"
    # ray.init refuses num_cpus / num_gpus / resources when it joins an existing cluster
    assert not {"num_cpus", "num_gpus", "resources"} & set(cfg["init_args"])
    assert cfg["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def _worker_cmd(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sets: list[str], address: str | None
) -> list[str]:
    """The worker command line that ``simulate`` builds (the worker itself is not run)."""
    from common.errors import FedrecError
    from common.run.config import load_run_config
    from simulations import runner

    seen: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append(list(cmd))
        return real_popen([sys.executable, "-c", "pass"], **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.setattr(runner, "_check_ray_head", lambda address: None)
    cfg = load_run_config(None, sets)
    with pytest.raises(FedrecError, match="simulation failed"):  # no "done" event: it did nothing
        runner.simulate(tmp_path, 3, cfg, ray_address=address)
    (cmd,) = seen
    assert cmd[1:6] == ["-m", "simulations.worker", str(tmp_path), "3", "1.0"]
    return cmd[6:]


def test_the_cli_address_overrides_the_config_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = ["simulation.ray_address=head.example:6379"]
    assert _worker_cmd(monkeypatch, tmp_path, [], None) == []
    assert _worker_cmd(monkeypatch, tmp_path, key, None) == ["head.example:6379"]
    assert _worker_cmd(monkeypatch, tmp_path, key, "other:6380") == ["other:6380"]
    assert _worker_cmd(monkeypatch, tmp_path, key, "local") == ["local"]


def test_an_address_where_nothing_listens_fails_at_once() -> None:
    from common.errors import FedrecError
    from simulations.runner import _check_ray_head

    with socket.create_server(("127.0.0.1", 0)) as server:
        _check_ray_head(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: fine
    start = time.monotonic()
    with pytest.raises(FedrecError, match="no Ray head answers"):
        _check_ray_head(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 5  # Ray itself would retry for minutes
    for left_to_ray in ("local", "auto", "ray://127.0.0.1:1"):
        _check_ray_head(left_to_ray)


def test_cli_has_the_ray_address_option() -> None:
    from simulations.cli import build_parser

    args = build_parser().parse_args(["simulate", "--out", "r", "--ray-address", "h:6379"])
    assert args.ray_address == "h:6379"
    assert build_parser().parse_args(["simulate", "--out", "r"]).ray_address is None


def test_empty_ray_address_is_a_config_error() -> None:
    from common.run.config import load_run_config

    with pytest.raises(ValueError, match="ray_address"):
        load_run_config(None, ["simulation.ray_address=' '"])


# --- slow: a real Ray head ------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]
    """Environment of the processes that use the cluster (the head, fedrec, probes)."""
    temp_dir: str


def _cluster_processes(temp_dir: str) -> list[str]:
    """Command lines of the running processes of the head started with ``temp_dir``."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if temp_dir in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short folder: Ray's Unix sockets live under it (a socket path holds at most 107 bytes)
    temp_dir = tempfile.mkdtemp(prefix="fedrec-ray-", dir="/tmp")
    port = free_port()
    # Loopback only: with this variable Ray keeps 127.0.0.1 as the node address instead of
    # swapping in the machine's outward address (it is set for the children only).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    ports = (
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={200 * 2**20}",
        *(f"{opt}={free_port()}" for opt in ports),
    ]
    log_path = Path(f"{temp_dir}.log")
    with log_path.open("wb") as log:
        head = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log_path.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-1500:]
                pytest.skip(f"`ray start --head` could not start a head here:\n{tail}")
            time.sleep(0.3)
        yield Cluster(address=f"127.0.0.1:{port}", env=env, temp_dir=temp_dir)
    finally:
        stop_tree(head, grace=10.0)
        deadline = time.monotonic() + 10
        while _cluster_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = _cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)
        assert survivors == [], "processes of the test's Ray head survived:\n" + "\n".join(
            line[:200] for line in survivors
        )


_PROBE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
me = ray.get_runtime_context().get_job_id()
print(json.dumps({
    "nodes": sum(1 for n in ray.nodes() if n["Alive"]),
    "total": ray.cluster_resources(),
    "available": ray.available_resources(),
    "jobs": [j for j in state.jobs() if j["JobID"] != me],
    "actors": [
        {k: a[k] for k in ("ActorClassName", "JobID", "State", "Pid")}
        for a in state.actors().values()
    ],
}))
"""


def _probe(cluster: Cluster) -> dict[str, Any]:
    """What the cluster's GCS knows: live nodes, resources, the other jobs and all actors."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, cluster.address],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=120,
    )
    assert proc.returncode == 0, f"the cluster is not reachable:\n{proc.stderr[-2000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _fedrec_job(cluster: Cluster, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Ray job whose driver was this run's worker, and that job's actors."""
    info = _probe(cluster)
    assert info["nodes"] == 1  # the cluster is still up
    jobs = [
        j
        for j in info["jobs"]
        if "simulations.worker" in j["Entrypoint"] and str(run_dir) in j["Entrypoint"]
    ]
    assert len(jobs) == 1, info["jobs"]
    actors = [a for a in info["actors"] if a["JobID"] == jobs[0]["JobID"]]
    return jobs[0], actors


def _assert_freed(cluster: Cluster, run_dir: Path) -> None:
    """The run's driver left the cluster, its actors are gone and the cluster is still up."""
    deadline = time.monotonic() + 30
    while True:
        job, actors = _fedrec_job(cluster, run_dir)
        freed = job["IsDead"] and all(a["State"] == "DEAD" for a in actors)
        if freed or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert job["IsDead"], job
    assert actors and {a["ActorClassName"] for a in actors} == {"ClientAppActor"}
    assert [a for a in actors if a["State"] != "DEAD"] == []
    assert not any(is_alive(a["Pid"]) for a in actors if a["Pid"])
    assert _leftovers(run_dir) == []


def _leftovers(run_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(run_dir) in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


@pytest.mark.slow
def test_simulation_runs_on_an_existing_cluster_and_leaves_it_running(
    cluster: Cluster, tmp_path: Path, synth_csv: Path
) -> None:
    cfg = _config(tmp_path / "tiny.toml", synth_csv)
    run_dir = tmp_path / "run"
    args = ["simulate", "--config", str(cfg), "--out", str(run_dir)]
    proc = subprocess.run(
        [*FEDREC, *args, "--ray-address", cluster.address],
        capture_output=True,
        text=True,
        timeout=300,
        env=cluster.env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["applied"] for r in results["rounds"])
    assert set(results["final"]["test"]) >= {"ndcg@100", "recall@20", "recall@50"}
    log = (run_dir / "simulation.log").read_text()
    assert f"connecting to the existing cluster at {cluster.address}" in log
    _assert_freed(cluster, run_dir)  # the run's job used this cluster, and left it running
    info = _probe(cluster)
    assert info["available"].get("CPU") == info["total"]["CPU"] == 2.0


@pytest.mark.slow
def test_ctrl_c_stops_fedrec_but_not_the_cluster(
    cluster: Cluster, tmp_path: Path, synth_csv: Path
) -> None:
    cfg = _config(tmp_path / "tiny.toml", synth_csv)
    run_dir = tmp_path / "run"
    args = ["simulate", "--config", str(cfg), "--out", str(run_dir), "--set", "rounds=50"]
    proc = subprocess.Popen(
        [*FEDREC, *args, "--set", f"simulation.ray_address='{cluster.address}'"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.env,
    )
    try:
        progress = run_dir / "progress.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            lines = progress.read_text().splitlines() if progress.exists() else []
            if any(json.loads(line).get("round", 0) >= 1 for line in lines):
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "connecting to the existing cluster" in (run_dir / "simulation.log").read_text()
    assert len(json.loads((run_dir / "results.json").read_text())["rounds"]) < 50
    _assert_freed(cluster, run_dir)
    info = _probe(cluster)
    assert info["available"].get("CPU") == info["total"]["CPU"] == 2.0

"""``fedrec deploy local`` at a tiny size: a real TLS SuperLink and three authenticated devices.

One run of the shipped ``deploy local`` config (``server/deploy/configs/local.toml``:
example-level DP, encryption as configured) on synthetic data with a [16, 8] model: an
unregistered device is refused, one device is killed (SIGKILL, as a crash or a lost network
does) while round 2 runs, and the run still completes with the other two. 2-4 minutes on two
busy cores: a dozen Flower processes and one ``flwr-clientapp`` process per message, each
importing torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client.recommend import recommend
from client.store import DeviceFiles, read_ledger
from common.checkpoint import load_checkpoint
from common.run.config import load_run_config
from server.deploy.certs import make_node_keys
from server.deploy.cli import DEFAULT_LOCAL_CONFIG
from server.deploy.deployment import DeployError, SuperNodeSpec
from server.deploy.loopback import Loopback

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
    pytest.mark.skipif(
        not (Path(sys.executable).parent / "flower-superlink").exists(),
        reason="flower-superlink not installed next to this Python",
    ),
]


def _kill_in_round(lb: Loopback, name: str, server_round: int, done: threading.Event) -> None:
    """SIGKILL device ``name`` once the server has finished round ``server_round - 1``."""
    progress = lb.run_dir / "progress.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not done.is_set():
        if progress.exists():
            events = [json.loads(line) for line in progress.read_text().splitlines() if line]
            if any(e.get("event") == "round" and e["round"] == server_round - 1 for e in events):
                lb.deployment.stop(name, kill=True)
                return
        time.sleep(0.1)


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if text in line and not line.lstrip().startswith("Z") and "ps -eo" not in line
    ]


@pytest.mark.timeout(480)
def test_deploy_local_survives_a_lost_device_and_refuses_an_unregistered_one(
    tmp_path: Path,
) -> None:
    # Prepare: three silos of a synthetic data set, the deploy local config at a tiny size
    from common.data import synthesize

    data = synthesize(90, 40, seed=3, out_dir=tmp_path / "synth")
    cfg = load_run_config(
        DEFAULT_LOCAL_CONFIG,
        [
            f"data.dataset={data}",
            "data.n_silos=3",
            "data.n_heldout_users=8",
            "model.dims=[16,8]",
            "rounds=3",
            "server.round_timeout=60",  # what a vanished device costs an exchange
        ],
    )
    rogue = make_node_keys(tmp_path / "rogue", "rogue")
    done = threading.Event()

    # Execute
    with Loopback(cfg, tmp_path / "deploy") as lb:
        provisioned = lb.prepare()
        lb.start()
        with pytest.raises(DeployError, match="Failed to activate SuperNode"):
            lb.deployment.start_supernode(SuperNodeSpec("rogue", rogue.private_key))
        killer = threading.Thread(target=_kill_in_round, args=(lb, "device-2", 2, done))
        killer.start()
        try:
            result = lb.run(timeout=360)
        finally:
            done.set()
            killer.join()
        rounds = lb.rounds()
        started = lb.deployment.pids()
    verify = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "audit", "verify", str(lb.run_dir)],
        capture_output=True,
        text=True,
    )

    # Assert: the run completed, the lost device cost rounds 2 and 3 one participant each
    assert result.completed, result.status
    assert [(r["sampled"], r["returned"], r["applied"]) for r in rounds] == [
        ("3", "3", "True"),
        ("3", "2", "True"),
        ("3", "2", "True"),
    ]
    ledger = [json.loads(line) for line in (lb.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [r["participated"] for r in ledger if r.get("type") == "round"] == [3, 2, 2]
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Threshold mode: each device made and kept its own key share; nobody holds a whole key
    for history in provisioned.histories:
        share = history.parent / "keys" / "share.json"
        assert share.exists() and share.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.rglob("client.ctx"))
    # The server kept no client rows; the devices kept their own records
    with np.load(lb.run_dir / "data" / "clients.npz") as z:
        assert z["train_indices"].size == 0 and z["rows"].size == 74  # sizes, not rows
    alive, lost = (DeviceFiles(provisioned.histories[k]) for k in (0, 2))
    assert [e["round"] for e in read_ledger(alive.ledger)] == [1, 2, 3]
    assert [e["round"] for e in read_ledger(lost.ledger)] == [1]
    assert read_ledger(alive.ledger)[0]["mode"] == cfg.privacy.mode.value
    # The model changed, and the surviving device holds the final one and recommends with it
    final = load_checkpoint(lb.run_dir / "model.pt")
    device_copy = load_checkpoint(alive.model)
    initial = load_checkpoint(lost.model)  # received with round 1: the initial weights
    assert device_copy.metadata["after_round"] == 3
    assert initial.metadata["after_round"] == 0
    for key, value in final.state_dict.items():
        assert torch.equal(device_copy.state_dict[key], value)
    assert any(not torch.equal(initial.state_dict[k], v) for k, v in final.state_dict.items())
    rows = [line.split(",") for line in alive.history.read_text().splitlines()[1:]]
    one_user = [item for user, item in rows if user == rows[0][0]]
    top = recommend(alive.model, one_user, k=5)
    assert len(top.items) == 5 and not top.unknown_ids
    # Nothing left running
    assert len(started) >= 8  # SuperLink, its SuperExec, 3 x (join, SuperNode, SuperExec)
    assert lb.deployment.alive_pids() == set()
    assert _processes_mentioning(str(tmp_path)) == []

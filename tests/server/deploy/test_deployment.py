"""A real Flower 1.42 deployment on loopback: TLS SuperLink, authenticated SuperNodes.

Starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``, registers two node keys,
starts two ``flower-supernode`` processes, shows that an unregistered key, a plaintext node
and a node that trusts another CA are refused, runs a tiny app to completion and checks that
no process is left: 45 s on two idle cores, 90 s under load; the fedrec app 90-140 s.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.deploy.certs import make_ca, make_node_keys, make_server_cert
from server.deploy.deployment import DeployError, Deployment, SuperNodeSpec, deploy_local

pytestmark = [
    pytest.mark.slow,  # 45-90 s: a dozen Flower processes on two cores
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc"),
    pytest.mark.skipif(
        not (Path(sys.executable).parent / "flower-superlink").exists(),
        reason="flower-superlink not installed next to this Python",
    ),
]

_SERVER = """
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + 60
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} nodes")
        time.sleep(0.2)
    for rnd in range(1, int(context.run_config["rounds"]) + 1):
        content = RecordDict({"m": MetricRecord({"round": rnd})})
        msgs = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
        replies = grid.send_and_receive(msgs, timeout=120)
        values = sorted(int(r.content["m"]["value"]) for r in replies if r.has_content())
        print(f"round {rnd} values {values}", flush=True)
"""

_CLIENT = """
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    value = 100 * int(context.node_config["partition-id"]) + int(msg.content["m"]["round"])
    return Message(RecordDict({"m": MetricRecord({"value": value})}), reply_to=msg)
"""

_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "deploytiny"
version = "0.1.0"
description = "plumbing check"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedrec"

[tool.flwr.app.components]
serverapp = "deploytiny.server:app"
clientapp = "deploytiny.client:app"

[tool.flwr.app.config]
rounds = 2
expected-nodes = 2
"""


def _tiny_app(root: Path) -> Path:
    package = root / "deploytiny"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(_PYPROJECT))
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(_SERVER)
    (package / "client.py").write_text(_CLIENT)
    return root


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [
        line
        for line in out.splitlines()
        if text in line and not line.lstrip().startswith("Z") and "ps -eo" not in line
    ]


@pytest.mark.timeout(300)
def test_tls_superlink_admits_registered_nodes_only_and_runs_an_app(tmp_path: Path) -> None:
    # Prepare: CA, server certificate, two registered node keys and one unregistered key
    work_dir = tmp_path / "deploy"
    certs = work_dir / "certs"  # where Deployment looks for ca.crt, server.crt, server.key
    make_ca(certs)
    make_server_cert(certs, host="127.0.0.1")
    keys = [make_node_keys(certs / "nodes", f"node-{i}") for i in range(2)]
    rogue = make_node_keys(certs / "nodes", "rogue")
    app = _tiny_app(tmp_path / "app")

    # Execute
    with Deployment(work_dir) as deployment:
        deployment.start_superlink()
        node_ids = [
            deployment.register_node(k.public_key, name=f"node-{i}") for i, k in enumerate(keys)
        ]
        for i, k in enumerate(keys):
            deployment.start_supernode(
                SuperNodeSpec(f"node-{i}", k.private_key, {"partition-id": i})
            )
        with pytest.raises(DeployError, match="Failed to activate SuperNode") as unregistered:
            deployment.start_supernode(SuperNodeSpec("rogue", rogue.private_key))
        plaintext_spec = SuperNodeSpec("plain", None, insecure=True, max_retries=1)
        # HTTP into the TLS port: the handshake fails, the client sees the connection drop
        # ("Server disconnected without sending a response" or "Connection reset by peer")
        with pytest.raises(DeployError, match="Failed to initialize the connection") as plaintext:
            deployment.start_supernode(plaintext_spec)
        # A node that trusts another CA does not talk to this SuperLink (server authentication)
        impostor_ca = make_ca(tmp_path / "other-ca").cert
        wrong_ca_spec = SuperNodeSpec(
            "wrong-ca", keys[0].private_key, root_certificates=impostor_ca
        )
        with pytest.raises(DeployError, match="CERTIFICATE_VERIFY_FAILED"):
            deployment.start_supernode(wrong_ca_spec)
        result = deployment.run_app(app, {"rounds": 2, "expected-nodes": 2}, timeout=180)
        port = deployment.port
        started = deployment.pids()

    # Assert
    assert len(set(node_ids)) == 2
    assert "[code: 2004]" in str(unregistered.value)  # FLEET_NODE_ACTIVATION_FAILED
    assert "exited with 1" in str(plaintext.value)
    assert "Exit Code: 305" in str(plaintext.value)  # SUPERNODE_CONNECTION_ERROR
    assert any(why in str(plaintext.value) for why in ("disconnected", "reset by peer"))
    superlink_log = (work_dir / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert result.completed, result.status
    log = result.log_path.read_text()
    # Each node answered every round with 100 * partition-id + round
    assert "round 1 values [1, 101]" in log
    assert "round 2 values [2, 102]" in log
    assert deployment.alive_pids() == set(), f"left running: {deployment.alive_pids()}"
    assert len(started) >= 4  # superlink, its superexec, two supernodes (and theirs)
    assert _processes_mentioning(str(work_dir)) == []
    assert _processes_mentioning(f"127.0.0.1:{port}") == []


@pytest.mark.timeout(420)
def test_fedrec_app_trains_over_tls_with_two_silo_nodes(tmp_path: Path) -> None:
    # Prepare: a tiny synthetic data set in two silos, one SuperNode per silo
    from common.data import synthesize

    data = synthesize(60, 40, seed=3, out_dir=tmp_path / "synth")
    config = tmp_path / "deploy.toml"
    config.write_text(
        "\n".join(
            [
                'name = "deploy <test>"',
                "rounds = 2",
                "eval_every = 1",
                "reference = false",
                "[data]",
                f'dataset = "{data}"',
                'partition = "silos"',
                "n_silos = 2",
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 1.0",
                "min_clients = 2",
                "lr = 0.01",
                "round_timeout = 120",
                "registration_timeout = 60",
            ]
        )
        + "\n"
    )
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[3]

    # Execute: the FAB is built from the repository, as `flwr run .` would
    result = deploy_local(
        repo,
        {"run-dir": str(run_dir), "config": str(config)},
        work_dir=tmp_path / "deploy",
        node_configs=[{"partition-id": 0}, {"partition-id": 1}],
        timeout=300,
    )

    # Assert
    assert result.completed, result.status
    rounds = (run_dir / "rounds.csv").read_text().splitlines()
    assert len(rounds) == 3  # header + 2 rounds
    assert all(line.split(",")[1:3] == ["2", "2"] for line in rounds[1:])  # sampled, returned
    assert (run_dir / "model.pt").is_file()
    assert _processes_mentioning(str(tmp_path)) == []

"""The warm start in a Flower run: two releases through the round machinery before round 1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import scipy.sparse as sp
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from client.app import app
from client.local import split_local
from common.data import synthesize
from common.model import build_model
from common.privacy import plan_privacy
from common.privacy.accounting import AccountantKind, MechanismStep, compute_epsilon
from common.privacy.ledger import read_ledger
from common.protocol import CONFIG_RECORD, ProtocolError, RoundConfig
from common.rounds import split_seed
from common.run.config import RunConfig, load_run_config
from common.run.folder import load_client_shard, load_eval_data, n_clients_of
from common.warmstart import COOCCURRENCE, POPULARITY, RELEASES, statistic
from server.federation import run_federation
from server.state import STATE_FILE, ServerState
from server.warmstart import run_warm_start
from simulations.runner import prepare_run

pytestmark = pytest.mark.usefixtures("task_identity")

TINY = ["data.n_heldout_users=8", "model.dims=[16, 8]", "reference=false"]
WARM = ["warm_start.enabled=true", "warm_start.min_vocabulary=10"]
DP = ["privacy.mode='client'", "privacy.target_epsilon=8.0", "server.sample_rate=0.5"]


class KilledError(Exception):
    """Stands for the server process being killed."""


class AppGrid:
    """A grid whose nodes run fedrec's ClientApp in this process (node ``100 + i`` is client
    ``i``), keeping each node's context between messages; records what it was sent."""

    def __init__(self, run_dir: Path, *, stop_at_training: bool = False) -> None:
        self.nodes = [100 + i for i in range(n_clients_of(run_dir))]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 100},
                state=RecordDict(),
                run_config={"run-dir": str(run_dir)},
            )
            for node in self.nodes
        }
        self.stop_at_training = stop_at_training
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            training = msg.metadata.message_type == "train"
            config = msg.content.config_records.get(CONFIG_RECORD)
            if (
                self.stop_at_training
                and training
                and config is not None
                and RoundConfig.read(config).release is None
            ):
                raise KilledError
            node = msg.metadata.dst_node_id
            reply = app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node  # as if the node had answered
            replies.append(reply)
        return replies

    def releases_sent(self) -> list[str | None]:
        return [
            RoundConfig.read(m.content.config_records[CONFIG_RECORD]).release
            for m in self.sent
            if m.metadata.message_type == "train"
        ]


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(60, 40, seed=3, out_dir=tmp_path_factory.mktemp("synth"))


def _prepare(root: Path, synth_csv: Path, sets: list[str]) -> tuple[RunConfig, Path]:
    cfg = load_run_config(None, [f"data.dataset={str(synth_csv)!r}", *TINY, *sets])
    run_dir = root / "run"
    prepare_run(cfg, run_dir)
    return cfg, run_dir


def _train_rows(cfg: RunConfig, run_dir: Path) -> sp.csr_matrix:
    """Every client's training rows, stacked: what the releases sum over."""
    rows = [
        split_local(
            load_client_shard(run_dir, c).rows,
            fraction=cfg.data.client_holdout_fraction,
            seed=split_seed(cfg.seed, c),
        ).train
        for c in range(n_clients_of(run_dir))
    ]
    return sp.csr_matrix(sp.vstack(rows))


def test_a_release_config_round_trips_and_a_bad_vocabulary_is_refused() -> None:
    config = RoundConfig(2, release=COOCCURRENCE, vocabulary=(3, 7)).to_record()
    assert RoundConfig.read(config) == RoundConfig(2, release=COOCCURRENCE, vocabulary=(3, 7))
    assert RoundConfig.read(RoundConfig(1, beta=0.1).to_record()).release is None
    config["release-vocabulary"] = [3, -1]
    with pytest.raises(ProtocolError, match="release-vocabulary"):
        RoundConfig.read(config)


def test_release_step_sums_every_clients_statistic(tmp_path: Path, synth_csv: Path) -> None:
    # Prepare: no DP, no encryption: the sums are exact
    cfg, run_dir = _prepare(tmp_path, synth_csv, ["rounds=0", *WARM])
    data = load_eval_data(run_dir)
    model_cfg = cfg.model.to_model_config(len(data.item_ids))
    template = {k: v.numpy() for k, v in build_model(model_cfg).state_dict().items()}
    grid = AppGrid(run_dir)

    # Execute
    warm = run_warm_start(
        cast(Grid, grid),
        cfg,
        nodes=grid.nodes,
        plan=None,
        accountant=None,
        summer=None,
        model_cfg=model_cfg,
        template=template,
        data=data,
        run_info={},
    )

    # Assert: every node asked twice; the sums are the statistics of all training rows
    assert grid.releases_sent() == [POPULARITY] * len(grid.nodes) + [COOCCURRENCE] * len(grid.nodes)
    rows = _train_rows(cfg, run_dir)
    popularity, cooccurrence = (r.total for r in warm.releases)
    assert popularity is not None and cooccurrence is not None
    np.testing.assert_allclose(popularity, statistic(POPULARITY, rows, None), rtol=1e-5)
    vocab = RoundConfig.read(grid.sent[-1].content.config_records[CONFIG_RECORD]).vocabulary
    assert vocab is not None and len(vocab) == warm.summary["vocabulary_size"]
    np.testing.assert_allclose(
        cooccurrence, statistic(COOCCURRENCE, rows, vocab), rtol=1e-5, atol=1e-6
    )
    assert warm.weights is not None and set(warm.weights) == set(template)
    assert warm.summary["noise_multipliers"] == {POPULARITY: 0.0, COOCCURRENCE: 0.0}
    assert warm.summary["releases"] == []
    assert warm.summary["values_per_client"] == len(data.item_ids) + cooccurrence.size


def test_dp_encrypted_warm_start_resumes_without_repeating(tmp_path: Path, synth_csv: Path) -> None:
    # Prepare: DP + CKKS, the releases then one round; the server dies at round 1
    sets = ["rounds=1", "warm_start.share=0.5", "encryption.enabled=true", *WARM, *DP]
    cfg, run_dir = _prepare(tmp_path, synth_csv, sets)
    n = n_clients_of(run_dir)
    first = AppGrid(run_dir, stop_at_training=True)
    with pytest.raises(KilledError):
        run_federation(cast(Grid, first), cfg, run_dir, expected_nodes=n)
    state = ServerState.load(run_dir / STATE_FILE)
    assert [r["release"] for r in state.releases] == [POPULARITY, COOCCURRENCE]
    assert state.warm_start is not None and state.round == 0
    lines = list(read_ledger(run_dir / "ledger.jsonl"))
    assert [x["type"] for x in lines] == ["header", "release", "release"]
    # threshold mode: each of the 5 key holders checked, decrypted and co-signed each release
    assert all(len(x["signatures"]["committee"]) == 5 for x in lines[1:])
    # as if the server had died between saving the state and writing the release lines
    ledger = (run_dir / "ledger.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "ledger.jsonl").write_text(ledger[0])

    # Execute: resume
    second = AppGrid(run_dir)
    run_federation(cast(Grid, second), cfg, run_dir, expected_nodes=n)

    # Assert: no release again; releases then the round, composed on one accountant
    assert second.releases_sent() == [None] * len(second.releases_sent())
    lines = list(read_ledger(run_dir / "ledger.jsonl"))
    assert [x["type"] for x in lines] == ["header", "release", "release", "round", "final"]
    plan = plan_privacy(cfg, n)
    assert plan is not None
    # each release at its own z, every client answering (so its effective z is its z)
    zs = [plan.release_noise_multiplier(name) for name in (POPULARITY, COOCCURRENCE)]
    assert zs[0] == pytest.approx(2 * zs[1])  # popularity_share 0.2: z_pop / z_cooc = 2
    for line, z in zip(lines[1:3], zs, strict=True):
        assert line["participated"] == n and line["noise_multiplier"] == z
        assert line["effective_noise_multiplier"] == pytest.approx(z)
    round_line = lines[3]
    steps = [
        *(MechanismStep(z, 1.0, 1) for z in zs),
        MechanismStep(round_line["effective_noise_multiplier"], round_line["sample_rate"], 1),
    ]
    expected = compute_epsilon(steps, delta=plan.delta, accountant=AccountantKind.RDP)
    assert round_line["epsilon_rdp"] == pytest.approx(expected, rel=1e-6)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["warm_start"] == state.warm_start
    assert results["warm_start"]["noise_multipliers"] == dict(zip(RELEASES, zs, strict=True))
    assert results["final"]["privacy"]["epsilon"] == round_line["epsilon"]
    assert results["final"]["privacy"]["release_noise_multipliers"] == dict(
        zip(RELEASES, zs, strict=True)
    )


@pytest.mark.slow
def test_simulate_runs_the_warm_start_alone_with_dp_and_encryption(
    tmp_path: Path, synth_csv: Path
) -> None:
    # Prepare
    config = tmp_path / "tiny.toml"
    config.write_text(
        "\n".join(
            [
                "rounds = 0",
                "reference = false",
                "[data]",
                f'dataset = "{synth_csv}"',
                "n_heldout_users = 8",
                "[model]",
                "dims = [16, 8]",
                "[server]",
                "sample_rate = 0.5",
                "round_timeout = 120",
                "[privacy]",
                'mode = "client"',
                "target_epsilon = 8.0",
                # the noise is seeded so that the rank chosen on validation users is repeatable
                # (with fresh noise, 44 synthetic users sometimes prefer the popularity list)
                "noise_seed = 7",
                "[encryption]",
                "enabled = true",
                "[warm_start]",
                "enabled = true",
                "share = 1.0",
                "min_vocabulary = 10",
            ]
        )
        + "\n"
    )
    run_dir = tmp_path / "run"

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out",
         str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    warm = results["warm_start"]
    assert warm["vocabulary_size"] >= 10 and warm["rank"] >= 1
    assert warm["test"] == results["final"]["test"] and results["rounds"] == []
    lines = list(read_ledger(run_dir / "ledger.jsonl"))
    releases = [x for x in lines if x["type"] == "release"]
    assert [x["release"] for x in releases] == [POPULARITY, COOCCURRENCE]
    assert all(x["participated"] == x["invited"] for x in releases)
    assert all(len(x["signatures"]["committee"]) == 5 for x in releases)
    assert lines[-1]["type"] == "final"
    privacy = results["final"]["privacy"]
    assert privacy["epsilon"] == releases[-1]["epsilon"]
    assert 0.97 * 8.0 <= privacy["epsilon"] <= 8.0  # the whole target, never more
    zs = {x["release"]: x["noise_multiplier"] for x in releases}
    assert privacy["release_noise_multipliers"] == warm["noise_multipliers"] == zs
    # no rounds: the plan's z is the Gaussian equivalent of the two releases
    assert privacy["noise_multiplier"] == pytest.approx(
        1 / np.sqrt(sum(1 / z**2 for z in zs.values()))
    )
    assert (run_dir / "model.pt").exists()

"""The server's round loop: wait for nodes, run rounds, evaluate, checkpoint, report.

One round: sample a cohort (Poisson rate q or fixed count), send the global model, collect the
weighted updates until the round timeout, apply their average with the server optimizer, and
every ``eval_every`` rounds evaluate on the held-out test users with the same metric code as the
centralized run. After every round the server state is checkpointed atomically, so a killed run
resumes from its last complete round with no gap or duplicate in its results.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.checkpoint import Checkpoint, save_checkpoint
from common.config import to_dict
from common.he import load_server_context
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.ledger import LedgerWriter, read_ledger
from common.metrics import evaluate
from common.model import ModelConfig, anneal_beta, build_model
from common.privacy import MechanismStep
from common.runconfig import RunConfig
from common.rundata import EvalData, client_sizes, load_eval_data, n_clients_of
from common.runinfo import run_info_config
from common.training import score_users
from server.dp import ClientDPStrategy, DPPlan, ExampleDPStrategy, make_dp_strategy, plan_privacy
from server.he import CommitteeSum
from server.optimizer import cosine_lr_scale, make_server_optimizer
from server.strategy import FedRecStrategy

__all__ = ["ROUND_FIELDS", "ServerState", "run_federation", "wait_for_nodes"]

logger = logging.getLogger(__name__)

ROUND_FIELDS = (
    "round",
    "sampled",
    "returned",
    "failed",
    "dropped",
    "refused",
    "applied",
    "ndcg@100",
    "recall@20",
    "client_ndcg@100",
    "epsilon",
    "epsilon_rdp",
    "effective_noise_multiplier",
    "seconds",
    "bytes_up",
    "bytes_down",
    "deserialize_seconds",
    "train_seconds",
    "serialize_seconds",
    "he_encrypt_seconds",
    "he_aggregate_seconds",
    "he_decrypt_seconds",
    "discarded",
)
"""Columns of ``rounds.csv``, in order (DP and HE columns stay empty when those are off)."""

STATE_FILE = "server_state.pt"


@dataclass
class ServerState:
    """Everything needed to continue a run: the model, the optimizer and the rounds so far."""

    round: int
    weights: dict[str, np.ndarray]
    optimizer: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the state atomically (tensors and plain containers only)."""
        opt = self.optimizer
        payload = {
            "round": self.round,
            "weights": {
                k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.weights.items()
            },
            "optimizer": {
                "steps": opt["steps"],
                "m": {k: torch.from_numpy(v) for k, v in opt["m"].items()},
                "v": {k: torch.from_numpy(v) for k, v in opt["v"].items()},
            },
            "rounds": json.dumps(self.rounds),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> ServerState:
        """Read what :meth:`save` wrote."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        opt = payload["optimizer"]
        return cls(
            round=int(payload["round"]),
            weights={k: v.numpy() for k, v in payload["weights"].items()},
            optimizer={
                "steps": int(opt["steps"]),
                "m": {k: v.numpy() for k, v in opt["m"].items()},
                "v": {k: v.numpy() for k, v in opt["v"].items()},
            },
            rounds=json.loads(payload["rounds"]),
        )


def wait_for_nodes(grid: Grid, *, expected: int, timeout: float, minimum: int) -> list[int]:
    """Poll until ``expected`` nodes registered (Flower otherwise samples the first few only).

    Returns the registered node ids. After ``timeout`` seconds the run goes on with what is
    there if that is at least ``minimum``; otherwise raises ``RuntimeError``.
    """
    start = time.monotonic()
    nodes: list[int] = []
    while time.monotonic() - start < timeout:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            break
        time.sleep(0.1)
    waited = time.monotonic() - start
    if len(nodes) < expected:
        if len(nodes) < minimum:
            raise RuntimeError(
                f"only {len(nodes)} of {expected} client nodes registered in {timeout:.0f} s"
            )
        logger.warning(
            "%d of %d nodes registered after %.0f s; going on", len(nodes), expected, waited
        )
    logger.info("%d nodes registered after %.1f s", len(nodes), waited)
    return nodes


def canonical_order(nodes: list[int], run_dir: Path, *, wait: float = 0.0) -> list[int]:
    """Nodes ordered by their client (partition) id when the simulation recorded it.

    Simulated node ids are random per run; ordering by partition makes a seed pick the same
    clients every time. The simulation writes the mapping while it registers nodes, so this
    waits up to ``wait`` seconds for it to cover ``nodes``. Without a mapping (a real
    deployment) nodes keep id order.
    """
    path = run_dir / "data" / "nodes.json"
    deadline = time.monotonic() + wait
    while True:
        partition: dict[int, int] = {}
        if path.exists():
            partition = {int(n): int(p) for n, p in json.loads(path.read_text()).items()}
        if all(n in partition for n in nodes) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not all(n in partition for n in nodes):
        if wait > 0:
            logger.warning("no node-to-client mapping: sampling follows random node ids")
        return sorted(nodes)
    return sorted(nodes, key=lambda n: (partition[n], n))


def open_ledger(run_dir: Path, cfg: RunConfig, plan: DPPlan, state: ServerState) -> LedgerWriter:
    """Create ``RUN_DIR/ledger.jsonl``, or continue it when resuming.

    The server state is saved before the ledger line of a round, so after a crash between the
    two the ledger can lag one round behind the state: that line is written again from the
    state's record of the round.
    """
    path = run_dir / "ledger.jsonl"
    if not path.exists():
        if state.round > 0:
            raise RuntimeError(f"{path} is missing but the run is at round {state.round}")
        return LedgerWriter.create(
            path,
            {
                "run_id": run_dir.name,
                "code_version": _code_version(),
                "config": to_dict(cfg),
                "population": plan.population,
                "delta": plan.delta,
                "accountant": "prv",
                "mode": plan.mode.value,
            },
        )
    writer = LedgerWriter.open_existing(path)
    rounds_in_ledger = sum(1 for r in read_ledger(path) if r.get("type") == "round")
    for record in state.rounds[rounds_in_ledger:]:
        writer.append_round(record["ledger"])
    return writer


def _code_version() -> str:
    from importlib.metadata import version

    return f"fedrec {version('fedrec')}"


def _test_metrics(
    model_cfg: ModelConfig, weights: dict[str, np.ndarray], data: EvalData, split: str = "test"
) -> dict[str, float]:
    model = build_model(model_cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    foldin = getattr(data, f"{split}_foldin")
    holdout = getattr(data, f"{split}_holdout")
    m = evaluate(lambda x: score_users(model, x), foldin, holdout)
    return {k: float(m[k]) for k in ("ndcg@100", "recall@20", "recall@50", "coverage@20")}


class _Outputs:
    """The files a run keeps up to date after every round."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.progress = run_dir / "progress.jsonl"

    def event(self, **fields: Any) -> None:
        fields["time"] = time.time()
        with self.progress.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(fields) + "\n")

    def write_rounds(self, rounds: list[dict[str, Any]], final: dict[str, Any] | None) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROUND_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for r in rounds:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ROUND_FIELDS})
        atomic_write_text(self.run_dir / "rounds.csv", buf.getvalue())
        results_path = self.run_dir / "results.json"
        previous = json.loads(results_path.read_text()) if results_path.exists() else {}
        atomic_write_json(
            results_path,
            {
                **previous,
                "config": to_dict(self.cfg),
                "rounds": rounds,
                "final": final,
            },
        )


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, *, expected_nodes: int, simulated: bool = False
) -> None:
    """Run (or resume) the federated rounds of ``cfg`` and write the run's files.

    Parameters
    ----------
    grid:
        Flower's grid: how messages reach the client nodes.
    cfg:
        The resolved run config.
    run_dir:
        The run folder prepared by the runner (``config.toml``, ``data/``).
    expected_nodes:
        How many client nodes to wait for before round 1.
    simulated:
        Launched by ``fedrec simulate``, which records which client each node is.
    """
    run_dir = Path(run_dir)
    out = _Outputs(run_dir, cfg)
    data = load_eval_data(run_dir)
    model_cfg = cfg.model.to_model_config(len(data.item_ids))
    optimizer = make_server_optimizer(cfg.server)
    state_path = run_dir / STATE_FILE
    if state_path.exists():
        state = ServerState.load(state_path)
        optimizer.load_state_dict(state.optimizer)
        logger.info("resuming after round %d", state.round)
    else:
        torch.manual_seed(cfg.seed)
        init = build_model(model_cfg, generator=torch.Generator().manual_seed(cfg.seed))
        state = ServerState(
            round=0,
            weights={k: v.detach().numpy().copy() for k, v in init.state_dict().items()},
            optimizer=optimizer.state_dict(),
        )
    out.event(
        event="start", rounds=cfg.rounds, resumed_after=state.round, expected_nodes=expected_nodes
    )
    plain = FedRecStrategy(cfg.server, optimizer, seed=cfg.seed)
    strategy: FedRecStrategy | ClientDPStrategy | ExampleDPStrategy = plain
    population = n_clients_of(run_dir)
    plan = plan_privacy(cfg, population, silo_sizes=client_sizes(run_dir))
    if plan is not None:
        ledger = open_ledger(run_dir, cfg, plan, state)
        history = [
            MechanismStep(
                r["ledger"]["effective_noise_multiplier"],
                r["ledger"]["sample_rate"],
                r["ledger"]["steps"],
            )
            for r in state.rounds
            if r["ledger"]["released"]
        ]
        strategy = make_dp_strategy(plain, plan, ledger, history=history)
    else:
        logger.warning("privacy.mode = 'off': updates carry no differential privacy")
    if cfg.encryption.enabled:
        plain.summer = CommitteeSum(
            load_server_context(cfg.encryption.keys_dir(run_dir)),
            grid,
            committee_size=cfg.encryption.committee_size,
            timeout=cfg.server.round_timeout,
            seed=cfg.seed,
        )
    else:
        logger.warning("encryption.enabled = false: the server sees each client's update")
    plain.node_ids = canonical_order(
        wait_for_nodes(
            grid,
            expected=expected_nodes,
            timeout=cfg.server.registration_timeout,
            minimum=cfg.server.min_clients,
        ),
        run_dir,
        wait=30.0 if simulated else 0.0,
    )
    strategy.summary()
    out.event(event="nodes", registered=len(plain.node_ids))
    weights = state.weights
    # Devices cannot read the run folder: messages carry the config and catalogue (public)
    run_info = {} if simulated else run_info_config(cfg, data.item_ids)
    for rnd in range(state.round + 1, cfg.rounds + 1):
        start = time.perf_counter()
        beta = anneal_beta(rnd, cap=cfg.model.beta_cap, total_steps=cfg.model.anneal_steps)
        plain.lr_scale = cosine_lr_scale(
            rnd, rounds=cfg.rounds, final_fraction=cfg.server.lr_final_fraction
        )
        arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in weights.items()})
        config = ConfigRecord({"server-round": rnd, "beta": beta, **run_info})
        replies = grid.send_and_receive(
            strategy.configure_train(rnd, arrays, config, grid),
            timeout=cfg.server.round_timeout,
        )
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            weights = {k: v.numpy().copy() for k, v in new_arrays.items()}
        s = plain.last
        record: dict[str, Any] = {
            "round": rnd,
            "sampled": s.invited,
            "returned": s.returned,
            "failed": s.failed,
            "dropped": s.dropped,
            "refused": s.refused,
            "applied": s.applied,
            "ndcg@100": None,
            "recall@20": None,
            "client_ndcg@100": None,
            "bytes_up": s.bytes_up,
            "bytes_down": s.bytes_down,
        }
        if isinstance(strategy, ClientDPStrategy | ExampleDPStrategy):
            record["epsilon"] = strategy.epsilon
            record["epsilon_rdp"] = strategy.epsilon_rdp
            record["participated"] = s.returned
            record["effective_noise_multiplier"] = strategy.pending["effective_noise_multiplier"]
            record["ledger"] = strategy.pending
        for key, total in s.client_seconds.items():
            record[key.replace("-", "_")] = round(total / max(s.returned, 1), 6)
        for key, value in s.server_seconds.items():
            record[key.replace("-", "_")] = round(value, 6)
        if cfg.encryption.enabled:
            record["discarded"] = s.discarded
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            test = _test_metrics(model_cfg, weights, data)
            record["ndcg@100"], record["recall@20"] = test["ndcg@100"], test["recall@20"]
            eval_arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in weights.items()})
            client_eval = strategy.aggregate_evaluate(
                rnd,
                grid.send_and_receive(
                    strategy.configure_evaluate(
                        rnd, eval_arrays, ConfigRecord({"server-round": rnd, **run_info}), grid
                    ),
                    timeout=cfg.server.round_timeout,
                ),
            )
            if client_eval is not None and "ndcg@100" in client_eval:
                record["client_ndcg@100"] = float(client_eval["ndcg@100"])  # type: ignore[arg-type]
        record["seconds"] = round(time.perf_counter() - start, 4)
        logger.info(
            "round %d: sampled %d, returned %d, failed %d, dropped %d%s; NDCG@100 %s",
            rnd,
            s.invited,
            s.returned,
            s.failed,
            s.dropped,
            f" ({'; '.join(s.reasons[:3])})" if s.reasons else "",
            record["ndcg@100"],
        )
        state.rounds.append(record)
        state.round = rnd
        state.weights = weights
        state.optimizer = optimizer.state_dict()
        state.save(state_path)
        if isinstance(strategy, ClientDPStrategy | ExampleDPStrategy):
            strategy.commit_round()
        out.write_rounds(state.rounds, None)
        out.event(event="round", **record)
    final: dict[str, Any] = {"test": _test_metrics(model_cfg, weights, data)}
    if isinstance(strategy, ClientDPStrategy | ExampleDPStrategy):
        strategy.close()
        final["privacy"] = {
            "epsilon": strategy.epsilon,
            "epsilon_rdp": strategy.epsilon_rdp,
            "delta": strategy.plan.delta,
            "noise_multiplier": strategy.plan.noise_multiplier,
            "clip": strategy.plan.clip,
            "sample_rate": strategy.plan.sample_rate,
            "steps_per_round": strategy.plan.steps_per_round,
            "mode": strategy.plan.mode.value,
            "accountant": "prv",
        }
    save_checkpoint(
        run_dir / "model.pt",
        Checkpoint(
            model_config=model_cfg.to_dict(),
            state_dict={k: torch.from_numpy(v) for k, v in weights.items()},
            item_ids=data.item_ids,
            item_titles=data.item_titles,
            dataset=data.dataset,
            metadata={
                "trainer": "federated",
                "rounds": cfg.rounds,
                "seed": cfg.seed,
                "test": final["test"],
            },
        ),
    )
    out.write_rounds(state.rounds, final)
    out.event(event="done", final=final)

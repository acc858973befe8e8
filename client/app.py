"""The fedrec ClientApp (Flower Message API): local training and local evaluation.

Each call receives the global model, works on this node's own interactions only, and replies
with an example-weighted update (train) or metrics on its local held-out items (evaluate).
Heavy state (the data file, the model object) is loaded once per process and reused.

The node finds its data through its context: in a simulation ``node_config["partition-id"]``
selects its client in ``RUN_DIR/data/clients.npz``; the run folder and config come from
``run_config["run-dir"]``.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dp_mod import make_client_dp_mod
from client.local import LocalData, compute_update, local_metrics, split_local
from common.runconfig import RunConfig, load_run_config
from common.rundata import load_client_shard

__all__ = ["app"]

logger = logging.getLogger(__name__)

app = ClientApp()


@lru_cache(maxsize=2)
def _run_config(run_dir: str) -> RunConfig:
    return load_run_config(Path(run_dir) / "config.toml")


@lru_cache(maxsize=4096)
def _local_data(run_dir: str, client_id: int, fraction: float, seed: int) -> LocalData:
    shard = load_client_shard(Path(run_dir), client_id)
    return split_local(shard.rows, fraction=fraction, seed=seed * 1_000_003 + client_id)


def _context(context: Context) -> tuple[RunConfig, int, LocalData]:
    run_dir = str(context.run_config["run-dir"])
    cfg = _run_config(run_dir)
    client_id = int(context.node_config["partition-id"])
    data = _local_data(run_dir, client_id, cfg.data.client_holdout_fraction, cfg.seed)
    return cfg, client_id, data


def _budget(context: Context) -> float | None:
    """This client's own epsilon budget: node config ``budget`` (a device), else the run's."""
    if "budget" in context.node_config:
        return float(context.node_config["budget"])
    return _run_config(str(context.run_config["run-dir"])).privacy.client_budget


@app.train(mods=[make_client_dp_mod(_budget)])
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's rows; reply with the weighted delta."""
    t0 = time.perf_counter()
    cfg, client_id, data = _context(context)
    if client_id in cfg.simulation.fail_clients:
        raise RuntimeError(f"client {client_id}: injected failure (simulation.fail_clients)")
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    model_cfg = cfg.model.to_model_config(_n_items(global_state))
    t1 = time.perf_counter()
    update = compute_update(
        global_state,
        data,
        model_config=model_cfg,
        client=cfg.client,
        beta=float(config["beta"]),  # type: ignore[arg-type]
        seed=cfg.seed * 1_000_003 + server_round * 7919 + client_id,
    )
    t2 = time.perf_counter()
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in update.delta.items()})
    t3 = time.perf_counter()
    metrics = MetricRecord(
        {
            "weight": update.weight,
            "num-examples": update.num_examples,
            "loss": update.mean_loss,
            "deserialize-seconds": t1 - t0,
            "train-seconds": t2 - t1,
            "serialize-seconds": t3 - t2,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this client's local held-out items."""
    cfg, _, data = _context(context)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    model_cfg = cfg.model.to_model_config(_n_items(global_state))
    metrics = local_metrics(global_state, data, model_config=model_cfg)
    return Message(RecordDict({"metrics": MetricRecord(dict(metrics))}), reply_to=msg)


def _n_items(state: dict[str, torch.Tensor]) -> int:
    """Catalogue size: the input width of the first encoder layer, ``(hidden, n_items)``."""
    return int(state["encoder.0.weight"].shape[1])

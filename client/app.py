"""The fedrec ClientApp (Flower Message API): local training and local evaluation.

Each call receives the global model, works on this node's own interactions only, and replies
with an example-weighted update (train) or metrics on its local held-out items (evaluate).
Heavy state (the data file, the model object) is loaded once per process and reused.

The node finds its data through its context: in a simulation ``node_config["partition-id"]``
selects its client in ``RUN_DIR/data/clients.npz``; the run folder and config come from
``run_config["run-dir"]``. A device (``fedrec client join``) names its own history file in
``node_config["data"]`` and gets the run config and catalogue with each message
(:mod:`client.store`).

A train message of a warm-start release (``release`` in its config) asks for a statistic of
the client's training rows instead of an update (:func:`release_reply`); the DP and HE mods
treat the reply as any update.
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.dp_mod import make_client_dp_mod, refusal
from client.he_mod import (
    client_keys,
    cosign_decryption,
    decrypt_for_committee,
    make_client_he_mod,
    public_keys,
    public_keys_from_bytes,
)
from client.local import (
    LocalData,
    LocalUpdate,
    adversary_labels,
    compute_update,
    diverged_update,
    group_weights,
    local_metrics,
    nonfinite_reason,
    split_local,
)
from client.store import (
    announced_mechanism,
    device_client_id,
    device_mod,
    device_run_config,
    is_device,
    local_data_for,
    record_cosignature,
)
from client.threshold import Holder, handle_keygen, handle_tag, handle_threshold
from common.he import sum_from_record
from common.privacy.signing import (
    COSIGN_REQUEST_RECORD,
    COSIGNATURE_RECORD,
    DEVICE_KEY_FILE,
    DEVICE_REGISTRY_FILE,
    SIGNING_DIR,
    Cosignature,
    load_signing_key,
    read_device_registry,
    read_device_seed,
    simulated_device_key,
)
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DESERIALIZE_SECONDS,
    HE_PUBLIC_CONTEXT,
    HE_REGISTRY,
    HE_SUM_RECORD,
    METRICS_RECORD,
    RELEASE_STATISTIC,
    SERIALIZE_SECONDS,
    THRESHOLD_RECORD,
    TRAIN_SECONDS,
    Divergence,
    EvalMetrics,
    ExampleDPConfig,
    RoundConfig,
    TrainMetrics,
    read_optional_int,
)
from common.rounds import split_seed, train_seed
from common.run.config import RunConfig, load_run_config, run_model_config
from common.run.folder import load_client_shard
from common.warmstart import statistic

__all__ = ["app", "release_reply"]

logger = logging.getLogger(__name__)

app = ClientApp(mods=[device_mod])  # outermost: a device's run info and ledger (client.store)


@lru_cache(maxsize=2)
def _run_config(run_dir: str) -> RunConfig:
    return load_run_config(Path(run_dir) / "config.toml")


@lru_cache(maxsize=4096)
def _local_data(run_dir: str, client_id: int, fraction: float, seed: int) -> LocalData:
    shard = load_client_shard(Path(run_dir), client_id)
    return split_local(shard.rows, fraction=fraction, seed=split_seed(seed, client_id))


def _context(context: Context) -> tuple[RunConfig, int, LocalData]:
    if is_device(context):  # its own history file (fedrec client join)
        return device_run_config(context), device_client_id(context), local_data_for(context)
    run_dir = str(context.run_config["run-dir"])
    cfg = _run_config(run_dir)
    client_id = int(context.node_config["partition-id"])
    data = _local_data(run_dir, client_id, cfg.data.client_holdout_fraction, cfg.seed)
    return cfg, client_id, data


def _budget(context: Context) -> float | None:
    """This client's own epsilon budget: node config ``budget`` (a device), else the run's."""
    if "budget" in context.node_config:
        return float(context.node_config["budget"])
    if is_device(context):
        return device_run_config(context).privacy.client_budget
    return _run_config(str(context.run_config["run-dir"])).privacy.client_budget


def _noise_seed(context: Context) -> int | None:
    """The run's ``privacy.noise_seed`` (a simulation's; the DP mod refuses it on a device)."""
    if is_device(context):
        return device_run_config(context).privacy.noise_seed
    return _run_config(str(context.run_config["run-dir"])).privacy.noise_seed


def _keys_dir(context: Context) -> Path:
    """This client's key folder: node config ``keys`` (a device), else the run's."""
    if "keys" in context.node_config:
        return Path(str(context.node_config["keys"]))
    run_dir = str(context.run_config["run-dir"])
    return _run_config(run_dir).encryption.keys_dir(Path(run_dir))


def _signer(context: Context) -> tuple[int, Ed25519PrivateKey] | None:
    """This client's id and device signing key (threshold mode signs its uploads)."""
    key = _signing_key(context)
    if key is None:
        return None
    if is_device(context):
        return device_client_id(context), key
    return int(context.node_config["partition-id"]), key


def _registry(context: Context, config: ConfigRecord) -> dict[str, str]:
    """The registered device keys: the run's file in a simulation; on a device, the
    operator's registry as the server relays it (docs/design.md says what that trusts)."""
    if is_device(context):
        raw = config.get(HE_REGISTRY, config.get("registry", "{}"))
        registry = json.loads(str(raw))
        return {str(k): str(v) for k, v in registry.items()}
    run_dir = Path(str(context.run_config["run-dir"]))
    return read_device_registry(run_dir / SIGNING_DIR / DEVICE_REGISTRY_FILE)


# The HE mod is outermost: the DP mod clips and noises first, then the update is encrypted.
@app.train(
    mods=[
        make_client_he_mod(_keys_dir, _signer, _registry),
        make_client_dp_mod(_budget, _noise_seed),
    ]
)
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this client's rows; reply with the weighted delta."""
    t0 = time.perf_counter()
    cfg, client_id, data = _context(context)
    if client_id in cfg.simulation.fail_clients:
        raise RuntimeError(f"client {client_id}: injected failure (simulation.fail_clients)")
    config = msg.content.config_records[CONFIG_RECORD]
    round_config = RoundConfig.read(config)
    if round_config.release is not None:  # a warm-start release: a statistic, no training
        return Message(release_reply(round_config, data, t0), reply_to=msg)
    server_round = round_config.server_round
    global_state = msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict()
    model_cfg = run_model_config(cfg, _n_items(global_state))
    t1 = time.perf_counter()
    seed = train_seed(cfg.seed, server_round, client_id)
    beta = round_config.require_beta()
    dpsgd_steps: int | None = None
    dpsgd_sample_rate: float | None = None
    example_dp = ExampleDPConfig.read(config)
    if example_dp is not None:
        dpsgd = _dpsgd_train(global_state, data, cfg, example_dp, context, beta=beta)
        if isinstance(dpsgd, RecordDict):
            return Message(dpsgd, reply_to=msg)
        update, dpsgd_steps, dpsgd_sample_rate = dpsgd
    else:
        attributes = _attributes(context, client_id)  # the shard's own, never sent
        labels = adversary_labels(cfg.fairness, attributes, data.n_users)
        user_weights = group_weights(cfg.fairness, attributes, data.n_users)
        update = compute_update(
            global_state,
            data,
            model_config=model_cfg,
            client=cfg.client,
            beta=beta,
            seed=seed,
            labels=labels,
            user_weights=user_weights,
        )
    if update.diverged is not None:  # nothing to send: the reason, counted as a failure
        return Message(Divergence(update.diverged).to_content(), reply_to=msg)
    t2 = time.perf_counter()
    arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in update.delta.items()})
    t3 = time.perf_counter()
    metrics = TrainMetrics(
        weight=update.weight,
        num_examples=update.num_examples,
        loss=update.mean_loss,
        seconds={DESERIALIZE_SECONDS: t1 - t0, TRAIN_SECONDS: t2 - t1, SERIALIZE_SECONDS: t3 - t2},
        dpsgd_steps=dpsgd_steps,
        dpsgd_sample_rate=dpsgd_sample_rate,
    ).to_record()
    return Message(RecordDict({ARRAYS_RECORD: arrays, METRICS_RECORD: metrics}), reply_to=msg)


def _attributes(context: Context, client_id: int) -> dict[str, np.ndarray]:
    """This client's own users' protected attributes, for the on-device adversary and the
    group re-weighting of its loss.

    A simulated client reads its rows' from the run folder; a device has no attribute profile
    yet (:mod:`client.store` reads only its history), so it trains without the adversary."""
    if is_device(context):
        return {}
    return load_client_shard(Path(str(context.run_config["run-dir"])), client_id).attributes


def release_reply(round_config: RoundConfig, data: LocalData, t0: float) -> RecordDict:
    """The reply to a warm-start release: this client's statistic as its update.

    :func:`common.warmstart.statistic` of ``round_config.release`` over the client's training
    rows (the vocabulary's, for the co-occurrence), scaled to L2 norm at most 1: a one-user
    client's already is; a silo's sum of users is clipped here as the DP mod clips it, so a run
    without DP sums the same bounded values as the in-process engine. Weight 1 (the DP mod
    divides by the announced denominator N); ``num-examples`` counts the users. ``t0``: when
    the call started.
    """
    assert round_config.release is not None
    t1 = time.perf_counter()
    value = statistic(round_config.release, data.train, round_config.vocabulary)
    norm = float(np.linalg.norm(value))
    if norm > 1.0:
        value = (value / norm).astype(np.float32)
    t2 = time.perf_counter()
    arrays = ArrayRecord({RELEASE_STATISTIC: torch.from_numpy(value)})
    t3 = time.perf_counter()
    metrics = TrainMetrics(
        weight=1.0,
        num_examples=data.n_users,
        loss=0.0,
        seconds={DESERIALIZE_SECONDS: t1 - t0, TRAIN_SECONDS: t2 - t1, SERIALIZE_SECONDS: t3 - t2},
    ).to_record()
    return RecordDict({ARRAYS_RECORD: arrays, METRICS_RECORD: metrics})


_DPSGD_STATE = "fedrec-dpsgd"


def _dpsgd_train(
    global_state: dict[str, torch.Tensor],
    data: LocalData,
    cfg: RunConfig,
    example_dp: ExampleDPConfig,
    context: Context,
    *,
    beta: float,
) -> tuple[LocalUpdate, int, float] | RecordDict:
    """Example-level DP: DP-SGD with Opacus on this silo's users (or a refusal over budget).

    The silo keeps its own accountant: its users' epsilon composes (q_s, steps_s) over the
    rounds it trained (rounds it sat out cost them nothing). The update is weighted by the
    silo's user count, like the plain path, so the server's mean is unchanged in form. Returns
    the update with the DP-SGD steps taken and the sampling rate, or the refusal's content.
    """
    from client.dpsgd import DPSGDConfig, dpsgd_update  # Opacus: seconds to import
    from common.privacy import AccountantKind, MechanismStep, compute_epsilon

    z = example_dp.noise_multiplier
    dp_cfg = DPSGDConfig(
        noise_multiplier=z,
        max_grad_norm=example_dp.clip,
        lr=cfg.client.lr,
        batch_size=cfg.client.batch_size,
        epochs=cfg.client.local_epochs,
    )
    state = context.state.config_records.get(_DPSGD_STATE, ConfigRecord())
    steps_so_far = read_optional_int(state, "steps", record_name=_DPSGD_STATE) or 0
    budget = _budget(context)
    if budget is not None:
        batches = -(-data.n_users // dp_cfg.batch_size)
        planned = MechanismStep(z, 1.0 / batches, steps_so_far + dp_cfg.epochs * batches)
        delta = example_dp.delta
        epsilon = compute_epsilon([planned], delta=delta, accountant=AccountantKind.RDP)
        if epsilon > budget:
            return refusal(f"epsilon {epsilon:.3g} would exceed budget {budget:.3g}", epsilon)
    start = time.perf_counter()
    try:
        result = dpsgd_update(
            global_state,
            data.train,
            model_config=run_model_config(cfg, _n_items(global_state)),
            cfg=dp_cfg,
            beta=beta,
            seed=None,  # sampling and noise from OS entropy: the server knows the run's seed
        )
    except FloatingPointError as err:  # loss is nan at DP-SGD step 3: nothing sent
        # the steps it took touched the users' rows: the silo's guard counts a whole round
        state["steps"] = steps_so_far + dp_cfg.epochs * -(-data.n_users // dp_cfg.batch_size)
        context.state.config_records[_DPSGD_STATE] = state
        seconds = time.perf_counter() - start
        return diverged_update(str(err), num_examples=data.n_users, train_seconds=seconds), 0, 0.0
    state["steps"] = steps_so_far + result.steps
    context.state.config_records[_DPSGD_STATE] = state
    why = nonfinite_reason(result.delta)
    if why is not None:
        seconds = result.train_seconds
        return diverged_update(why, num_examples=data.n_users, train_seconds=seconds), 0, 0.0
    weight = float(data.n_users)
    update = LocalUpdate(
        delta={k: weight * v for k, v in result.delta.items()},
        weight=weight,
        num_examples=data.n_users,
        mean_loss=result.mean_loss,
        train_seconds=result.train_seconds,
    )
    return update, result.steps, result.sample_rate


def _signing_key(context: Context) -> Ed25519PrivateKey | None:
    """This client's co-signing key: ``device-signing.key`` in a device's key folder, else the
    simulated client's key derived from the run's device seed; ``None`` when there is none."""
    if "keys" in context.node_config:
        path = Path(str(context.node_config["keys"])) / DEVICE_KEY_FILE
        return load_signing_key(path) if path.exists() else None
    if "partition-id" not in context.node_config:
        return None
    seed = read_device_seed(Path(str(context.run_config["run-dir"])))
    if seed is None:
        return None
    return simulated_device_key(seed, int(context.node_config["partition-id"]))


@app.query("decrypt")
def decrypt(msg: Message, context: Context) -> Message:
    """A committee member's turn: decrypt, flood and round the server's encrypted sum, and
    co-sign the round when asked (a device keeps its co-signature in its own ledger)."""
    tamper = 0.0
    if "partition-id" in context.node_config:  # fault injection exists in simulations only
        cfg = _run_config(str(context.run_config["run-dir"]))
        if int(context.node_config["partition-id"]) in cfg.simulation.lying_clients:
            tamper = 1.0 + int(context.node_config["partition-id"])  # members differ
    server_round = RoundConfig.read(msg.content.config_records[CONFIG_RECORD]).server_round
    content = decrypt_for_committee(
        msg,
        client_keys(str(_keys_dir(context))),
        tamper=tamper,
        signing_key=_signing_key(context),
        announced=announced_mechanism(context, msg, server_round),
    )
    cosignature = Cosignature.from_wire(content.config_records.get(COSIGNATURE_RECORD))
    if cosignature is not None:
        record_cosignature(context, msg, server_round, cosignature.to_record())
    return Message(content, reply_to=msg)


def _holder(context: Context, msg: Message) -> Holder:
    """This node as a key holder: its share folder, id, signing key, registry and floors.

    A simulated client's folder is ``RUN/keys/holders/<client>``; a device's is its key
    folder. The registry is the run's (a simulation) or the operator's, relayed by the server
    with the request (a device; see docs/design.md on what that trusts).
    """
    signer = _signer(context)
    if signer is None:
        raise ValueError("a key holder needs a device signing key")
    client, key = signer
    registry = _registry(context, msg.content.config_records.get(THRESHOLD_RECORD, ConfigRecord()))
    if is_device(context):
        folder = Path(str(context.node_config["keys"]))
        least = int(context.node_config.get("min-contributors", 2))
        budget = int(context.node_config.get("max-decryptions", 4096))
    else:
        run_dir = Path(str(context.run_config["run-dir"]))
        cfg = _run_config(str(run_dir))
        folder = cfg.encryption.keys_dir(run_dir) / "holders" / str(client)
        least = cfg.encryption.min_contributors
        budget = cfg.encryption.max_decryptions
    return Holder(
        folder=folder,
        client=client,
        signing_key=key,
        registry=registry,
        min_contributors=least,
        max_decryptions=budget,
    )


@app.query("keygen")
def keygen(msg: Message, context: Context) -> Message:
    """A key ceremony step (threshold mode; :mod:`client.threshold`)."""
    return Message(handle_keygen(msg, _holder(context, msg)), reply_to=msg)


@app.query("threshold")
def threshold(msg: Message, context: Context) -> Message:
    """A key holder's commit or decrypt step for one slot (threshold mode)."""
    holder = _holder(context, msg)
    tamper = 0.0
    if "partition-id" in context.node_config:  # fault injection exists in simulations only
        cfg = _run_config(str(context.run_config["run-dir"]))
        if int(context.node_config["partition-id"]) in cfg.simulation.lying_clients:
            tamper = 1.0
    keys = public_keys(str(holder.folder))
    content, stated = handle_threshold(msg, holder, keys, tamper=tamper)
    request = msg.content.config_records.get(COSIGN_REQUEST_RECORD)
    if stated is not None and request is not None:
        total = sum_from_record(msg.content.config_records[HE_SUM_RECORD])
        server_round = RoundConfig.read(msg.content.config_records[CONFIG_RECORD]).server_round
        cosignature = cosign_decryption(
            msg, request, total, holder.signing_key, announced_mechanism(context, msg, server_round)
        )
        if cosignature is not None:
            content[COSIGNATURE_RECORD] = ConfigRecord(dict(cosignature.to_wire()))
            record_cosignature(context, msg, server_round, cosignature.to_record())
    return Message(content, reply_to=msg)


@app.query("tag")
def tag(msg: Message, context: Context) -> Message:
    """Tag this sender's own upload for the key holders' check (threshold mode)."""
    signer = _signer(context)
    if signer is None:
        raise ValueError("threshold mode needs a device signing key")
    config = msg.content.config_records.get(THRESHOLD_RECORD, ConfigRecord())
    data = config.get(HE_PUBLIC_CONTEXT)
    keys = (
        public_keys_from_bytes(data)
        if isinstance(data, bytes)
        else public_keys(str(_keys_dir(context)))
    )
    content = handle_tag(msg, context, keys, client=signer[0], signing_key=signer[1])
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this client's local held-out items."""
    cfg, _, data = _context(context)
    global_state = msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict()
    model_cfg = run_model_config(cfg, _n_items(global_state))
    metrics = EvalMetrics.read(local_metrics(global_state, data, model_config=model_cfg))
    return Message(RecordDict({METRICS_RECORD: metrics.to_record()}), reply_to=msg)


def _n_items(state: dict[str, torch.Tensor]) -> int:
    """Catalogue size: the input width of the first encoder layer, ``(hidden, n_items)``."""
    return int(state["encoder.0.weight"].shape[1])

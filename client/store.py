"""A device's own store: its history file, its privacy ledger and the last global model.

A SuperNode started by ``fedrec client join`` carries its history in its node config
(``data = "/path/HISTORY.csv"``, ``user,item[,rating][,timestamp]``, the plain CSV of
:mod:`common.data.readers`). The ClientApp then trains on that file only. It cannot read the
server's run folder, so the run config and the catalogue (the model's item ids) come with each
message (:mod:`common.run.info`); the device maps its items onto the catalogue's columns and
skips items the catalogue lacks.

Next to the history the device keeps, written atomically:

- ``HISTORY.csv.fedrec-ledger.json``: one line per round it took part in (run, round, the DP
  mechanism the server announced: mode, z, q, delta, C, m, and its epsilon when it guards a
  budget), with the ``cosignature`` it returned when it sat on the round's decryption
  committee (:func:`record_cosignature`). The server's ledger counts participants; this is the
  device's own record, which ``fedrec audit verify RUN --device-ledger FILE`` checks the
  server's ledger against (:mod:`common.privacy.device`).
- ``HISTORY.csv.fedrec-model.pt``: the last global model it received (a ``model.pt``
  checkpoint), so ``fedrec recommend --model HISTORY.csv.fedrec-model.pt`` works offline.

:func:`device_mod` does the bookkeeping around every train and evaluate call; a simulated
client (no ``data`` in its node config) passes through it untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from client.local import LocalData, split_local
from common.errors import DataError
from common.io import atomic_write_json
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DP_CLIP,
    DP_DELTA,
    DP_DENOMINATOR,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DPSGD_CLIP,
    DPSGD_DELTA,
    DPSGD_NOISE_MULTIPLIER,
    DPSGD_SAMPLE_RATE,
    DPSGD_STEPS,
    METRICS_RECORD,
    RELEASE,
    RELEASE_STATISTIC,
    SERVER_ROUND,
    is_refusal,
    read_accounting_noise_multiplier,
    read_float,
    read_optional_float,
    read_optional_int,
)
from common.rounds import split_seed
from common.run.config import RunConfig
from common.run.info import ITEM_IDS_KEY, RUN_CONFIG_KEY, RunInfo, read_run_info

__all__ = [
    "DATA_KEY",
    "DeviceFiles",
    "announced_mechanism",
    "device_client_id",
    "device_mod",
    "device_run_config",
    "is_device",
    "local_data_for",
    "read_history",
    "read_ledger",
    "record_cosignature",
]

logger = logging.getLogger(__name__)

DATA_KEY = "data"
"""Node-config key of the device's history file."""

_RUN_INFO_STATE = "fedrec-run-info"  # context.state, for the length of one call only
_LEDGER_FORMAT = 1


@dataclass(frozen=True)
class DeviceFiles:
    """Where a device keeps its files: next to its history."""

    history: Path

    @property
    def ledger(self) -> Path:
        """``HISTORY.fedrec-ledger.json``: the rounds this device took part in."""
        return self.history.with_name(self.history.name + ".fedrec-ledger.json")

    @property
    def model(self) -> Path:
        """``HISTORY.fedrec-model.pt``: the last global model received."""
        return self.history.with_name(self.history.name + ".fedrec-model.pt")


def is_device(context: Context) -> bool:
    """True for a SuperNode of ``fedrec client join`` (its node config names a history)."""
    return DATA_KEY in context.node_config


def _files(context: Context) -> DeviceFiles:
    return DeviceFiles(Path(str(context.node_config[DATA_KEY])).expanduser().resolve())


def _run_info(context: Context) -> RunInfo:
    stash = context.state.config_records.get(_RUN_INFO_STATE)
    info = read_run_info(stash) if stash is not None else None
    if info is None:
        raise RuntimeError(
            "this device got no run config and catalogue: the ServerApp sends them with every "
            "train and evaluate message (fedrec >= 0.1 with run-dir on the server)"
        )
    return info


def device_run_config(context: Context) -> RunConfig:
    """The run config the server sent with the message being handled."""
    return _run_info(context)[0]


def device_client_id(context: Context) -> int:
    """A stable number for this device's local seeds: its node id, folded to 31 bits."""
    return int(context.node_id) % (2**31 - 1)


@lru_cache(maxsize=4)
def read_history(path: Path, item_ids: tuple[str, ...], *, min_rating: float) -> sp.csr_matrix:
    """A history file as binary rows over the catalogue: ``(n_users, len(item_ids))``.

    Rows with a rating below ``min_rating`` or an invalid rating are not positives; items the
    catalogue lacks are skipped (and counted in the log); users left with no positive are
    dropped. A device usually holds one user, a silo many.

    Raises
    ------
    DataError
        If the file cannot be read, or no positive of it is in the catalogue.
    """
    from common.data.readers import detect_source, read_source

    raw, _ = read_source(detect_source(path))
    keep = np.ones(raw.n_rows, dtype=bool)
    if raw.ratings is not None:
        keep &= np.isfinite(raw.ratings) & (raw.ratings >= min_rating)
    column = {item: i for i, item in enumerate(item_ids)}
    cols = np.array([column.get(str(item), -1) for item in raw.items], dtype=np.int64)
    unknown = int(np.count_nonzero(keep & (cols < 0)))
    keep &= cols >= 0
    if not keep.any():
        raise DataError(
            f"no positive interaction (rating >= {min_rating:g}) with an item of the run's "
            f"catalogue ({len(item_ids)} items)",
            path=path,
        )
    users, rows = np.unique(np.asarray(raw.users)[keep].astype(str), return_inverse=True)
    data = np.ones(int(keep.sum()), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, cols[keep])), shape=(len(users), len(item_ids)))
    matrix.data[:] = 1.0  # repeated (user, item) rows count once
    if unknown:
        logger.info("%s: skipped %d positives of items outside the catalogue", path, unknown)
    return matrix


def local_data_for(context: Context) -> LocalData:
    """This device's rows, split into what it trains on and what it holds out to evaluate."""
    cfg, item_ids = _run_info(context)
    rows = read_history(_files(context).history, item_ids, min_rating=cfg.data.min_rating)
    seed = split_seed(cfg.seed, device_client_id(context))
    return split_local(rows, fraction=cfg.data.client_holdout_fraction, seed=seed)


# --------------------------------------------------------------------------------- the ledger


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The participations recorded in a device ledger (empty when there is none yet)."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("format") != _LEDGER_FORMAT:
        raise DataError(f"unknown device ledger format {payload.get('format')!r}", path=path)
    return list(payload["participations"])


def _mechanism(config: ConfigRecord, reply: Message) -> dict[str, Any]:
    """The DP mechanism of a round, as the server announced it (and the reply measured)."""
    # only the keys the ledger records: the DP mod or the DP-SGD path has checked the rest
    name = CONFIG_RECORD
    if DP_CLIP in config:  # client-level DP-FedAvg
        announced = {  # what the server's ledger states too: z as configured, m = qN
            "announced_noise_multiplier": read_optional_float(
                config, DP_NOISE_MULTIPLIER, record_name=name
            ),
            "expected_participants": read_optional_float(config, DP_DENOMINATOR, record_name=name),
        }
        return {
            "mode": "client",
            "noise_multiplier": read_accounting_noise_multiplier(config),
            **{key: value for key, value in announced.items() if value is not None},
            "sample_rate": read_float(config, DP_SAMPLE_RATE, record_name=name),
            "steps": 1,
            "delta": read_float(config, DP_DELTA, record_name=name),
            "clip": read_float(config, DP_CLIP, record_name=name),
        }
    if DPSGD_CLIP in config:  # example-level DP-SGD in a silo
        metrics = reply.content.metric_records.get(METRICS_RECORD, MetricRecord())
        return {
            "mode": "example",
            "noise_multiplier": read_float(config, DPSGD_NOISE_MULTIPLIER, record_name=name),
            "sample_rate": read_optional_float(
                metrics, DPSGD_SAMPLE_RATE, record_name=METRICS_RECORD
            ),
            "steps": read_optional_int(metrics, DPSGD_STEPS, record_name=METRICS_RECORD),
            "delta": read_float(config, DPSGD_DELTA, record_name=name),
            "clip": read_float(config, DPSGD_CLIP, record_name=name),
        }
    return {"mode": "off"}


def _took_part(reply: Message) -> bool:
    if reply.has_error():
        return False
    return not is_refusal(reply.content.metric_records.get(METRICS_RECORD))


def _record_participation(
    files: DeviceFiles, msg: Message, reply: Message, context: Context, cfg: RunConfig
) -> None:
    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    entry: dict[str, Any] = {
        "run": cfg.name,
        "flwr_run_id": int(msg.metadata.run_id),
        "round": read_optional_int(config, SERVER_ROUND, record_name=CONFIG_RECORD) or 0,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **_mechanism(config, reply),
    }
    release = config.get(RELEASE)
    if isinstance(release, str):  # a warm-start release (its "round" is its position)
        entry["release"] = release
    dp_state = context.state.config_records.get("fedrec-dp")  # client.dp_mod's own count
    if dp_state is not None and "epsilon" in dp_state:
        entry["epsilon"] = read_float(dp_state, "epsilon", record_name="fedrec-dp")
    _write_ledger(files, [*read_ledger(files.ledger), entry])


def _write_ledger(files: DeviceFiles, entries: list[dict[str, Any]]) -> None:
    atomic_write_json(
        files.ledger,
        {"format": _LEDGER_FORMAT, "history": files.history.name, "participations": entries},
    )


def _entry_of(entries: list[dict[str, Any]], msg: Message, server_round: int) -> int | None:
    """Index of this Flower run's entry for ``server_round`` (the last one), if any."""
    run_id = int(msg.metadata.run_id)
    for i in range(len(entries) - 1, -1, -1):
        entry = entries[i]
        if entry.get("flwr_run_id") == run_id and entry.get("round") == server_round:
            return i
    return None


def announced_mechanism(context: Context, msg: Message, server_round: int) -> dict[str, float]:
    """What the server announced to this device for ``server_round`` (its ledger entry): the
    fields a committee member compares a co-signing request with. Empty for a simulated client
    or a round the device has no record of."""
    if not is_device(context):
        return {}
    entries = read_ledger(_files(context).ledger)
    index = _entry_of(entries, msg, server_round)
    if index is None:
        return {}
    entry = entries[index]
    names = {
        "noise_multiplier": "announced_noise_multiplier",
        "clip": "clip",
        "sample_rate": "sample_rate",
        "expected_participants": "expected_participants",
        "delta": "delta",
    }
    return {
        field: float(entry[key])
        for field, key in names.items()
        if isinstance(entry.get(key), int | float)
    }


def record_cosignature(
    context: Context, msg: Message, server_round: int, cosignature: dict[str, Any]
) -> None:
    """Keep this device's co-signature of ``server_round`` (a ledger record of
    :class:`common.privacy.signing.Cosignature`) in its entry for that round."""
    if not is_device(context):
        return
    files = _files(context)
    entries = read_ledger(files.ledger)
    index = _entry_of(entries, msg, server_round)
    if index is None:
        logger.warning("round %d: co-signed, but this device has no record of it", server_round)
        return
    entries[index] = {**entries[index], "cosignature": cosignature}
    _write_ledger(files, entries)


def _save_global_model(
    files: DeviceFiles, msg: Message, cfg: RunConfig, items: tuple[str, ...]
) -> None:
    from common.checkpoint import Checkpoint, model_provenance, save_checkpoint
    from common.run.config import run_model_config

    record = msg.content.array_records.get(ARRAYS_RECORD)
    if record is None or RELEASE_STATISTIC in record:  # a warm-start release carries no model
        return
    state = record.to_torch_state_dict()
    n_items = int(state["encoder.0.weight"].shape[1])  # (hidden, n_items)
    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    server_round = read_optional_int(config, SERVER_ROUND, record_name=CONFIG_RECORD) or 0
    evaluated = msg.metadata.message_type == MessageType.EVALUATE
    after_round = server_round if evaluated else server_round - 1
    save_checkpoint(
        files.model,
        Checkpoint(
            model_config=run_model_config(cfg, n_items).to_dict(),
            state_dict=state,
            item_ids=list(items),
            item_titles=[""] * len(items),
            dataset={"name": cfg.data.dataset, "sha256": ""},
            metadata={
                "trainer": "federated (copy received by a device)",
                "run": cfg.name,
                "flwr_run_id": int(msg.metadata.run_id),
                # a train message carries the model before its round, an evaluate one after
                "after_round": after_round,
                # the server's ledger stays with the server: a device names the run and round
                **model_provenance(run_id=cfg.name, last_round=after_round, ledger=None),
            },
        ),
    )


def device_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Give a device's train and evaluate calls the run's config and catalogue; afterwards
    save the global model it received and record the round in its ledger if it took part.

    The outermost mod of the ClientApp: the DP and HE mods inside it already read the
    device's run config (budget, keys). Simulated clients pass through unchanged.
    """
    kind = msg.metadata.message_type
    if not is_device(context) or kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(msg, context)
    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    info = read_run_info(config)
    if info is None:
        raise RuntimeError("the server sent no run config and catalogue to this device")
    cfg, items = info
    context.state.config_records[_RUN_INFO_STATE] = ConfigRecord(
        {key: config[key] for key in (RUN_CONFIG_KEY, ITEM_IDS_KEY)}
    )
    try:
        reply = call_next(msg, context)
    finally:
        del context.state.config_records[_RUN_INFO_STATE]  # resent with every message
    files = _files(context)
    _save_global_model(files, msg, cfg, items)
    if kind == MessageType.TRAIN and _took_part(reply):
        _record_participation(files, msg, reply, context, cfg)
    return reply

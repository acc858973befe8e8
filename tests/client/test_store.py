"""A device's store: its history mapped onto the catalogue, its ledger and its model copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client.store import (
    DeviceFiles,
    device_mod,
    device_run_config,
    local_data_for,
    read_history,
    read_ledger,
)
from common.checkpoint import load_checkpoint
from common.errors import DataError
from common.model import build_model
from common.run.config import load_run_config
from common.run.info import ITEM_IDS_KEY, RUN_CONFIG_KEY, read_run_info, run_info_config

pytestmark = pytest.mark.usefixtures("task_identity")

ITEMS = ("10", "20", "30", "40", "50", "60")


def _history(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "history.csv"
    path.write_text(text)
    return path


def test_history_maps_onto_catalogue_columns_and_skips_what_is_not_a_positive(
    tmp_path: Path,
) -> None:
    # Prepare: item 99 is not in the catalogue; a rating of 2 is not a positive; 30 repeats
    path = _history(tmp_path, "user,item,rating\nu,30,5\nu,99,5\nu,10,4\nu,20,2\nu,30,4\nv,60,5\n")

    # Execute
    rows = read_history(path, ITEMS, min_rating=4.0)

    # Assert: users in id order, columns in catalogue order, binary
    assert rows.shape == (2, 6)
    np.testing.assert_array_equal(rows.toarray(), [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]])


def test_history_without_any_catalogue_item_is_refused(tmp_path: Path) -> None:
    path = _history(tmp_path, "u,98\nu,99\n")
    with pytest.raises(DataError, match="catalogue"):
        read_history(path, ITEMS, min_rating=4.0)


def test_run_info_round_trips_config_and_catalogue() -> None:
    cfg = load_run_config(None, ["model.dims=[16,8]", "privacy.client_budget=3"])
    info = read_run_info(run_info_config(cfg, ITEMS))
    assert info == (cfg, ITEMS)
    assert read_run_info({}) is None
    with pytest.raises(ValueError, match="both"):
        read_run_info({RUN_CONFIG_KEY: "rounds = 3"})


def _message(kind: str, cfg_sets: list[str], *, server_round: int = 2) -> Message:
    cfg = load_run_config(None, ["model.dims=[4,2]", *cfg_sets])
    weights = build_model(cfg.model.to_model_config(len(ITEMS))).state_dict()
    config = ConfigRecord({"server-round": server_round, **run_info_config(cfg, ITEMS)})
    if kind == MessageType.TRAIN:
        config.update({"dp-clip": 1.0, "dp-noise-multiplier": 1.2, "dp-sample-rate": 0.5})
        config.update({"dp-delta": 1e-3})
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    return Message(content, dst_node_id=7, message_type=kind)


def _device(history: Path) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"data": str(history)}, state=RecordDict(), run_config={}
    )


def test_device_mod_gives_the_call_its_data_then_keeps_ledger_and_model(tmp_path: Path) -> None:
    # Prepare
    history = _history(tmp_path, "user,item\nu,10\nu,20\nu,30\nu,40\nu,50\nv,60\n")
    context = _device(history)
    seen = {}

    def train(msg: Message, ctx: Context) -> Message:
        seen["budget"] = device_run_config(ctx).privacy.client_budget
        seen["users"] = local_data_for(ctx).n_users
        metrics = MetricRecord({"weight": 1.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    # Execute: two train rounds, then the final evaluation
    for server_round in (1, 2):
        msg = _message(MessageType.TRAIN, ["privacy.client_budget=5"], server_round=server_round)
        device_mod(msg, context, train)
    final = _message(MessageType.EVALUATE, [], server_round=2)
    device_mod(final, context, lambda m, c: Message(RecordDict(), reply_to=m))

    # Assert
    assert seen == {"budget": 5.0, "users": 2}
    files = DeviceFiles(history)
    ledger = read_ledger(files.ledger)
    assert [(e["round"], e["mode"], e["noise_multiplier"]) for e in ledger] == [
        (1, "client", 1.2),
        (2, "client", 1.2),
    ]
    ckpt = load_checkpoint(files.model)
    assert ckpt.item_ids == list(ITEMS) and ckpt.metadata["after_round"] == 2
    sent = final.content.array_records["arrays"].to_torch_state_dict()
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sent.items())
    assert "fedrec-run-info" not in context.state.config_records  # nothing kept between calls


def test_device_mod_does_not_record_a_refused_or_failed_round(tmp_path: Path) -> None:
    history = _history(tmp_path, "u,10\nu,20\n")
    refused = MetricRecord({"refused": 1, "weight": 0.0})
    msg = _message(MessageType.TRAIN, [])
    device_mod(
        msg, _device(history), lambda m, c: Message(RecordDict({"metrics": refused}), reply_to=m)
    )
    assert read_ledger(DeviceFiles(history).ledger) == []


def test_simulated_clients_pass_through_untouched() -> None:
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    msg = _message(MessageType.TRAIN, [])
    reply = device_mod(msg, context, lambda m, c: Message(RecordDict(), reply_to=m))
    assert not reply.has_error() and ITEM_IDS_KEY in msg.content.config_records["config"]

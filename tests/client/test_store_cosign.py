"""A device keeps what it was announced and its committee co-signature in its own ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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
    announced_mechanism,
    device_mod,
    read_ledger,
    record_cosignature,
)
from common.model import build_model
from common.privacy.device import read_device_ledger
from common.privacy.signing import Cosignature, committee_statement
from common.run.config import load_run_config
from common.run.info import run_info_config

pytestmark = pytest.mark.usefixtures("task_identity")

ITEMS = ("10", "20", "30")
ANNOUNCED = {"dp-clip": 0.5, "dp-noise-multiplier": 1.2, "dp-sample-rate": 0.5}


def _train_message(server_round: int) -> Message:
    cfg = load_run_config(None, ["model.dims=[4,2]"])
    weights = build_model(cfg.model.to_model_config(len(ITEMS))).state_dict()
    config = ConfigRecord({"server-round": server_round, **run_info_config(cfg, ITEMS)})
    config.update({**ANNOUNCED, "dp-accounting-noise-multiplier": 1.0})
    config.update({"dp-delta": 1e-3, "dp-denominator": 22.0})
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_run_id"] = 5
    return msg


def test_a_device_records_the_announced_mechanism_and_its_cosignature(tmp_path: Path) -> None:
    # Prepare: a device that trained in round 1
    history = tmp_path / "history.csv"
    history.write_text("user,item\nu,10\nu,20\nu,30\n")
    context = Context(
        run_id=5, node_id=7, node_config={"data": str(history)}, state=RecordDict(), run_config={}
    )
    msg = _train_message(1)
    metrics = MetricRecord({"weight": 1.0})
    device_mod(msg, context, lambda m, c: Message(RecordDict({"metrics": metrics}), reply_to=m))

    # Execute: what it compares a co-signing request with, then its co-signature
    told = announced_mechanism(context, msg, 1)
    statement = committee_statement(
        run_id="run",
        server_key="00" * 32,
        server_round=1,
        contributors=20,
        sum_sha256="ab" * 32,
        noise_multiplier=1.2,
        clip=0.5,
        sample_rate=0.5,
        expected_participants=22.0,
        delta=1e-3,
    )
    cosignature = Cosignature.make(Ed25519PrivateKey.generate(), statement)
    record_cosignature(context, msg, 1, cosignature.to_record())

    # Assert
    assert told == {
        "noise_multiplier": 1.2,
        "clip": 0.5,
        "sample_rate": 0.5,
        "expected_participants": 22.0,
        "delta": 1e-3,
    }
    files = DeviceFiles(history)
    (entry,) = read_ledger(files.ledger)
    assert entry["noise_multiplier"] == 1.0 and entry["announced_noise_multiplier"] == 1.2
    assert entry["cosignature"] == cosignature.to_record()
    assert read_device_ledger(files.ledger) == [entry]  # the auditor reads the same file
    assert announced_mechanism(context, msg, 2) == {}  # no record of round 2

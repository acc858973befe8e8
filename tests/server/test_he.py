"""The encrypted sum of a round: ciphertexts added by the server, decrypted by a committee."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.he_mod import decrypt_for_committee
from common.he import (
    HE_RECORD_KEY,
    ClientKeys,
    ParamSet,
    encrypt_update,
    generate_keys,
    to_record,
)
from server.he import CommitteeSum

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPES = {"w": (3, 4), "b": (4,)}


@pytest.fixture(scope="module")
def keys() -> ClientKeys:
    return generate_keys(ParamSet.FEDREC.params)


class _Committee:
    """A grid whose nodes answer decryption requests as fedrec clients do (some may lie)."""

    def __init__(self, keys: ClientKeys, tamper: dict[int, float]) -> None:
        self.keys, self.tamper, self.asked = keys, tamper, []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.asked.append(node)
            content = decrypt_for_committee(msg, self.keys, tamper=self.tamper.get(node, 0.0))
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node  # as if the node had answered
            replies.append(reply)
        return replies


def _reply(node: int, record: ConfigRecord) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"weight": 1.0})
    reply = Message(RecordDict({HE_RECORD_KEY: record, "metrics": metrics}), reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _updates(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {k: rng.normal(0, 1e-2, size=s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


def _summer(keys: ClientKeys, grid: _Committee) -> CommitteeSum:
    summer = CommitteeSum(keys.public(), grid, committee_size=2, timeout=10, seed=0)  # type: ignore[arg-type]
    summer.begin(1, {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()})
    return summer


def test_sum_decrypted_by_committee_matches_plaintext_and_bad_ciphertext_is_left_out(
    keys: ClientKeys,
) -> None:
    grid = _Committee(keys, tamper={})
    summer = _summer(keys, grid)
    updates = _updates(3)
    for node, update in enumerate(updates, start=1):
        assert summer.add(_reply(node, to_record(encrypt_update(update, keys=keys)))) is None
    bad = to_record(encrypt_update(updates[0], keys=keys))
    bad["chunks"] = [b"\x00garbage"]
    reason = summer.add(_reply(9, bad))
    assert reason is not None and "rejected" in reason
    plain = _reply(10, ConfigRecord())
    plain.content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3, 4)})})
    assert "no encrypted update" in (summer.add(plain) or "")

    total = summer.total()

    assert total is not None and len(set(grid.asked)) == 2 and set(grid.asked) <= {1, 2, 3}
    for k in SHAPES:
        expected = sum(u[k].astype(np.float64) for u in updates)
        np.testing.assert_allclose(total[k], expected, atol=5e-5)
    assert summer.timings()["he-aggregate-seconds"] > 0


def test_committee_disagreement_discards_the_sum(keys: ClientKeys) -> None:
    grid = _Committee(keys, tamper={1: 1.0, 2: 2.0, 3: 3.0})  # everyone lies differently
    summer = _summer(keys, grid)
    for node, update in enumerate(_updates(3), start=1):
        summer.add(_reply(node, to_record(encrypt_update(update, keys=keys))))
    assert summer.total() is None
    assert summer.why_not() == "committee outputs disagree"


def test_too_few_contributors_for_a_committee(keys: ClientKeys) -> None:
    summer = _summer(keys, _Committee(keys, tamper={}))
    summer.add(_reply(1, to_record(encrypt_update(_updates(1)[0], keys=keys))))
    assert summer.total() is None and "committee needs 2" in summer.why_not()


def test_server_keys_cannot_decrypt(keys: ClientKeys) -> None:
    request = Message(RecordDict(), dst_node_id=1, message_type="query.decrypt")
    summer = _summer(keys, _Committee(keys, tamper={}))
    for node, update in enumerate(_updates(2), start=1):
        summer.add(_reply(node, to_record(encrypt_update(update, keys=keys))))
    assert summer._acc is not None
    request.content = RecordDict({"he-sum": to_record(summer._acc.result())})
    with pytest.raises(ValueError, match="secret key"):
        decrypt_for_committee(request, keys.public())  # type: ignore[arg-type]

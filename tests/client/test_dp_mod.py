"""The client DP mod: clip, noise share, fixed denominator, budget refusal."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from client.dp_mod import make_client_dp_mod
from common.privacy import client_epsilon_after

pytestmark = pytest.mark.usefixtures("task_identity")


def _instruction(*, noise_std: float, server_round: int = 1) -> Message:
    config = ConfigRecord(
        {
            "server-round": server_round,
            "dp-clip": 1.0,
            "dp-noise-multiplier": 1.0,
            "dp-noise-std": noise_std,
            "dp-denominator": 4.0,
            "dp-sample-rate": 0.1,
            "dp-delta": 1e-4,
        }
    )
    content = RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)]), "config": config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _plain_train(update: list[float], weight: float):  # type: ignore[no-untyped-def]
    calls = []

    def call_next(msg: Message, context: Context) -> Message:
        calls.append(msg)
        arrays = ArrayRecord([weight * np.asarray(update, dtype=np.float32)])
        metrics = MetricRecord({"weight": weight, "num-examples": int(weight), "loss": 1.0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return call_next, calls


def test_update_is_unweighted_clipped_and_divided_by_m() -> None:
    mod = make_client_dp_mod(lambda ctx: None)
    # weighted delta 3 * (3, 4): unweighted norm 5 -> clipped to norm 1 -> (0.6, 0.8) -> / m=4
    call_next, calls = _plain_train([3.0, 4.0], weight=3.0)
    reply = mod(_instruction(noise_std=0.0), _context(), call_next)
    out = reply.content.array_records["arrays"].to_numpy_ndarrays()[0]
    np.testing.assert_allclose(out, [0.15, 0.2], rtol=1e-6)
    assert reply.content.metric_records["metrics"]["weight"] == pytest.approx(0.25)
    assert len(calls) == 1


def test_noise_share_has_the_announced_std() -> None:
    mod = make_client_dp_mod(lambda ctx: None)
    stds = []
    for _ in range(400):
        call_next, _ = _plain_train([0.0, 0.0], weight=1.0)
        reply = mod(_instruction(noise_std=2.0), _context(), call_next)
        stds.extend(reply.content.array_records["arrays"].to_numpy_ndarrays()[0] * 4.0)
    # 800 draws of N(0, 2^2): the sample std is within 10% with overwhelming probability
    assert np.std(stds) == pytest.approx(2.0, rel=0.1)


def test_client_refuses_past_its_budget_without_training() -> None:
    eps_round_5 = client_epsilon_after(
        server_round=5, noise_multiplier=1.0, sample_rate=0.1, delta=1e-4
    )
    mod = make_client_dp_mod(lambda ctx: eps_round_5 * 0.99)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)
    reply = mod(_instruction(noise_std=0.0, server_round=5), _context(), call_next)
    assert calls == []
    metrics = reply.content.metric_records["metrics"]
    assert metrics["refused"] == 1
    assert "arrays" not in reply.content.array_records
    # one round earlier the same budget still allows training
    reply = mod(_instruction(noise_std=0.0, server_round=4), _context(), call_next)
    assert len(calls) == 1 and "refused" not in reply.content.metric_records["metrics"]


def test_without_dp_config_the_mod_is_transparent() -> None:
    mod = make_client_dp_mod(lambda ctx: 0.001)
    call_next, calls = _plain_train([3.0, 4.0], weight=2.0)
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.zeros(2, dtype=np.float32)]),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    reply = mod(msg, _context(), call_next)
    np.testing.assert_allclose(reply.content.array_records["arrays"].to_numpy_ndarrays()[0], [6, 8])
    assert len(calls) == 1

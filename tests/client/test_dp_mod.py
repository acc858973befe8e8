"""The client DP mod: clip, noise share, fixed denominator, budget refusal, seeded noise."""

from __future__ import annotations

import math
from pathlib import Path

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

from client.app import _noise_seed
from client.dp_mod import SeededNoiseRefusedError, make_client_dp_mod, seeded_noise_rng
from client.store import device_mod
from common.privacy import gaussian_epsilon
from common.protocol import HE_FINGERPRINT
from common.run.config import load_run_config
from common.run.info import run_info_config

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


def _context(**node_config: str | int) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


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
    # plaintext: the aggregator sees this client's own share, z / sqrt(m) = 1 / 2, so each round
    # it takes part in adds 1 / z^2 = 4 to its mu^2; a budget between 4 and 5 rounds' epsilon
    eps_4, eps_5 = (gaussian_epsilon(math.sqrt(4.0 * k), 1e-4) for k in (4, 5))
    mod = make_client_dp_mod(lambda ctx: (eps_4 + eps_5) / 2)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)
    context = _context()
    for server_round in range(1, 5):
        reply = mod(_instruction(noise_std=0.0, server_round=server_round), context, call_next)
        assert "refused" not in reply.content.metric_records["metrics"]
    assert len(calls) == 4
    assert context.state.config_records["fedrec-dp"]["inverse_variance"] == pytest.approx(16.0)
    reply = mod(_instruction(noise_std=0.0, server_round=5), context, call_next)
    assert len(calls) == 4  # refused without training
    metrics = reply.content.metric_records["metrics"]
    assert metrics["refused"] == 1
    assert metrics["epsilon-if-trained"] == pytest.approx(eps_5)
    assert "arrays" not in reply.content.array_records
    # a refusal is not charged: the state still holds four participations
    assert context.state.config_records["fedrec-dp"]["inverse_variance"] == pytest.approx(16.0)


def test_the_guard_counts_only_the_rounds_this_client_took_part_in() -> None:
    # the round number does not matter (no amplification, no count of unseen rounds): a fresh
    # client at round 50 is charged its first participation only
    eps_1 = gaussian_epsilon(2.0, 1e-4)
    mod = make_client_dp_mod(lambda ctx: eps_1 * 1.01)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)
    context = _context()
    reply = mod(_instruction(noise_std=0.0, server_round=50), context, call_next)
    assert len(calls) == 1 and "refused" not in reply.content.metric_records["metrics"]
    reply = mod(_instruction(noise_std=0.0, server_round=51), context, call_next)
    assert len(calls) == 1 and reply.content.metric_records["metrics"]["refused"] == 1


def test_an_encrypted_run_is_guarded_with_the_announced_floor_z() -> None:
    # with the HE fingerprint the aggregator sees only the decrypted sum: z_floor = 1.0 (the
    # accounting z, here the configured one), 1 / z^2 = 1 per round instead of 4
    eps = [gaussian_epsilon(math.sqrt(k), 1e-4) for k in (1, 2, 3, 4, 5)]
    mod = make_client_dp_mod(lambda ctx: (eps[3] + eps[4]) / 2)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)
    context = _context()
    for server_round in range(1, 6):
        msg = _instruction(noise_std=0.0, server_round=server_round)
        msg.content.config_records["config"][HE_FINGERPRINT] = "abc"
        reply = mod(msg, context, call_next)
    assert len(calls) == 4
    assert reply.content.metric_records["metrics"]["epsilon-if-trained"] == pytest.approx(eps[4])
    # the same budget in plaintext allows one round only (mu^2 = 4 per round)
    plain = _context()
    for server_round in (1, 2):
        reply = mod(_instruction(noise_std=0.0, server_round=server_round), plain, call_next)
    assert len(calls) == 5 and reply.content.metric_records["metrics"]["refused"] == 1


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


def test_noise_seed_draws_a_simulated_clients_noise_from_round_and_client() -> None:
    mod = make_client_dp_mod(lambda ctx: None, lambda ctx: 11)
    outs = []
    for _ in range(2):
        call_next, _ = _plain_train([0.0, 0.0], weight=1.0)
        reply = mod(
            _instruction(noise_std=2.0, server_round=3), _context(**{"partition-id": 5}), call_next
        )
        outs.append(reply.content.array_records["arrays"].to_numpy_ndarrays()[0])

    # the same draws twice: N(0, 2^2) from default_rng([11, 3, 5]), divided by m = 4
    expected = seeded_noise_rng(11, server_round=3, client_id=5).normal(0.0, 2.0, size=2) / 4.0
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(outs[0], outs[1])
    call_next, _ = _plain_train([0.0, 0.0], weight=1.0)
    other = mod(
        _instruction(noise_std=2.0, server_round=3), _context(**{"partition-id": 6}), call_next
    )
    assert not np.array_equal(other.content.array_records["arrays"].to_numpy_ndarrays()[0], outs[0])


def test_a_release_draws_seeded_noise_apart_from_the_training_rounds() -> None:
    mod = make_client_dp_mod(lambda ctx: None, lambda ctx: 11)
    outs = {}
    for server_round, release in ((1, None), (1, "popularity"), (2, "cooccurrence")):
        msg = _instruction(noise_std=2.0, server_round=server_round)
        if release is not None:
            msg.content.config_records["config"]["release"] = release
        call_next, _ = _plain_train([0.0, 0.0], weight=1.0)
        reply = mod(msg, _context(**{"partition-id": 5}), call_next)
        outs[release] = reply.content.array_records["arrays"].to_numpy_ndarrays()[0]

    # release 1 has its own stream, not round 1's; release 2 another one
    rng = seeded_noise_rng(11, server_round=1, client_id=5, release=True)
    np.testing.assert_allclose(outs["popularity"], rng.normal(0.0, 2.0, size=2) / 4.0, rtol=1e-6)
    assert not np.array_equal(outs["popularity"], outs[None])
    assert not np.array_equal(outs["popularity"], outs["cooccurrence"])


@pytest.mark.parametrize(
    "node_config",
    [{"data": "/home/me/history.csv"}, {"data": "h.csv", "partition-id": 0}, {}],
    ids=["device", "device-with-partition-id", "no-partition-id"],
)
def test_a_node_that_is_not_a_simulated_client_refuses_a_noise_seed(
    node_config: dict[str, str | int],
) -> None:
    mod = make_client_dp_mod(lambda ctx: None, lambda ctx: 11)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)
    with pytest.raises(SeededNoiseRefusedError, match="noise_seed = 11"):
        mod(_instruction(noise_std=1.0), _context(**node_config), call_next)
    assert calls == []  # refused before training: nothing is computed, nothing sent


def test_without_a_noise_seed_a_device_trains_with_os_entropy() -> None:
    mod = make_client_dp_mod(lambda ctx: None, lambda ctx: None)
    call_next, calls = _plain_train([0.0, 0.0], weight=1.0)
    reply = mod(_instruction(noise_std=1.0), _context(data="h.csv"), call_next)
    assert len(calls) == 1
    assert np.all(reply.content.array_records["arrays"].to_numpy_ndarrays()[0] != 0.0)


def test_a_device_refuses_a_noise_seed_that_comes_with_the_run_config(tmp_path: Path) -> None:
    """The ClientApp's own lookup: a device reads the seed from the server-sent run config."""
    history = tmp_path / "history.csv"
    history.write_text("user,item\nu,10\nu,20\n")
    sets = ["privacy.mode=client", "privacy.noise_multiplier=1.0", "privacy.noise_seed=3"]
    msg = _instruction(noise_std=1.0)
    msg.content.config_records["config"].update(
        run_info_config(load_run_config(None, sets), ("10", "20"))
    )
    mod = make_client_dp_mod(lambda ctx: None, _noise_seed)
    call_next, calls = _plain_train([1.0, 1.0], weight=1.0)

    with pytest.raises(SeededNoiseRefusedError, match="noise_seed = 3"):
        device_mod(msg, _context(data=str(history)), lambda m, c: mod(m, c, call_next))

    assert calls == []

"""Cohort sampling and the pre-weighted aggregation of the plain strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from common.run.config import Sampling, ServerConfig, ServerOptimizer
from server.optimizer import ServerOpt
from server.strategy import FedRecStrategy, TrainResult, sample_cohort

if TYPE_CHECKING:
    from tests.server.conftest import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


BIG_IDS = [2**64 - 5, 2**63 + 7, 12, 99]  # Flower node ids are unsigned 64-bit


def test_poisson_sampling_rate_and_determinism() -> None:
    cfg = ServerConfig(sampling=Sampling.POISSON, sample_rate=0.1)
    nodes = list(range(20_000))
    a = sample_cohort(nodes, cfg, np.random.default_rng([0, 1]))
    b = sample_cohort(nodes, cfg, np.random.default_rng([0, 1]))
    assert a == b
    # Binomial(20000, 0.1): mean 2000, sd 42; 5 sd is a generous bound
    assert abs(len(a) - 2000) < 5 * 42
    assert len(set(a)) == len(a)


def test_fixed_sampling_handles_uint64_ids() -> None:
    cfg = ServerConfig(sampling=Sampling.FIXED, clients_per_round=3)
    cohort = sample_cohort(BIG_IDS, cfg, np.random.default_rng(0))
    assert len(cohort) == 3 and set(cohort) <= set(BIG_IDS)
    assert all(isinstance(n, int) for n in cohort)


def _strategy(**server: object) -> FedRecStrategy:
    cfg = ServerConfig(optimizer=ServerOptimizer.FEDAVG, lr=1.0, **server)  # type: ignore[arg-type]
    return FedRecStrategy(cfg, ServerOpt(kind=cfg.optimizer, lr=1.0), seed=0, node_ids=[1, 2, 3])


def _reply(instruction: Message, delta: list[float], weight: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.asarray(delta, dtype=np.float32)]),
            "metrics": MetricRecord({"weight": weight, "num-examples": int(weight)}),
        }
    )
    return Message(content, reply_to=instruction)


def _train(strategy: FedRecStrategy, grid: FakeGrid) -> TrainResult:
    arrays = ArrayRecord([np.zeros(2, dtype=np.float32)])
    config = ConfigRecord({"server-round": 1})
    return strategy.train_round(cast(Grid, grid), 1, arrays, config, timeout=1.0)


def test_weighted_average_of_preweighted_updates_and_failures_counted(
    fake_grid: type[FakeGrid],
) -> None:
    strategy = _strategy(sampling=Sampling.POISSON, sample_rate=1.0)

    def replies(msgs: list[Message]) -> list[Message]:
        assert len(msgs) == 3 and all(m.metadata.message_type == MessageType.TRAIN for m in msgs)
        # client A: 1 user, delta (1, 1) -> sends (1, 1); client B: 3 users, (3, -1) -> (9, -3)
        return [
            Message(Error(code=2, reason="boom"), reply_to=msgs[2]),
            _reply(msgs[1], [9.0, -3.0], 3.0),
            _reply(msgs[0], [1.0, 1.0], 1.0),
        ]

    result = _train(strategy, fake_grid(replies))
    assert result.arrays is not None
    # (1 + 9) / 4 = 2.5 ; (1 - 3) / 4 = -0.5
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], [2.5, -0.5])
    s = result.stats
    assert (s.invited, s.returned, s.failed, s.dropped) == (3, 2, 1, 0)
    assert s.bytes_up > 2 * 8 and s.bytes_down > 3 * 8
    # replies come back in canonical node order, whatever order they arrived in
    assert [m.metadata.src_node_id for m in result.replies] == [1, 2, 3]
    assert result.privacy is None


def test_round_below_minimum_applies_nothing(fake_grid: type[FakeGrid]) -> None:
    strategy = _strategy(sampling=Sampling.POISSON, sample_rate=1.0, min_clients=2)
    result = _train(strategy, fake_grid(lambda msgs: [_reply(msgs[0], [1.0, 1.0], 1.0)]))
    assert result.arrays is None
    assert result.stats.dropped == 2 and not result.stats.applied


def test_fixed_denominator_and_lr_schedule(fake_grid: type[FakeGrid]) -> None:
    cfg = ServerConfig(optimizer=ServerOptimizer.FEDAVG, lr=1.0, sample_rate=1.0)
    strategy = FedRecStrategy(
        cfg,
        ServerOpt(kind=cfg.optimizer, lr=1.0),
        seed=0,
        node_ids=[1, 2, 3],
        fixed_denominator=True,
        lr_scale=lambda rnd: 0.5 * rnd,
    )
    grid = fake_grid(lambda msgs: [_reply(m, [1.0, 2.0], 1.0) for m in msgs])
    result = _train(strategy, grid)
    assert result.arrays is not None
    # the sum (3, 6) is not divided (clients pre-scaled), then moved with lr 1 * 0.5 at round 1
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], [1.5, 3.0])


@pytest.mark.parametrize("rate", [0.0, 1.5, float("nan")])
def test_sample_rate_is_checked(rate: float) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        ServerConfig(sample_rate=rate)


def test_wire_bytes_equals_flowers_serialized_size() -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from server.aggregation import wire_bytes

    rng = np.random.default_rng(0)
    for n in (10, 5000):
        content = RecordDict(
            {
                "arrays": ArrayRecord([rng.normal(size=(n, 3)).astype(np.float32)]),
                "metrics": MetricRecord({"weight": 2.0, "num-examples": 2}),
            }
        )
        exact = sum(len(o.deflate()) for o in get_all_nested_objects(content).values())
        assert wire_bytes(content) == exact
        assert wire_bytes(content) == exact  # cached layout, same answer


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (RecordDict({"metrics": MetricRecord({"weight": 1.0})}), "no arrays"),
        (RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)])}), "no metrics"),
        (
            RecordDict(
                {
                    "arrays": ArrayRecord([np.zeros(3, dtype=np.float32)]),
                    "metrics": MetricRecord({"weight": 1.0}),
                }
            ),
            "shape",
        ),
        (
            RecordDict(
                {
                    "arrays": ArrayRecord([np.array([np.nan, 0.0], dtype=np.float32)]),
                    "metrics": MetricRecord({"weight": 1.0}),
                }
            ),
            "not finite",
        ),
    ],
)
def test_malformed_reply_is_dropped_with_reason(
    content: RecordDict, reason: str, fake_grid: type[FakeGrid]
) -> None:
    strategy = _strategy(sampling=Sampling.POISSON, sample_rate=1.0)
    grid = fake_grid(
        lambda msgs: [_reply(msgs[0], [2.0, 2.0], 1.0), Message(content, reply_to=msgs[1])]
    )
    result = _train(strategy, grid)
    assert result.arrays is not None
    np.testing.assert_allclose(result.arrays.to_numpy_ndarrays()[0], [2.0, 2.0])
    assert result.stats.failed == 1 and result.stats.returned == 1
    assert reason in result.stats.reasons[0]

"""The server's DP layers: what they announce, the fixed denominator, what a round is charged."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.privacy import (
    AccountantKind,
    MechanismStep,
    PrivacyAccountant,
    compute_epsilon,
    plan_privacy,
)
from common.protocol import ClientDPConfig
from common.run.config import (
    ClientConfig,
    PrivacyConfig,
    PrivacyMode,
    RunConfig,
    Sampling,
    ServerConfig,
    ServerOptimizer,
)
from server.dp import ClientDPStrategy, ExampleDPStrategy
from server.optimizer import ServerOpt
from server.strategy import FedRecStrategy, TrainResult

if TYPE_CHECKING:
    from tests.server.conftest import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(privacy: PrivacyConfig, *, q: float, rounds: int, **client: object) -> RunConfig:
    return RunConfig(
        rounds=rounds,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=q),
        client=ClientConfig(optimizer="sgd", **client),  # type: ignore[arg-type]
        privacy=privacy,
    )


def _inner(*, fixed_denominator: bool) -> FedRecStrategy:
    server = ServerConfig(optimizer=ServerOptimizer.FEDAVG, lr=1.0, sample_rate=1.0)
    return FedRecStrategy(
        server,
        ServerOpt(kind=server.optimizer, lr=1.0),
        seed=0,
        node_ids=[1, 2],
        fixed_denominator=fixed_denominator,
    )


def _reply(instruction: Message, **metrics: float | int) -> Message:
    record = MetricRecord({"weight": 10.0, "num-examples": 10, "loss": 1.0, **metrics})
    arrays = ArrayRecord([np.ones(2, dtype=np.float32)])
    return Message(RecordDict({"arrays": arrays, "metrics": record}), reply_to=instruction)


def _train(
    strategy: ClientDPStrategy | ExampleDPStrategy, grid: FakeGrid, rnd: int = 1
) -> tuple[TrainResult, ConfigRecord]:
    arrays = ArrayRecord([np.zeros(2, dtype=np.float32)])
    config = ConfigRecord({"server-round": rnd})
    return strategy.train_round(cast(Grid, grid), rnd, arrays, config, timeout=1.0), config


def test_example_layer_charges_the_plan_or_more(fake_grid: type[FakeGrid]) -> None:
    cfg = _run(PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.0), q=1.0, rounds=2)
    plan = plan_privacy(cfg, 2, silo_sizes=[10, 20])
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    strategy = ExampleDPStrategy(_inner(fixed_denominator=False), plan, accountant)
    # one silo is honest, the other reports more steps than planned: the round is charged that
    grid = fake_grid(
        lambda msgs: [
            _reply(msgs[0], **{"dpsgd-steps": 1, "dpsgd-sample-rate": 1.0}),
            _reply(msgs[1], **{"dpsgd-steps": 3, "dpsgd-sample-rate": 1.0}),
        ],
        nodes=[1, 2],
    )
    result, config = _train(strategy, grid)
    assert config["dpsgd-max-steps"] == plan.steps_per_round == 1
    privacy = result.privacy
    assert privacy is not None
    assert privacy.steps == 3 and privacy.participated == 2 and privacy.released
    assert privacy.effective_noise_multiplier == 1.0 and privacy.epsilon_accountant == "rdp"
    expected = compute_epsilon(
        [MechanismStep(1.0, 1.0, 3)], delta=plan.delta, accountant=AccountantKind.RDP
    )
    assert privacy.epsilon_rdp == pytest.approx(expected, rel=1e-9)
    assert accountant.history == [MechanismStep(1.0, 1.0, 3)]


def test_client_layer_announces_its_parameters_and_charges_the_effective_z(
    fake_grid: type[FakeGrid],
) -> None:
    cfg = _run(PrivacyConfig(mode=PrivacyMode.CLIENT, noise_multiplier=2.0), q=0.5, rounds=1)
    plan = plan_privacy(cfg, 8)  # m = 4
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    strategy = ClientDPStrategy(_inner(fixed_denominator=True), plan, accountant)
    grid = fake_grid(lambda msgs: [_reply(m) for m in msgs], nodes=[1, 2])
    result, config = _train(strategy, grid)
    announced = ClientDPConfig.read(config)
    assert announced is not None
    assert (announced.clip, announced.denominator) == (plan.clip, 4.0)
    assert announced.noise_std == pytest.approx(2.0 * plan.clip / 2.0)  # z C / sqrt(m)
    privacy = result.privacy
    assert privacy is not None and privacy.participated == 2
    # 2 of m = 4 expected participants: z_eff = 2 * sqrt(2 / 4); the last round reports PRV
    assert privacy.effective_noise_multiplier == pytest.approx(2.0 * (0.5**0.5))
    assert privacy.epsilon_accountant == "prv"
    assert privacy.epsilon <= privacy.epsilon_rdp


def test_client_layer_refuses_an_inner_strategy_that_divides() -> None:
    cfg = _run(PrivacyConfig(mode=PrivacyMode.CLIENT, noise_multiplier=1.0), q=0.5, rounds=1)
    plan = plan_privacy(cfg, 8)
    assert plan is not None
    with pytest.raises(ValueError, match="fixed_denominator"):
        ClientDPStrategy(_inner(fixed_denominator=False), plan, PrivacyAccountant(delta=plan.delta))


def test_a_round_without_updates_is_not_charged(fake_grid: type[FakeGrid]) -> None:
    cfg = _run(PrivacyConfig(mode=PrivacyMode.CLIENT, noise_multiplier=1.0), q=0.5, rounds=3)
    plan = plan_privacy(cfg, 8)
    assert plan is not None
    accountant = PrivacyAccountant(delta=plan.delta)
    strategy = ClientDPStrategy(_inner(fixed_denominator=True), plan, accountant)
    result, _ = _train(strategy, fake_grid(lambda msgs: [], nodes=[1, 2]))
    assert result.privacy is not None and not result.privacy.released
    assert result.privacy.epsilon == 0.0 and accountant.history == []

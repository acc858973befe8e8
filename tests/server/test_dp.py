"""The server's DP plan (calibration under Poisson participation, silo DP-SGD bounds) and the
example-level layer's accounting."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ledger import LedgerWriter
from common.privacy import AccountantKind, MechanismStep, compute_epsilon
from common.runconfig import (
    ClientConfig,
    PrivacyConfig,
    PrivacyMode,
    RunConfig,
    Sampling,
    ServerConfig,
    ServerOptimizer,
)
from server.dp import (
    ExampleDPStrategy,
    RdpTracker,
    dpsgd_shape,
    participation_factor,
    plan_privacy,
)
from server.optimizer import ServerOpt
from server.strategy import FedRecStrategy

pytestmark = pytest.mark.usefixtures("task_identity")


def _run(
    privacy: PrivacyConfig, *, q: float = 0.1, rounds: int = 30, **client: object
) -> RunConfig:
    return RunConfig(
        rounds=rounds,
        server=ServerConfig(sampling=Sampling.POISSON, sample_rate=q),
        client=ClientConfig(optimizer="sgd", **client),  # type: ignore[arg-type]
        privacy=privacy,
    )


def test_participation_factor_is_one_at_full_participation_and_below_one_otherwise() -> None:
    assert participation_factor(population=50, sample_rate=1.0, quantile=0.025) == 1.0
    f = participation_factor(population=738, sample_rate=0.1, quantile=0.025)
    # Binomial(738, 0.1): mean 73.8, 2.5% quantile 58 -> sqrt(58 / 73.8) = 0.887
    assert f == pytest.approx(math.sqrt(58 / 73.8), rel=1e-9)
    assert f < participation_factor(population=738, sample_rate=0.1, quantile=0.3) <= 1.0


@settings(max_examples=5, deadline=None)
@given(
    target=st.sampled_from([1.0, 2.0, 4.0]),
    population=st.integers(min_value=500, max_value=5000),
    q=st.sampled_from([0.05, 0.1]),
)
def test_calibrated_run_stays_within_target_under_poisson_participation(
    target: float, population: int, q: float
) -> None:
    """Rounds draw k ~ Binomial(N, q) participants; simulated runs stay within the target.

    The floor is per round, so it is a high-probability guarantee: with m = qN >= 25 no
    simulated run overshoots; with a handful of expected participants (m ~ 10) a run whose
    rounds often fall to 1-3 participants can (the ledger then reports it, see the README).
    """
    rounds = 40
    privacy = PrivacyConfig(mode=PrivacyMode.CLIENT, target_epsilon=target, accountant="rdp")
    plan = plan_privacy(_run(privacy, q=q, rounds=rounds), population)
    assert plan is not None and plan.accounting_noise_multiplier is not None
    assert plan.noise_multiplier > plan.accounting_noise_multiplier
    rng = np.random.default_rng([population, int(q * 100), int(target)])
    m = q * population
    for _ in range(10):  # 10 simulated runs, each charged with its real participant counts
        tracker = RdpTracker()
        for k in rng.binomial(population, q, size=rounds):
            if k > 0:
                tracker.add(MechanismStep(plan.noise_multiplier * math.sqrt(k / m), q))
        assert tracker.epsilon(plan.delta) <= target


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [(25, 8, 1, (0.25, 4)), (24, 8, 2, (1 / 3, 6)), (5, 8, 1, (1.0, 1))],
)
def test_dpsgd_shape_matches_opacus_poisson_loader(
    n: int, batch: int, epochs: int, expected: tuple[float, int]
) -> None:
    q, steps = dpsgd_shape(n, batch_size=batch, epochs=epochs)
    assert (q, steps) == (pytest.approx(expected[0]), expected[1])


def test_example_plan_bounds_every_silo_and_counts_users() -> None:
    cfg = _run(
        PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.2),
        q=1.0,
        batch_size=10,
        local_epochs=2,
    )
    plan = plan_privacy(cfg, 3, silo_sizes=[15, 40, 100])
    assert plan is not None
    # smallest silo (15 users): 2 batches -> q = 1/2; largest (100): 10 batches x 2 epochs
    assert (plan.sample_rate, plan.steps_per_round) == (0.5, 20)
    assert plan.population == 155 and plan.noise_multiplier == 1.2
    with pytest.raises(ValueError, match="silo"):
        plan_privacy(cfg, 3)


def test_example_mode_needs_sgd() -> None:
    with pytest.raises(ValueError, match="sgd"):
        RunConfig(
            client=ClientConfig(optimizer="adam"),
            privacy=PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.0),
        )


def _silo_reply(instruction: Message, *, steps: int, q: float) -> Message:
    metrics = MetricRecord(
        {"weight": 10.0, "num-examples": 10, "dpsgd-steps": steps, "dpsgd-sample-rate": q}
    )
    arrays = ArrayRecord([np.ones(2, dtype=np.float32)])
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction)


def test_example_layer_charges_the_plan_or_more_and_ledger_records_it(tmp_path: Path) -> None:
    server = ServerConfig(optimizer=ServerOptimizer.FEDAVG, lr=1.0, sample_rate=1.0)
    inner = FedRecStrategy(server, ServerOpt(kind=server.optimizer, lr=1.0), seed=0)
    inner.node_ids = [1, 2]
    cfg = _run(PrivacyConfig(mode=PrivacyMode.EXAMPLE, noise_multiplier=1.0), q=1.0, rounds=2)
    plan = plan_privacy(cfg, 2, silo_sizes=[10, 20])
    assert plan is not None
    header = {"run_id": "t", "code_version": "x", "config": {}, "population": 30,
              "delta": plan.delta, "accountant": "prv", "mode": "example"}  # fmt: skip
    ledger = LedgerWriter.create(tmp_path / "ledger.jsonl", header)
    strategy = ExampleDPStrategy(inner, plan, ledger)
    arrays = ArrayRecord([np.zeros(2, dtype=np.float32)])
    config = ConfigRecord({"server-round": 1})
    msgs = list(strategy.configure_train(1, arrays, config, None))  # type: ignore[arg-type]
    assert config["dpsgd-max-steps"] == plan.steps_per_round == 1
    # one silo is honest, the other reports more steps than planned: the round is charged that
    replies = [_silo_reply(msgs[0], steps=1, q=1.0), _silo_reply(msgs[1], steps=3, q=1.0)]
    strategy.aggregate_train(1, replies)
    assert strategy.pending["steps"] == 3 and strategy.pending["participated"] == 2
    assert strategy.pending["effective_noise_multiplier"] == 1.0
    strategy.commit_round()
    expected = compute_epsilon(
        [MechanismStep(1.0, 1.0, 3)], delta=plan.delta, accountant=AccountantKind.RDP
    )
    assert strategy.epsilon_rdp == pytest.approx(expected, rel=1e-9)

"""Differential privacy on the server: layers around the plain strategy, one per DP mode.

A layer wraps :class:`server.strategy.FedRecStrategy` the way Flower's
``DifferentialPrivacyClientSideFixedClipping`` wraps a strategy: it tells the clients the DP
parameters (they clip and noise, :mod:`client.dp_mod`, or run DP-SGD, :mod:`client.dpsgd`), lets
the plain strategy run the round, and charges what the round released on the accountant it was
given (:class:`common.privacy.PrivacyAccountant`, resumed from the ledger by the caller). The
round's privacy record (:class:`common.privacy.rounds.PrivacyRound`) comes back in the round's
:class:`server.strategy.TrainResult`; the round loop writes it to the ledger after the server
state is saved.

Layers wrap whole rounds (``train_round``), not Flower's ``aggregate_train`` alone: the charge
depends on how many updates came back, which only the whole round knows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.privacy import (
    AggregatorView,
    DPPlan,
    MechanismStep,
    PrivacyAccountant,
    client_noise_std,
)
from common.privacy.rounds import (
    PrivacyRound,
    charge_aggregator,
    charge_round,
    client_round_step,
    example_round_step,
)
from common.protocol import (
    METRICS_RECORD,
    ClientDPConfig,
    ExampleDPConfig,
    ProtocolError,
    TrainMetrics,
    is_refusal,
)
from common.run.config import PrivacyMode
from server.strategy import FedRecStrategy, TrainResult

__all__ = ["ClientDPStrategy", "ExampleDPStrategy", "make_dp_strategy"]

logger = logging.getLogger(__name__)


class _DPLayer:
    """Shared part of the DP layers: announce, run the inner round, charge it.

    Subclasses say what the clients are told (:meth:`_announce`) and which mechanism a round
    released (:meth:`_released`).

    Parameters
    ----------
    inner:
        The plain strategy.
    plan:
        Resolved privacy parameters.
    accountant:
        Composes the rounds; holds the history of rounds already run when resuming.
    """

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: DPPlan,
        accountant: PrivacyAccountant,
        *,
        aggregator: AggregatorView | None = None,
        encrypted: bool = False,
    ) -> None:
        if accountant.delta != plan.delta:
            raise ValueError(f"accountant delta {accountant.delta} is not the plan's {plan.delta}")
        self.inner = inner
        self.plan = plan
        self.accountant = accountant
        self.aggregator = aggregator
        self.encrypted = encrypted

    def _with_aggregator(self, privacy: PrivacyRound, result: TrainResult) -> PrivacyRound:
        """``privacy`` with the round's participants and the aggregator-view epsilon (client
        level, when the contributors are known)."""
        contributors = result.stats.contributors
        if self.aggregator is None:
            return privacy
        if len(contributors) != privacy.participated:
            logger.warning(
                "round %d: %d of %d contributors are known nodes: no participant list, the "
                "aggregator-view epsilon is not charged (the audit will flag the line)",
                privacy.round,
                len(contributors),
                privacy.participated,
            )
            return privacy
        return charge_aggregator(
            self.aggregator, privacy, participants=contributors, encrypted=self.encrypted
        )

    def _announce(self, config: ConfigRecord) -> None:
        raise NotImplementedError

    def _released(self, result: TrainResult) -> MechanismStep:
        raise NotImplementedError

    def _charge(self, server_round: int, config: ConfigRecord, result: TrainResult) -> PrivacyRound:
        """Charge what the round released on the accountant (:func:`charge_round`)."""
        return charge_round(
            self.accountant,
            self.plan,
            server_round=server_round,
            invited=result.stats.invited,
            participated=result.stats.returned,
            step=self._released(result),
        )

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float,
    ) -> TrainResult:
        """Announce the DP parameters, run the plain round, charge what it released.

        The server has seen every update that came back, applied or not: the round is charged
        whenever one did (conservative for rounds below the minimum cohort).
        """
        self._announce(config)
        result = self.inner.train_round(grid, server_round, arrays, config, timeout=timeout)
        privacy = self._with_aggregator(self._charge(server_round, config, result), result)
        return dataclasses.replace(result, privacy=privacy)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages carry no update: delegated unchanged."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated unchanged."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the privacy plan and the inner strategy."""
        p = self.plan
        logger.info(
            "%s-level DP: C=%s z=%.4g q=%s x %d steps/round N=%d m=%.1f delta=%.3g rounds=%d "
            "target eps=%s",
            p.mode.value,
            p.clip,
            p.noise_multiplier,
            p.sample_rate,
            p.steps_per_round,
            p.population,
            p.expected_participants,
            p.delta,
            p.rounds,
            p.target_epsilon,
        )
        self.inner.summary()


class ClientDPStrategy(_DPLayer):
    """User-level DP-FedAvg around a plain strategy that sums with the fixed denominator.

    Clients clip and add their share of the noise (:mod:`client.dp_mod`) and pre-scale by 1/m,
    so ``inner`` must not divide again (``fixed_denominator=True``). A round with k participants
    is charged with the effective noise multiplier z * sqrt(k / m).
    """

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: DPPlan,
        accountant: PrivacyAccountant,
        *,
        aggregator: AggregatorView | None = None,
        encrypted: bool = False,
    ) -> None:
        if not inner.fixed_denominator:
            raise ValueError("client-level DP needs a strategy with fixed_denominator=True")
        super().__init__(inner, plan, accountant, aggregator=aggregator, encrypted=encrypted)

    def _announce(self, config: ConfigRecord) -> None:
        p = self.plan
        ClientDPConfig(
            clip=p.clip,
            noise_multiplier=p.noise_multiplier,
            accounting_noise_multiplier=p.guard_noise_multiplier,
            noise_std=client_noise_std(
                noise_multiplier=p.noise_multiplier,
                clip=p.clip,
                expected_participants=p.expected_participants,
            ),
            denominator=p.expected_participants,
            sample_rate=p.sample_rate,
            delta=p.delta,
        ).write(config)

    def _released(self, result: TrainResult) -> MechanismStep:
        return client_round_step(self.plan, participated=result.stats.returned)


class ExampleDPStrategy(_DPLayer):
    """Example-level DP: every silo runs Opacus DP-SGD on its users (:mod:`client.dpsgd`).

    Each user is one silo's example, so a user's privacy loss in a round is that silo's DP-SGD
    (q_s, steps_s) at noise z; the round is charged the plan's bound (largest q, largest step
    count of any silo), or more when a reply reports more, so the ledger bounds every user.
    Silo noise is local and does not depend on how many silos return: the effective z is z.
    The inner strategy keeps its example-weighted mean (silo sizes are public).
    """

    def _announce(self, config: ConfigRecord) -> None:
        p = self.plan
        ExampleDPConfig(
            clip=p.clip,
            noise_multiplier=p.noise_multiplier,
            delta=p.delta,
            max_steps=p.steps_per_round,
            max_sample_rate=p.sample_rate,
        ).write(config)

    def _released(self, result: TrainResult) -> MechanismStep:
        reported = []
        for reply in result.replies:
            if reply.has_error() or METRICS_RECORD not in reply.content.metric_records:
                continue
            record = reply.content.metric_records[METRICS_RECORD]
            if is_refusal(record):
                continue
            try:
                metrics = TrainMetrics.read(record)
            except ProtocolError:  # counted as failed by the plain strategy
                continue
            reported.append((metrics.dpsgd_sample_rate, metrics.dpsgd_steps))
        return example_round_step(self.plan, reported)


def make_dp_strategy(
    inner: FedRecStrategy,
    plan: DPPlan,
    accountant: PrivacyAccountant,
    *,
    aggregator: AggregatorView | None = None,
    encrypted: bool = False,
) -> ClientDPStrategy | ExampleDPStrategy:
    """The DP layer of ``plan.mode`` around ``inner``; at client level, ``aggregator`` (when
    given) is charged with each round's participants (``encrypted``: the aggregator sees only
    the decrypted sum)."""
    if plan.mode is PrivacyMode.EXAMPLE:
        return ExampleDPStrategy(inner, plan, accountant)
    return ClientDPStrategy(inner, plan, accountant, aggregator=aggregator, encrypted=encrypted)

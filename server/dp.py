"""Client-level differential privacy on the server: a layer around the plain strategy.

:class:`ClientDPStrategy` wraps :class:`server.strategy.FedRecStrategy` the way Flower's
``DifferentialPrivacyClientSideFixedClipping`` wraps a strategy: it tells the clients the clip
norm and their share of the noise (clients clip and noise, see :mod:`client.dp_mod`), sums their
pre-scaled updates with the fixed denominator m = qN (McMahan et al. 2018, Alg. 1), and after
every round accounts the privacy spent with the *effective* noise multiplier
``z * sqrt(participated / m)`` and writes the round to the hash-chained ledger.

Per-round epsilon is Renyi DP, tracked incrementally (one RDP evaluation per round; the ledger
line says ``"epsilon_accountant": "rdp"``); the PRV epsilon (tighter, the one fedrec reports) is
computed for the last round, whose line says ``"prv"`` and which the final line repeats.
Rounds with equal (z_eff, q) are merged before PRV composition (exact).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.ledger import LedgerWriter
from common.privacy import (
    AccountantKind,
    MechanismStep,
    calibrate_noise_multiplier,
    client_noise_std,
    compute_epsilon,
    default_delta,
    effective_noise_multiplier,
)
from common.runconfig import PrivacyMode, RunConfig
from server.strategy import FedRecStrategy

__all__ = ["ClientDPStrategy", "DPPlan", "RdpTracker", "plan_privacy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPPlan:
    """The resolved privacy parameters of a run."""

    noise_multiplier: float
    """z as configured (or calibrated for the target epsilon)."""
    clip: float
    sample_rate: float
    population: int
    expected_participants: float
    """m = q * N, the fixed denominator."""
    delta: float
    rounds: int
    target_epsilon: float | None


def plan_privacy(cfg: RunConfig, population: int) -> DPPlan | None:
    """Resolve ``cfg.privacy`` for ``population`` clients; ``None`` when DP is off.

    With ``target_epsilon``, z is the smallest noise multiplier whose PRV epsilon after
    ``cfg.rounds`` rounds at rate q stays at or below the target (never above).

    Raises
    ------
    ValueError
        If the target cannot be reached (e.g. too small for the accountant).
    """
    p = cfg.privacy
    if p.mode is not PrivacyMode.CLIENT:
        return None
    q = cfg.server.sample_rate
    delta = p.delta if p.delta is not None else default_delta(population)
    if p.noise_multiplier is not None:
        z = p.noise_multiplier
    else:
        assert p.target_epsilon is not None  # checked by PrivacyConfig
        z = calibrate_noise_multiplier(
            target_epsilon=p.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=cfg.rounds,
            accountant=AccountantKind(p.accountant),
        )
    return DPPlan(
        noise_multiplier=z,
        clip=p.clip,
        sample_rate=q,
        population=population,
        expected_participants=q * population,
        delta=delta,
        rounds=cfg.rounds,
        target_epsilon=p.target_epsilon,
    )


class RdpTracker:
    """Renyi DP of a growing history, one RDP evaluation per added round.

    Sums the RDP curve of each subsampled Gaussian step at Opacus's default orders, which is
    what ``RDPAccountant`` does over its history; epsilon is converted the same way.
    """

    def __init__(self) -> None:
        self.orders = list(RDPAccountant.DEFAULT_ALPHAS)
        self.rdp = np.zeros(len(self.orders))

    def add(self, step: MechanismStep) -> None:
        """Compose one more step."""
        if step.noise_multiplier == 0:
            self.rdp = np.full(len(self.orders), np.inf)
            return
        self.rdp = self.rdp + compute_rdp(
            q=step.sample_rate,
            noise_multiplier=step.noise_multiplier,
            steps=step.steps,
            orders=self.orders,
        )

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything added so far (0 for nothing)."""
        if not np.any(self.rdp):
            return 0.0
        eps, _ = get_privacy_spent(orders=self.orders, rdp=self.rdp, delta=delta)
        return float(eps)


def merged(history: Iterable[MechanismStep]) -> list[MechanismStep]:
    """Equal (z, q) steps merged into one entry with their step count (composition is exact)."""
    counts: Counter[tuple[float, float]] = Counter()
    for step in history:
        counts[(step.noise_multiplier, step.sample_rate)] += step.steps
    return [MechanismStep(z, q, n) for (z, q), n in sorted(counts.items())]


class ClientDPStrategy(Strategy):
    """User-level DP-FedAvg around a plain strategy, with accounting and the ledger.

    Parameters
    ----------
    inner:
        The plain strategy; it is switched to the fixed denominator (clients pre-scale by 1/m).
    plan:
        Resolved privacy parameters.
    ledger:
        Where each round is recorded (hash-chained).
    history:
        Mechanism steps of rounds already run (when resuming).
    """

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: DPPlan,
        ledger: LedgerWriter,
        *,
        history: list[MechanismStep] | None = None,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.ledger = ledger
        inner.fixed_denominator = True
        self.history: list[MechanismStep] = []
        self.rdp = RdpTracker()
        for step in history or []:
            self._charge(step)
        self.epsilon = self.rdp.epsilon(plan.delta) if self.history else 0.0
        self.epsilon_rdp = self.epsilon
        self.pending: dict[str, Any] = {}
        """The last round's ledger record, appended by :meth:`commit_round`."""

    @property
    def last(self) -> Any:
        """The inner strategy's stats of the last round."""
        return self.inner.last

    def _charge(self, step: MechanismStep) -> None:
        self.history.append(step)
        self.rdp.add(step)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Announce clip, noise share and denominator, then sample as the inner strategy does."""
        p = self.plan
        config["dp-clip"] = p.clip
        config["dp-noise-multiplier"] = p.noise_multiplier
        config["dp-noise-std"] = client_noise_std(
            noise_multiplier=p.noise_multiplier,
            clip=p.clip,
            expected_participants=p.expected_participants,
        )
        config["dp-denominator"] = p.expected_participants
        config["dp-sample-rate"] = p.sample_rate
        config["dp-delta"] = p.delta
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the noised updates, then account and record the round."""
        result = self.inner.aggregate_train(server_round, replies)
        stats = self.inner.last
        p = self.plan
        # The server has seen every update that came back, applied or not: charge the round
        # whenever one did (conservative for rounds below the minimum cohort).
        released = stats.returned > 0
        # A round where no update came back released nothing and is not charged; the ledger
        # then records the configured z (its effective multiplier is undefined).
        z_eff = (
            effective_noise_multiplier(
                noise_multiplier=p.noise_multiplier,
                participated=stats.returned,
                expected=p.expected_participants,
            )
            if released
            else p.noise_multiplier
        )
        if released:
            self._charge(MechanismStep(z_eff, p.sample_rate))
        self.epsilon_rdp = self.rdp.epsilon(p.delta)
        self.epsilon = self.epsilon_rdp
        if server_round == p.rounds:
            self.epsilon = self.final_prv()
        self.pending = {
            "round": server_round,
            "sample_rate": p.sample_rate,
            "invited": stats.invited,
            "participated": stats.returned,
            "expected_participants": p.expected_participants,
            "clip": p.clip,
            "noise_multiplier": p.noise_multiplier,
            "effective_noise_multiplier": z_eff,
            "steps": 1,
            "released": released,
            "epsilon": self.epsilon,
            "epsilon_accountant": "prv" if server_round == p.rounds else "rdp",
            "epsilon_rdp": self.epsilon_rdp,
        }
        logger.info(
            "round %d: clip %.3g, z %.3g (effective %.3g), epsilon %.4g (RDP %.4g), delta %.3g",
            server_round,
            p.clip,
            p.noise_multiplier,
            z_eff,
            self.epsilon,
            self.epsilon_rdp,
            p.delta,
        )
        return result

    def commit_round(self) -> None:
        """Append the last round's record to the ledger (after the server state is saved)."""
        self.ledger.append_round(self.pending)

    def final_prv(self) -> float:
        """PRV epsilon of the whole history (merged), capped by RDP, which also bounds it."""
        if not self.history:
            return 0.0
        try:
            prv = compute_epsilon(
                merged(self.history), delta=self.plan.delta, accountant=AccountantKind.PRV
            )
        except ValueError as err:
            logger.warning("PRV accountant failed (%s); reporting RDP", err)
            return self.epsilon_rdp
        return min(prv, self.epsilon_rdp) if math.isfinite(prv) else self.epsilon_rdp

    def close(self) -> None:
        """Write the ledger's final line."""
        self.ledger.close(epsilon=self.epsilon, epsilon_rdp=self.epsilon_rdp)

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
            "client-level DP: C=%s z=%.4g q=%s N=%d m=%.1f delta=%.3g rounds=%d target eps=%s",
            p.clip,
            p.noise_multiplier,
            p.sample_rate,
            p.population,
            p.expected_participants,
            p.delta,
            p.rounds,
            p.target_epsilon,
        )
        self.inner.summary()

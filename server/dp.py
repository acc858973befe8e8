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

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.stats import binom

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

__all__ = [
    "ClientDPStrategy",
    "DPPlan",
    "ExampleDPStrategy",
    "RdpTracker",
    "dpsgd_shape",
    "make_dp_strategy",
    "participation_factor",
    "plan_privacy",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPPlan:
    """The resolved privacy parameters of a run (client or example level)."""

    mode: PrivacyMode
    """``client`` (DP-FedAvg, the client's update is the unit) or ``example`` (DP-SGD in silos)."""
    noise_multiplier: float
    """z as configured (or calibrated for the target epsilon)."""
    clip: float
    sample_rate: float
    """Client mode: q of the client sampling. Example mode: the largest DP-SGD batch sampling
    rate of any silo (the smallest silo's), a bound the accounting charges for every silo."""
    population: int
    """N: clients (client mode) or users (example mode), the privacy units."""
    expected_participants: float
    """Client mode: m = q * N, the fixed denominator. Example mode: the expected silo count."""
    delta: float
    rounds: int
    target_epsilon: float | None
    steps_per_round: int = 1
    """Mechanism steps a round charges: 1 (client) or the largest silo's DP-SGD step count."""
    accounting_noise_multiplier: float | None = None
    """The smallest per-round effective z the calibration planned for (client mode: z at the
    ``participation_quantile`` participant count); clients guard their budgets with it."""


def dpsgd_shape(n_users: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps) of a silo's DP-SGD in one round, as Opacus's Poisson ``DPDataLoader`` makes them.

    The loader has ``ceil(n / B)`` batches per epoch and samples each user with probability
    ``1 / ceil(n / B)`` per batch (Abadi et al. 2016, "lots" of expected size ~B).
    """
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    batches = math.ceil(n_users / batch_size)
    return 1.0 / batches, epochs * batches


def participation_factor(*, population: int, sample_rate: float, quantile: float) -> float:
    """sqrt(k / m) for k the ``quantile`` of Binomial(N, q) participants and m = qN (at most 1).

    A client-level round with k participants has effective noise multiplier z * sqrt(k / m)
    (its noise is k shares of N(0, (zC)^2 / m)); calibrating z for k at a low quantile keeps
    nearly every round at or above the planned effective z (McMahan et al. 2018 plan for m).
    """
    m = sample_rate * population
    k = float(binom.ppf(quantile, population, sample_rate))
    return min(1.0, math.sqrt(max(k, 1.0) / m))


def plan_privacy(
    cfg: RunConfig, population: int, *, silo_sizes: Sequence[int] | None = None
) -> DPPlan | None:
    """Resolve ``cfg.privacy`` for ``population`` clients; ``None`` when DP is off.

    With ``target_epsilon``, z is the smallest noise multiplier whose PRV epsilon after
    ``cfg.rounds`` rounds stays at or below the target (never above). Client mode plans each
    round at the ``participation_quantile`` participant count (see
    :func:`participation_factor`); example mode plans every round at the largest silo's step
    count and the smallest silo's sampling rate, a bound for each user whatever their silo.

    Parameters
    ----------
    cfg:
        The run.
    population:
        Number of clients.
    silo_sizes:
        Users per client; required in example mode, where users are the privacy units.

    Raises
    ------
    ValueError
        If the target cannot be reached (e.g. too small for the accountant), or example mode
        is asked for without silo sizes.
    """
    p = cfg.privacy
    if p.mode is PrivacyMode.OFF:
        return None
    if p.mode is PrivacyMode.EXAMPLE:
        if not silo_sizes or min(silo_sizes) < 1:
            raise ValueError("privacy.mode = 'example' needs every silo to hold >= 1 user")
        shapes = [
            dpsgd_shape(n, batch_size=cfg.client.batch_size, epochs=cfg.client.local_epochs)
            for n in silo_sizes
        ]
        q = max(s[0] for s in shapes)
        steps = max(s[1] for s in shapes)
        units = int(sum(silo_sizes))
        expected = cfg.server.sample_rate * population
        factor = 1.0
    else:
        q, steps, units = cfg.server.sample_rate, 1, population
        expected = q * population
        factor = participation_factor(
            population=population, sample_rate=q, quantile=p.participation_quantile
        )
    delta = p.delta if p.delta is not None else default_delta(units)
    if p.noise_multiplier is not None:
        z = p.noise_multiplier
        z_planned = z * factor
    else:
        assert p.target_epsilon is not None  # checked by PrivacyConfig
        z_planned = calibrate_noise_multiplier(
            target_epsilon=p.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=cfg.rounds * steps,
            accountant=AccountantKind(p.accountant),
        )
        z = z_planned / factor
    return DPPlan(
        mode=p.mode,
        noise_multiplier=z,
        clip=p.clip,
        sample_rate=q,
        population=units,
        expected_participants=expected,
        delta=delta,
        rounds=cfg.rounds,
        target_epsilon=p.target_epsilon,
        steps_per_round=steps,
        accounting_noise_multiplier=z_planned,
    )


@functools.lru_cache(maxsize=1024)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at Opacus's default orders (Mironov et al. 2019).

    Cached: a run's rounds repeat a few (z_eff, q) pairs (one per participant count), and each
    evaluation at fractional orders costs about 0.1 s.
    """
    curve = compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=list(RDPAccountant.DEFAULT_ALPHAS),
    )
    curve.setflags(write=False)
    return curve


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
        self.rdp = self.rdp + step.steps * _rdp_curve(step.noise_multiplier, step.sample_rate)

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


class _AccountedDPStrategy(Strategy):
    """Shared part of the DP layers: accounting after each round and the ledger.

    Subclasses say what the clients are told (:meth:`_dp_config`) and which mechanism a round
    released (:meth:`_round_mechanism`); this class composes it, keeps epsilon and writes the
    round's ledger record.

    Parameters
    ----------
    inner:
        The plain strategy.
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

    def _dp_config(self) -> dict[str, float | int]:
        raise NotImplementedError

    def _round_mechanism(self, replies: list[Message]) -> tuple[float, float, int]:
        """(effective z, q, steps) the last round released (called when one update returned)."""
        raise NotImplementedError

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Announce the DP parameters, then sample as the inner strategy does."""
        for key, value in self._dp_config().items():
            config[key] = value
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as the inner strategy does, then account and record the round."""
        replies = list(replies)
        result = self.inner.aggregate_train(server_round, replies)
        stats = self.inner.last
        p = self.plan
        # The server has seen every update that came back, applied or not: charge the round
        # whenever one did (conservative for rounds below the minimum cohort). A round where
        # none came back released nothing, is not charged and records the configured z.
        released = stats.returned > 0
        z_eff, q, steps = p.noise_multiplier, p.sample_rate, p.steps_per_round
        if released:
            z_eff, q, steps = self._round_mechanism(replies)
            self._charge(MechanismStep(z_eff, q, steps))
        self.epsilon_rdp = self.rdp.epsilon(p.delta)
        self.epsilon = self.epsilon_rdp
        if server_round == p.rounds:
            self.epsilon = self.final_prv()
        self.pending = {
            "round": server_round,
            "sample_rate": q,
            "invited": stats.invited,
            "participated": stats.returned,
            "expected_participants": p.expected_participants,
            "clip": p.clip,
            "noise_multiplier": p.noise_multiplier,
            "effective_noise_multiplier": z_eff,
            "steps": steps,
            "released": released,
            "epsilon": self.epsilon,
            "epsilon_accountant": "prv" if server_round == p.rounds else "rdp",
            "epsilon_rdp": self.epsilon_rdp,
        }
        logger.info(
            "round %d: %s DP, clip %.3g, z %.3g (effective %.3g), q %.3g x %d steps, "
            "epsilon %.4g (RDP %.4g), delta %.3g",
            server_round,
            p.mode.value,
            p.clip,
            p.noise_multiplier,
            z_eff,
            q,
            steps,
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


class ClientDPStrategy(_AccountedDPStrategy):
    """User-level DP-FedAvg around a plain strategy, with accounting and the ledger.

    Clients clip and add their share of the noise (:mod:`client.dp_mod`); the inner strategy is
    switched to the fixed denominator m = qN (clients pre-scale by 1/m). A round with k
    participants is charged with the effective noise multiplier z * sqrt(k / m).
    """

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: DPPlan,
        ledger: LedgerWriter,
        *,
        history: list[MechanismStep] | None = None,
    ) -> None:
        super().__init__(inner, plan, ledger, history=history)
        inner.fixed_denominator = True

    def _dp_config(self) -> dict[str, float | int]:
        p = self.plan
        return {
            "dp-clip": p.clip,
            "dp-noise-multiplier": p.noise_multiplier,
            "dp-accounting-noise-multiplier": (
                p.accounting_noise_multiplier
                if p.accounting_noise_multiplier is not None
                else p.noise_multiplier
            ),
            "dp-noise-std": client_noise_std(
                noise_multiplier=p.noise_multiplier,
                clip=p.clip,
                expected_participants=p.expected_participants,
            ),
            "dp-denominator": p.expected_participants,
            "dp-sample-rate": p.sample_rate,
            "dp-delta": p.delta,
        }

    def _round_mechanism(self, replies: list[Message]) -> tuple[float, float, int]:
        p = self.plan
        z_eff = effective_noise_multiplier(
            noise_multiplier=p.noise_multiplier,
            participated=self.inner.last.returned,
            expected=p.expected_participants,
        )
        return z_eff, p.sample_rate, 1


class ExampleDPStrategy(_AccountedDPStrategy):
    """Example-level DP: every silo runs Opacus DP-SGD on its users (:mod:`client.dpsgd`).

    Each user is one silo's example, so a user's privacy loss in a round is that silo's DP-SGD
    (q_s, steps_s) at noise z; the round is charged the plan's bound (largest q, largest step
    count of any silo), or more when a reply reports more, so the ledger bounds every user.
    Silo noise is local and does not depend on how many silos return: the effective z is z.
    The inner strategy keeps its example-weighted mean (silo sizes are public).
    """

    def _dp_config(self) -> dict[str, float | int]:
        p = self.plan
        return {
            "dpsgd-clip": p.clip,
            "dpsgd-noise-multiplier": p.noise_multiplier,
            "dpsgd-delta": p.delta,
            "dpsgd-max-steps": p.steps_per_round,
            "dpsgd-max-sample-rate": p.sample_rate,
        }

    def _round_mechanism(self, replies: list[Message]) -> tuple[float, float, int]:
        p = self.plan
        q, steps = p.sample_rate, p.steps_per_round
        for reply in replies:
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                continue
            metrics = reply.content.metric_records["metrics"]
            reported_q = float(metrics.get("dpsgd-sample-rate", 0.0))  # type: ignore[arg-type]
            reported_steps = int(metrics.get("dpsgd-steps", 0))  # type: ignore[arg-type]
            if reported_q > q * (1 + 1e-12) or reported_steps > steps:
                logger.warning(
                    "a silo reports q %.4g x %d steps beyond the plan (%.4g x %d): charged",
                    reported_q,
                    reported_steps,
                    q,
                    steps,
                )
                q, steps = max(q, reported_q), max(steps, reported_steps)
        return p.noise_multiplier, q, steps


def make_dp_strategy(
    inner: FedRecStrategy,
    plan: DPPlan,
    ledger: LedgerWriter,
    *,
    history: list[MechanismStep] | None = None,
) -> ClientDPStrategy | ExampleDPStrategy:
    """The DP layer of ``plan.mode`` around ``inner``."""
    cls = ExampleDPStrategy if plan.mode is PrivacyMode.EXAMPLE else ClientDPStrategy
    return cls(inner, plan, ledger, history=history)

"""Privacy accounting: the one composition of Gaussian mechanisms everybody uses.

(Over 400 lines: the one composition code path (PRV, RDP, their guards) kept in one place.)

One round of client-level DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018, "Learning
Differentially Private Recurrent Language Models", ICLR 2018, Algorithm 1 and section 2) is one
use of the Poisson-subsampled Gaussian mechanism (:class:`MechanismStep`); a silo's DP-SGD round
is ``steps`` uses of it. This module composes such histories with Opacus accountants
(:func:`compute_epsilon`): Renyi DP (Mironov 2017; Mironov, Talwar and Zhang 2019) or the
numerically tighter PRV accountant (Gopi, Lee and Wutschitz 2021). fedrec reports PRV and keeps
RDP as a check, with ``delta <= 1 / N^1.1`` (:func:`default_delta`; docs/design.md, "Privacy
accounting").

The server's DP layer, the in-process engine, each client's budget guard and the auditor all use
the same code: :class:`PrivacyAccountant` (a resumable history with incremental RDP and a PRV
epsilon of the whole), :class:`RdpTracker`, :func:`merged_history` and
:func:`client_epsilon_after`. The inverse, the noise multiplier for a target epsilon, is
:func:`common.privacy.plan.calibrate_noise_multiplier`.

Every privacy parameter is keyword-only and checked at the boundary (:mod:`._checks`):
``math.isfinite`` on every float (NaN passes ``x <= 0``), ``epsilon > 0``, ``0 < delta < 1``,
``noise_multiplier >= 0``, ``0 < q <= 1``. Violations raise ``ValueError`` naming the parameter.

Every epsilon this module returns is ``>= 0`` and never NaN (``math.inf`` only for a step without
noise, or where RDP itself is unbounded). The rules, all of which keep the result a valid
(epsilon, delta)-DP bound:

- **Clamped at 0.** (epsilon, delta)-DP, ``P[M(D) in S] <= e^epsilon P[M(D') in S] + delta``
  (Dwork and Roth 2014, Definition 2.4), only weakens as epsilon grows, so a mechanism the
  accountant shows to be (epsilon', delta)-DP with epsilon' < 0 is (0, delta)-DP. RDP's
  conversion (Balle et al. 2020, Theorem 21) goes below 0 when delta is large (e.g. -0.0044 for
  z=23.8, q=0.5, one step, delta=0.0156), and PRV's upper bound goes below 0 where the true
  epsilon is 0 up to its ``eps_error`` (-0.002 there); both are reported as 0.
- **PRV is capped by RDP** in :meth:`PrivacyAccountant.epsilon_prv` (the reported epsilon).
  Both are upper bounds of the same mechanism's epsilon, so the smaller one is valid too; a PRV
  value above RDP is within its discretisation error (``eps_error``).
- **PRV falls back to RDP** (with a logged warning) where its grid would be too large
  (:class:`GridTooLargeError`), its numerics fail (Opacus raises) or it returns NaN or an
  infinite value: a conservative number, never a wrong one.
- **NaN is refused.** An RDP epsilon that comes out NaN raises ``ValueError`` naming the
  accountant and the history, instead of reaching a ledger or a budget check (``NaN <= budget``
  is False, ``NaN > budget`` is False too).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from common.privacy._checks import (
    check_count,
    check_delta,
    check_non_negative,
    check_positive,
    check_sample_rate,
)

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

__all__ = [
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "AccountantKind",
    "AggregatorView",
    "GridTooLargeError",
    "MechanismStep",
    "PrivacyAccountant",
    "RdpTracker",
    "aggregator_noise_multiplier",
    "client_epsilon_after",
    "compute_epsilon",
    "default_delta",
    "gaussian_epsilon",
    "merged_history",
]

logger = logging.getLogger(__name__)

PRV_EPS_ERROR = 0.01
"""Additive error allowed in the PRV accountant's epsilon (Opacus ``eps_error``). The accountant
returns the upper end of its error interval, so the reported epsilon stays a valid bound; 0.01 is
Opacus's own default and negligible next to typical budgets (epsilon 1 to 10)."""

PRV_MAX_GRID_POINTS = 10_000_000
"""Largest PRV discretisation grid (points) :func:`compute_epsilon` agrees to build: about 20 s and
1 GB. The grid grows with epsilon, so only epsilons far beyond any useful budget (hundreds) hit it,
e.g. z=0.3, q=0.5 over 10,000 rounds (RDP epsilon about 29,000); for those
:func:`compute_epsilon` reports the RDP epsilon, which also bounds PRV's."""


class AccountantKind(StrEnum):
    """Which Opacus accountant composes the rounds."""

    RDP = "rdp"
    """Renyi DP (Mironov 2017), Opacus ``RDPAccountant``: fast, looser; the cross-check."""
    PRV = "prv"
    """Privacy loss random variables (Gopi et al. 2021), Opacus ``PRVAccountant``: tighter;
    the epsilon fedrec reports."""


@dataclass(frozen=True)
class MechanismStep:
    """One use of the Poisson-subsampled Gaussian mechanism, possibly repeated.

    A DP-FedAvg round is one use (McMahan et al. 2018, Algorithm 1); ``steps`` repeats it with the
    same parameters, as in the ``history`` of Opacus accountants.
    """

    noise_multiplier: float
    """z: std of the summed noise divided by the L2 sensitivity C; 0 means no privacy (epsilon =
    inf)."""
    sample_rate: float
    """q: probability that each client takes part (Poisson sampling), in (0, 1]."""
    steps: int = 1
    """How many times the mechanism is applied with these parameters, >= 1."""

    def __post_init__(self) -> None:
        check_non_negative("noise_multiplier", self.noise_multiplier)
        check_sample_rate("sample_rate", self.sample_rate)
        check_count("steps", self.steps, minimum=1)


class GridTooLargeError(ValueError):
    """The PRV grid for this history exceeds :data:`PRV_MAX_GRID_POINTS` (epsilon is huge).

    Raised inside the PRV accountant before the grid is allocated; :func:`compute_epsilon`
    catches it and reports the RDP epsilon instead.
    """


def _non_negative_epsilon(raw: float, *, accountant: AccountantKind, what: str) -> float:
    """``raw`` as a valid epsilon: 0 where it is below 0, ``ValueError`` where it is NaN.

    Clamping is exact, not an approximation: (epsilon, delta)-DP implies (epsilon'', delta)-DP
    for every epsilon'' >= epsilon (Dwork and Roth 2014, Definition 2.4), so a negative bound
    from Balle et al. 2020, Theorem 21 (RDP, large delta) or from the upper end of PRV's error
    interval (Gopi et al. 2021, true epsilon 0 up to ``eps_error``) certifies epsilon 0.

    Parameters
    ----------
    raw : float
        The accountant's epsilon.
    accountant : AccountantKind
        Which accountant computed it (named in the error).
    what : str
        The history it was computed for (named in the error).

    Raises
    ------
    ValueError
        If ``raw`` is NaN or -inf (the accountant's numerics failed).
    """
    if math.isnan(raw) or raw == -math.inf:
        raise ValueError(f"{accountant} accountant returned epsilon {raw} for {what}")
    return max(float(raw), 0.0)


def _describe(history: Sequence[MechanismStep], delta: float) -> str:
    """A short description of a history for error messages: its first steps and delta."""
    shown = ", ".join(
        f"(z={s.noise_multiplier:.6g}, q={s.sample_rate:.6g}, steps={s.steps})" for s in history[:3]
    )
    more = f" and {len(history) - 3} more steps" if len(history) > 3 else ""
    return f"history [{shown}{more}] at delta={delta:.6g}"


@functools.cache
def _bounded_prv_accountant() -> type[IAccountant]:
    """Opacus ``PRVAccountant`` that refuses, before allocating it, a grid it cannot afford.

    Without the check, z=0.3, q=0.5 over 10,000 rounds asks for about 2e9 points and the process is
    killed for memory. Hooks the private ``_get_domain`` of Opacus 1.6; the test with a huge
    epsilon fails if a later Opacus stops calling it. Made on first use: importing Opacus takes
    seconds, and a device's ClientApp (a fresh process per message) only clips and noises
    unless it guards a budget.
    """
    from opacus.accountants import PRVAccountant

    class _BoundedPRVAccountant(PRVAccountant):
        def _get_domain(self, *args: Any, **kwargs: Any) -> Any:
            domain = super()._get_domain(*args, **kwargs)
            if domain.size > PRV_MAX_GRID_POINTS:
                raise GridTooLargeError(
                    f"PRV accountant would need {domain.size:,} grid points "
                    f"(limit {PRV_MAX_GRID_POINTS:,}): epsilon is far beyond any useful budget"
                )
            return domain

    return _BoundedPRVAccountant


def _new_accountant(kind: AccountantKind) -> IAccountant:
    from opacus.accountants import RDPAccountant

    match kind:
        case AccountantKind.RDP:
            return RDPAccountant()
        case AccountantKind.PRV:
            return _bounded_prv_accountant()()


def compute_epsilon(
    history: Sequence[MechanismStep], *, delta: float, accountant: AccountantKind
) -> float:
    """Epsilon spent by a history of (possibly different) subsampled Gaussian mechanisms.

    Composes the rounds of DP-FedAvg (McMahan et al. 2018, section 2, there with the
    moments accountant of Abadi et al. 2016) with an Opacus accountant: RDP (Mironov 2017;
    Mironov, Talwar and Zhang 2019, converted with Balle et al. 2020, Theorem 21) or PRV (Gopi,
    Lee and Wutschitz 2021) with ``eps_error =`` :data:`PRV_EPS_ERROR` and Opacus's default
    ``delta_error = delta / 1000``, returning the upper end of the PRV error interval.

    The result is a valid bound that is never negative nor NaN (module docstring): a negative
    value is clamped to 0, and PRV is replaced by the RDP epsilon, which also bounds it (with a
    logged warning), where PRV cannot evaluate the history (its grid would exceed
    :data:`PRV_MAX_GRID_POINTS`, its numerics fail, or it returns NaN).

    Parameters
    ----------
    history : Sequence[MechanismStep]
        The mechanisms applied so far, in any order (composition is commutative).
    delta : float
        Target delta, in (0, 1).
    accountant : AccountantKind
        Which Opacus accountant composes the history.

    Returns
    -------
    float
        Epsilon, >= 0; 0.0 for an empty history, ``math.inf`` if any step has noise multiplier 0.

    Raises
    ------
    ValueError
        If ``delta`` is out of range, ``accountant`` is unknown, or the RDP epsilon (PRV's
        fallback) comes out NaN.
    """
    check_delta("delta", delta)
    kind = AccountantKind(accountant)
    if not history:
        return 0.0
    if any(step.noise_multiplier == 0 for step in history):
        return math.inf
    # Opacus 1.6 history format: (noise_multiplier, sample_rate, steps), one entry per run of
    # identical steps; both accountants compose the entries.
    entries = [(step.noise_multiplier, step.sample_rate, step.steps) for step in history]
    if kind is AccountantKind.RDP:
        return _rdp_epsilon(entries, delta=delta, what=_describe(history, delta))
    acc = _new_accountant(AccountantKind.PRV)
    acc.history = entries
    try:
        # q = 1 makes the PRV take log(0) = -inf, which it handles; silence only that warning.
        with np.errstate(divide="ignore"):
            prv = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        if not math.isfinite(prv):  # NaN is no bound; RDP is a tighter one than inf
            raise FloatingPointError(f"it returned {prv}")
    except (RuntimeError, ValueError, FloatingPointError) as err:  # GridTooLargeError included
        # RDP is computed only here, not to cap every PRV value: it costs a third of a PRV
        # evaluation, and the calibration evaluates PRV about 8 times.
        rdp = _rdp_epsilon(entries, delta=delta, what=_describe(history, delta))
        logger.warning(
            "PRV accountant failed for %s (%s); using the RDP epsilon %.6g, which also bounds it",
            _describe(history, delta),
            err,
            rdp,
        )
        return rdp
    # the upper end of PRV's interval: below 0 only where the true epsilon is 0 up to eps_error
    return _non_negative_epsilon(prv, accountant=AccountantKind.PRV, what=_describe(history, delta))


def _rdp_epsilon(entries: list[tuple[float, float, int]], *, delta: float, what: str) -> float:
    """RDP epsilon of Opacus history ``entries`` at ``delta``, clamped at 0, never NaN."""
    acc = _new_accountant(AccountantKind.RDP)
    acc.history = list(entries)
    return _non_negative_epsilon(
        float(acc.get_epsilon(delta)), accountant=AccountantKind.RDP, what=what
    )


def default_delta(population: int) -> float:
    """Default delta ``1 / N^1.1`` for a population of ``N`` clients (docs/design.md).

    Delta must sit well below ``1/N``: a mechanism that fully leaks one random client in N is
    ``(0, 1/N)``-DP. The extra power 0.1 keeps delta a vanishing fraction of ``1/N`` as N grows.

    Parameters
    ----------
    population : int
        Number of clients N, >= 2 (N = 1 would give delta = 1, which protects nothing).

    Returns
    -------
    float
        Delta in (0, 1).
    """
    check_count("population", population, minimum=2)
    return float(population) ** -1.1


def merged_history(history: Iterable[MechanismStep]) -> list[MechanismStep]:
    """Steps with equal (z, q) merged into one entry with their step count, sorted by (z, q).

    Exact, since composition is commutative, and it keeps PRV's cost to one discretization per
    distinct mechanism instead of one per round. The sorted order makes the result independent
    of the order the rounds ran in, to the last bit.
    """
    counts: Counter[tuple[float, float]] = Counter()
    for step in history:
        counts[(step.noise_multiplier, step.sample_rate)] += step.steps
    return [
        MechanismStep(noise_multiplier=z, sample_rate=q, steps=n)
        for (z, q), n in sorted(counts.items())
    ]


@functools.lru_cache(maxsize=1024)
def _rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at Opacus's default orders (Mironov, Talwar and Zhang
    2019), the orders :func:`compute_epsilon` uses.

    Cached and read-only: a run's rounds repeat a few (z_eff, q) pairs (one per participant
    count), and each evaluation at fractional orders costs about 0.1 s.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(
        compute_rdp(
            q=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=1,
            orders=list(RDPAccountant.DEFAULT_ALPHAS),
        )
    )
    curve.setflags(write=False)
    return curve


class RdpTracker:
    """Renyi DP of a growing history, one (cached) RDP evaluation per added step.

    Sums the RDP curve of each subsampled Gaussian step at Opacus's default orders, which is what
    ``RDPAccountant`` does over its history; epsilon is converted the same way (Balle et al.
    2020, Theorem 21, as in Opacus).
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant

        self.orders = list(RDPAccountant.DEFAULT_ALPHAS)
        self.rdp = np.zeros(len(self.orders))

    def add(self, step: MechanismStep) -> None:
        """Compose one more step."""
        if step.noise_multiplier == 0:
            self.rdp = np.full(len(self.orders), np.inf)
            return
        self.rdp = self.rdp + step.steps * _rdp_curve(step.noise_multiplier, step.sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything added so far (0 for nothing), >= 0.

        Clamped at 0 where the conversion of Balle et al. 2020, Theorem 21 goes below it (large
        delta; see :func:`_non_negative_epsilon`), as :func:`compute_epsilon` does.

        Raises
        ------
        ValueError
            If ``delta`` is out of range or the conversion comes out NaN.
        """
        from opacus.accountants.analysis.rdp import get_privacy_spent

        check_delta("delta", delta)
        if not np.any(self.rdp):
            return 0.0
        eps, _ = get_privacy_spent(orders=self.orders, rdp=self.rdp, delta=delta)
        return _non_negative_epsilon(
            float(eps), accountant=AccountantKind.RDP, what=f"the tracked history at delta={delta}"
        )


class PrivacyAccountant:
    """The privacy spent by a run so far: a history of mechanism steps at one delta.

    Like Opacus's ``IAccountant``: :meth:`step` composes one more use of the mechanism,
    :attr:`history` is what was composed. RDP is tracked incrementally (:class:`RdpTracker`), so
    :attr:`epsilon_rdp` is a lookup; :meth:`epsilon_prv` composes the merged history with the PRV
    accountant (the reported, tighter epsilon), capped by RDP, which also bounds it. A resumed
    run rebuilds its accountant from the steps its ledger recorded (``history``).

    Parameters
    ----------
    delta : float
        Target delta, in (0, 1).
    history : Iterable[MechanismStep], default ()
        Steps already composed (when resuming).
    """

    def __init__(self, *, delta: float, history: Iterable[MechanismStep] = ()) -> None:
        check_delta("delta", delta)
        self.delta = delta
        self.history: list[MechanismStep] = []
        self._rdp = RdpTracker()
        for step in history:
            self.step(step)

    def step(self, step: MechanismStep) -> None:
        """Compose one more (possibly repeated) use of the mechanism."""
        self.history.append(step)
        self._rdp.add(step)

    @property
    def epsilon_rdp(self) -> float:
        """RDP epsilon of the history at :attr:`delta` (0 for an empty history), >= 0."""
        return self._rdp.epsilon(self.delta)

    def epsilon_prv(self) -> float:
        """PRV epsilon of the whole (merged) history, capped by the RDP epsilon, >= 0.

        :func:`compute_epsilon` already clamps at 0 and falls back to RDP, with a warning, where
        the PRV accountant cannot evaluate the history. The cap by :attr:`epsilon_rdp` is valid
        since both bound the same epsilon, and keeps the claimed PRV epsilon at or below the
        claimed RDP one.
        """
        if not self.history:
            return 0.0
        rdp = self.epsilon_rdp
        prv = compute_epsilon(
            merged_history(self.history), delta=self.delta, accountant=AccountantKind.PRV
        )
        return min(prv, rdp)


@functools.lru_cache(maxsize=256)
def client_epsilon_after(
    *, server_round: int, noise_multiplier: float, sample_rate: float, delta: float
) -> float:
    """A client's epsilon once round ``server_round`` has run (RDP, an upper bound of PRV), >= 0.

    Every round counts, sampled or not: the guarantee of Poisson subsampling composes over all
    rounds at rate q (the client cannot see rounds it was not invited to, so it counts them
    from the round number). Each client's budget guard and the in-process engine use it. Never
    negative nor NaN (:func:`compute_epsilon`), so a guard's ``epsilon > budget`` is meaningful.
    """
    return compute_epsilon(
        [MechanismStep(noise_multiplier, sample_rate, server_round)],
        delta=delta,
        accountant=AccountantKind.RDP,
    )


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of one Gaussian mechanism with ``mu = sensitivity / std``.

    The analytic Gaussian mechanism (Balle and Wang 2018, Theorem 8): ``(epsilon, delta)``-DP
    holds iff ``Phi(mu/2 - epsilon/mu) - e^epsilon Phi(-mu/2 - epsilon/mu) <= delta``; the
    smallest such epsilon is found by bisection to 1e-9 relative, rounded up. 0 for ``mu = 0``.
    """
    from scipy.stats import norm

    check_delta("delta", delta)
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    if mu == 0:
        return 0.0

    def delta_of(eps: float) -> float:
        # e^eps * Phi(b) in log space: eps reaches mu^2 / 2, far beyond exp's range
        tail = math.exp(min(eps + float(norm.logcdf(-mu / 2 - eps / mu)), 700.0))
        return float(norm.cdf(mu / 2 - eps / mu)) - tail

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, max(1.0, mu * mu)
    while delta_of(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


class AggregatorView:
    """Each client's epsilon against the aggregator, which knows who took part: no amplification.

    Against whoever sees only the released models, Poisson sampling amplifies privacy. The
    aggregator asked the clients itself, so against it a client's privacy loss composes only
    the releases that client took part in, each a Gaussian mechanism at sample rate 1 with the
    noise the aggregator sees: the decrypted sum's (its effective z) when updates are
    encrypted, else the client's own share (``z / sqrt(m)``). Gaussian mechanisms compose
    exactly into one with ``mu^2 = sum 1 / z_i^2`` (Dong, Roth and Su 2019), so the run's
    figure is :func:`gaussian_epsilon` of the client with the largest sum: :meth:`epsilon`.

    Parameters
    ----------
    delta:
        The run's delta.
    """

    def __init__(self, *, delta: float) -> None:
        check_delta("delta", delta)
        self.delta = delta
        self._inverse_variance: dict[int, float] = {}

    def add(self, participants: Iterable[int], noise_multiplier: float) -> None:
        """One release seen by the aggregator: ``participants`` (client positions) took part,
        with noise multiplier ``noise_multiplier`` (> 0) relative to their sensitivity."""
        check_positive("noise_multiplier", noise_multiplier)
        charge = 1.0 / noise_multiplier**2
        for client in participants:
            self._inverse_variance[client] = self._inverse_variance.get(client, 0.0) + charge

    def epsilon_after(self, client: int, noise_multiplier: float) -> float:
        """``client``'s epsilon against the aggregator once it takes part in one more release
        at ``noise_multiplier``: what its own budget guard checks."""
        check_positive("noise_multiplier", noise_multiplier)
        charge = self._inverse_variance.get(client, 0.0) + 1.0 / noise_multiplier**2
        return gaussian_epsilon(math.sqrt(charge), self.delta)

    @property
    def worst_mu(self) -> float:
        """``sqrt(max over clients of sum 1 / z_i^2)``: the most exposed client's mu."""
        return math.sqrt(max(self._inverse_variance.values(), default=0.0))

    def epsilon(self) -> float:
        """The largest epsilon of any client so far (0 before any release)."""
        return gaussian_epsilon(self.worst_mu, self.delta)


def aggregator_noise_multiplier(
    *, effective_noise_multiplier: float, noise_multiplier: float, expected: float, encrypted: bool
) -> float:
    """The noise multiplier of one release as the aggregator sees it (:class:`AggregatorView`):
    the sum's ``effective_noise_multiplier`` when encrypted, else one client's own share
    ``noise_multiplier / sqrt(expected)`` (it sees each update before the sum)."""
    if encrypted:
        return effective_noise_multiplier
    return noise_multiplier / math.sqrt(expected)

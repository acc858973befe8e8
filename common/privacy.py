"""Differential-privacy math of client-level DP-FedAvg, with Opacus accountants.

Implements the client side (clip, noise) and the accounting of DP-FedAvg with a fixed
denominator: McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (ICLR 2018), Algorithm 1 and section 2 ("DP-FedAvg"). One training round (see
DESIGN.md, "One training round") is one use of the Poisson-subsampled Gaussian mechanism:

- each invited client is sampled independently with probability ``q`` (the sample rate);
- each participant clips its update ``Delta`` to L2 norm ``C`` (:func:`clip_inplace`) and adds its
  share ``N(0, (z C)^2 / m)`` of the Gaussian noise (:func:`client_noise_std`,
  :func:`add_gaussian_noise_inplace`), ``m = q * population`` the expected participant count;
- the server sums the noised updates and divides by ``m``; relative to the sensitivity ``C`` the
  sum carries noise multiplier ``z * sqrt(k / m)`` for ``k`` actual participants
  (:func:`effective_noise_multiplier`), which is what the ledger records and accounts.

Epsilon is accounted with Opacus (:func:`compute_epsilon`): Renyi DP (Mironov 2017; Mironov, Talwar
and Zhang 2019) or the numerically tighter PRV accountant (Gopi, Lee and Wutschitz 2021). DESIGN.md
asks to report PRV and keep RDP as a check, with ``delta <= 1 / N^1.1`` (:func:`default_delta`).

Every privacy parameter is keyword-only and checked here, at the boundary: ``math.isfinite`` on
every float (NaN passes ``x <= 0``), ``epsilon > 0``, ``0 < delta < 1``, ``clip > 0``,
``noise_multiplier >= 0``, ``0 < q <= 1``. Violations raise ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "AccountantKind",
    "MechanismStep",
    "add_gaussian_noise_inplace",
    "calibrate_noise_multiplier",
    "client_noise_std",
    "clip_inplace",
    "compute_epsilon",
    "default_delta",
    "effective_noise_multiplier",
    "l2_norm",
]

PRV_EPS_ERROR = 0.01
"""Additive error allowed in the PRV accountant's epsilon (Opacus ``eps_error``). The accountant
returns the upper end of its error interval, so the reported epsilon stays a valid bound; 0.01 is
Opacus's own default and negligible next to typical budgets (epsilon 1 to 10)."""

PRV_MAX_GRID_POINTS = 10_000_000
"""Largest PRV discretisation grid (points) :func:`compute_epsilon` agrees to build: about 20 s and
1 GB. The grid grows with epsilon, so only epsilons far beyond any useful budget (hundreds) hit it,
e.g. z=0.3, q=0.5 over 10,000 rounds (RDP epsilon about 29,000); those raise ``ValueError``."""

MAX_NOISE_MULTIPLIER = 1000.0
"""Largest noise multiplier :func:`calibrate_noise_multiplier` tries before it calls a target
epsilon unreachable. RDP with Opacus's default orders cannot certify epsilon below about 0.1 at
delta=1e-5, whatever the noise."""

_MAX_INTERPOLATIONS = 8
"""Interpolation steps of :func:`_smallest_noise_multiplier` before it falls back to bisection."""


class AccountantKind(StrEnum):
    """Which Opacus accountant composes the rounds."""

    RDP = "rdp"
    """Renyi DP (Mironov 2017), Opacus ``RDPAccountant``: fast, looser; the cross-check."""
    PRV = "prv"
    """Privacy loss random variables (Gopi et al. 2021), Opacus ``PRVAccountant``: tighter;
    the epsilon DESIGN.md reports."""


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_delta(name: str, value: float) -> None:
    _check_finite(name, value)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def _check_sample_rate(name: str, value: float) -> None:
    _check_finite(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


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
        _check_non_negative("noise_multiplier", self.noise_multiplier)
        _check_sample_rate("sample_rate", self.sample_rate)
        _check_count("steps", self.steps, minimum=1)


class _GridTooLargeError(ValueError):
    """The PRV grid for this history exceeds :data:`PRV_MAX_GRID_POINTS` (epsilon is huge)."""


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
                raise _GridTooLargeError(
                    f"PRV accountant would need {domain.size:,} grid points "
                    f"(limit {PRV_MAX_GRID_POINTS:,}): epsilon is far beyond any useful budget; "
                    "use AccountantKind.RDP for such histories"
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
        Epsilon; 0.0 for an empty history, ``math.inf`` if any step has noise multiplier 0.

    Raises
    ------
    ValueError
        If ``delta`` is out of range, or the PRV accountant cannot evaluate the history (its grid
        would exceed :data:`PRV_MAX_GRID_POINTS`, or its numerics fail).
    """
    _check_delta("delta", delta)
    kind = AccountantKind(accountant)
    if not history:
        return 0.0
    if any(step.noise_multiplier == 0 for step in history):
        return math.inf
    acc = _new_accountant(kind)
    # Opacus 1.6 history format: (noise_multiplier, sample_rate, steps), one entry per run of
    # identical steps; both accountants compose the entries.
    acc.history = [(step.noise_multiplier, step.sample_rate, step.steps) for step in history]
    if kind is AccountantKind.RDP:
        return float(acc.get_epsilon(delta))
    try:
        # q = 1 makes the PRV take log(0) = -inf, which it handles; silence only that warning.
        with np.errstate(divide="ignore"):
            return float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except _GridTooLargeError:
        raise
    except (RuntimeError, ValueError, FloatingPointError) as err:
        raise ValueError(f"PRV accountant failed for this history: {err}") from err


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` rounds stays within the target.

    Bracketing search (:func:`_smallest_noise_multiplier`) on z for
    ``compute_epsilon([MechanismStep(z, q, steps)]) <= target``: the inverse of the accounting of
    DP-FedAvg (McMahan et al. 2018, section 2), as Opacus's ``get_noise_multiplier`` but with a
    relative tolerance on z. Only a z whose epsilon was computed and found within the target is
    ever returned, so the result never overshoots, even where the numerical PRV epsilon is not
    exactly monotone in z.

    Parameters
    ----------
    target_epsilon : float
        Budget epsilon, > 0.
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        q, the Poisson sampling probability of a client per round, in (0, 1].
    steps : int
        Number of rounds, >= 1.
    accountant : AccountantKind
        Which Opacus accountant to calibrate with.
    tolerance : float, default 0.01
        Relative precision on z, in (0, 1): the returned z and the largest z known to overshoot
        differ by at most ``tolerance * z``.

    Returns
    -------
    float
        z with ``epsilon(z) <= target_epsilon`` and, for a monotone accountant,
        ``epsilon(z * (1 - tolerance)) > target_epsilon``.

    Raises
    ------
    ValueError
        If a parameter is out of range, or even z = :data:`MAX_NOISE_MULTIPLIER` cannot reach
        ``target_epsilon``.
    """
    _check_positive("target_epsilon", target_epsilon)
    _check_delta("delta", delta)
    _check_sample_rate("sample_rate", sample_rate)
    _check_count("steps", steps, minimum=1)
    _check_positive("tolerance", tolerance)
    if tolerance >= 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")

    def epsilon_of(z: float) -> float:
        step = MechanismStep(noise_multiplier=z, sample_rate=sample_rate, steps=steps)
        try:
            return compute_epsilon([step], delta=delta, accountant=accountant)
        except _GridTooLargeError:
            return math.inf  # the PRV grid only explodes for enormous epsilons

    z = _smallest_noise_multiplier(epsilon_of, target=target_epsilon, tolerance=tolerance)
    if not math.isfinite(z):
        raise ValueError(
            f"{accountant} accountant cannot reach epsilon={target_epsilon} at delta={delta}, "
            f"q={sample_rate}, steps={steps}, even with noise multiplier {MAX_NOISE_MULTIPLIER}"
        )
    return z


def _log_interpolate(low: tuple[float, float], high: tuple[float, float], target: float) -> float:
    """z where the line through ``(log z, log epsilon)`` of ``low`` and ``high`` meets ``target``.

    Epsilon is close to a power of z (about ``1/z`` for small q), so this lands near the root.
    Returns the geometric midpoint when the line is undefined (infinite or equal epsilons).
    """
    (z_low, eps_low), (z_high, eps_high) = low, high
    if not (math.isfinite(eps_low) and 0 < eps_high < eps_low):
        return math.sqrt(z_low * z_high)
    fraction = math.log(eps_low / target) / math.log(eps_low / eps_high)
    return z_low * (z_high / z_low) ** fraction


def _smallest_noise_multiplier(
    epsilon_of: Callable[[float], float], *, target: float, tolerance: float
) -> float:
    """Bracketing search for the smallest z with ``epsilon_of(z) <= target``, to ``tolerance``.

    A safeguarded regula falsi in log-log space: steps out from z=1 by the epsilon ratio to
    bracket the root, then interpolates (:func:`_log_interpolate`), nudging each guess by a third
    of the tolerance to the side that has not moved last, so that an accurate guess closes the
    bracket in two evaluations. Falls back to bisection after ``_MAX_INTERPOLATIONS`` guesses.
    About 5 evaluations instead of bisection's 10 (each costs 0.1 to 1 s).

    Returns ``math.inf`` when even :data:`MAX_NOISE_MULTIPLIER` overshoots.
    """
    # Bracket: ``low`` overshoots the target, ``high`` does not; pairs are (z, epsilon(z)).
    z = 1.0
    eps = epsilon_of(z)
    if eps <= target:
        high = (z, eps)
        while True:  # z -> 0 gives epsilon -> inf, so this ends
            ratio = eps / target if eps > 0 else 0.0
            z = z * min(max(ratio * (1 - tolerance), 1 / 16), 1 / 1.25)
            eps = epsilon_of(z)
            if eps > target:
                low = (z, eps)
                break
            high = (z, eps)
        moved_high = False
    else:
        low = (z, eps)
        while True:
            if z >= MAX_NOISE_MULTIPLIER:
                return math.inf
            ratio = eps / target if math.isfinite(eps) else 16.0
            z = min(z * min(max(ratio * (1 + tolerance), 1.25), 16.0), MAX_NOISE_MULTIPLIER)
            eps = epsilon_of(z)
            if eps <= target:
                high = (z, eps)
                break
            low = (z, eps)
        moved_high = True

    for attempt in itertools.count():
        (z_low, _), (z_high, _) = low, high
        if z_high - z_low <= tolerance * z_high:
            return z_high
        if attempt < _MAX_INTERPOLATIONS:
            nudge = 1 - tolerance / 3 if moved_high else 1 + tolerance / 3
            guess = _log_interpolate(low, high, target) * nudge
            # Stay strictly inside the bracket, so that it shrinks at every step.
            margin = (z_high / z_low) ** 0.05
            z = min(max(guess, z_low * margin), z_high / margin)
        else:
            z = math.sqrt(z_low * z_high)
        eps = epsilon_of(z)
        moved_high = eps <= target
        if moved_high:
            high = (z, eps)
        else:
            low = (z, eps)
    raise AssertionError("unreachable")  # itertools.count() never ends


def default_delta(population: int) -> float:
    """Default delta ``1 / N^1.1`` for a population of ``N`` clients (DESIGN.md).

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
    _check_count("population", population, minimum=2)
    return float(population) ** -1.1


def effective_noise_multiplier(
    *, noise_multiplier: float, participated: int, expected: float
) -> float:
    """Noise multiplier of a round's sum, relative to the sensitivity C: ``z * sqrt(k / m)``.

    Each of the ``k`` participants adds ``N(0, z^2 C^2 / m)`` (:func:`client_noise_std`); the sum
    carries ``N(0, z^2 C^2 k / m)`` while one client moves it by at most C (DP-FedAvg with a fixed
    denominator, McMahan et al. 2018, Algorithm 1). Fewer participants than expected means less
    noise; the ledger records this value for the round.

    Parameters
    ----------
    noise_multiplier : float
        z, the nominal multiplier, >= 0.
    participated : int
        k, clients whose update entered the sum, >= 0.
    expected : float
        m, the expected participant count ``q * population``, > 0.

    Returns
    -------
    float
        ``z * sqrt(k / m)``; 0.0 when ``k = 0``. Nothing is released then: callers skip the round
        and record no mechanism step (a recorded 0 would account as epsilon = inf).
    """
    _check_non_negative("noise_multiplier", noise_multiplier)
    _check_count("participated", participated, minimum=0)
    _check_positive("expected", expected)
    return noise_multiplier * math.sqrt(participated / expected)


def client_noise_std(
    *, noise_multiplier: float, clip: float, expected_participants: float
) -> float:
    """Std of the Gaussian noise one client adds to its clipped update: ``z C / sqrt(m)``.

    With ``m`` participants the shares sum to the ``N(0, (z C)^2)`` that DP-FedAvg adds to the sum
    (McMahan et al. 2018, Algorithm 1), so no party ever sees the un-noised sum.

    Parameters
    ----------
    noise_multiplier : float
        z, >= 0.
    clip : float
        C, the L2 clipping norm of an update, > 0 (same units as the update).
    expected_participants : float
        m, the expected participant count ``q * population``, > 0.

    Returns
    -------
    float
        The per-client std, in the units of the update.
    """
    _check_non_negative("noise_multiplier", noise_multiplier)
    _check_positive("clip", clip)
    _check_positive("expected_participants", expected_participants)
    return noise_multiplier * clip / math.sqrt(expected_participants)


def _check_floating(arrays: Mapping[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"arrays[{name!r}] must be floating point, got dtype {array.dtype}")


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm of an update made of several arrays, as if flattened into one vector.

    The norm DP-FedAvg clips (McMahan et al. 2018, Algorithm 1, ``ClipFn``: flat clipping).
    Accumulated in float64, so float32 updates neither overflow nor lose precision.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The update, e.g. parameter name to delta array; may be empty (norm 0).

    Returns
    -------
    float
        ``sqrt(sum of squares of every element)``.

    Raises
    ------
    ValueError
        If any element is NaN or infinite ("update is not finite").
    """
    total = 0.0
    for name, array in arrays.items():
        flat = np.asarray(array, dtype=np.float64).ravel()  # (numel,)
        if not np.isfinite(flat).all():
            raise ValueError(f"update is not finite: arrays[{name!r}] holds NaN or inf")
        total += float(flat @ flat)
    if not math.isfinite(total):
        raise ValueError("update is not finite: its squared norm overflows float64")
    return math.sqrt(total)


def clip_inplace(arrays: dict[str, np.ndarray], *, max_norm: float) -> float:
    """Scale an update in place by ``min(1, C / ||Delta||)`` (McMahan et al. 2018, Algorithm 1).

    A zero update (an unchanged model) is left as it is: unlike flwr's ``clip_inputs_inplace``
    nothing divides by its norm.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        The update, floating-point arrays; modified in place, dtypes kept.
    max_norm : float
        C, the L2 clipping norm, > 0.

    Returns
    -------
    float
        The global L2 norm before clipping.

    Raises
    ------
    ValueError
        If ``max_norm`` is out of range or the update holds NaN or inf.
    TypeError
        If an array is not floating point.
    """
    _check_positive("max_norm", max_norm)
    _check_floating(arrays)
    norm = l2_norm(arrays)
    if norm > max_norm:  # norm > C > 0: the division is safe
        scale = max_norm / norm
        for array in arrays.values():
            array *= scale
    return norm


def add_gaussian_noise_inplace(
    arrays: dict[str, np.ndarray], *, std: float, rng: np.random.Generator
) -> None:
    """Add i.i.d. ``N(0, std^2)`` noise to every element, in place (Gaussian mechanism).

    The client's share of DP-FedAvg's noise (McMahan et al. 2018, Algorithm 1); use
    :func:`client_noise_std` for ``std``. Noise is drawn in float64 in the dict's order, then
    added in each array's dtype (float32 stays float32), so a seed gives the same noise for any
    dtype.

    Parameters
    ----------
    arrays : dict[str, np.ndarray]
        The clipped update, floating-point arrays; modified in place.
    std : float
        Noise standard deviation, >= 0, in the units of the update; 0 adds nothing and draws
        nothing from ``rng``.
    rng : np.random.Generator
        Source of the noise; use a cryptographically seeded generator in production.

    Raises
    ------
    ValueError
        If ``std`` is negative or not finite.
    TypeError
        If an array is not floating point.
    """
    _check_non_negative("std", std)
    _check_floating(arrays)
    if std == 0:
        return
    for array in arrays.values():
        array += rng.normal(0.0, std, size=array.shape)  # (same shape as array), float64

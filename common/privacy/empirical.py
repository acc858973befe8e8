"""Empirical lower bounds on epsilon from a one-run privacy audit.

Implements the statistics of Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv:2305.08846). ``m`` canaries are each included in the training
set independently with probability 1/2; after one training run the auditor looks at the output,
guesses "included" or "excluded" for ``r`` of the canaries and abstains on the rest
(:func:`audit_guesses`); ``v`` guesses are right. The paper's main theorem bounds how many right
guesses an (epsilon, delta)-DP mechanism allows:

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u],

i.e. for delta = 0 the number of right guesses is stochastically dominated by ``Binomial(r,
e^eps / (1 + e^eps))`` (the accuracy of eps-DP randomized response), and delta > 0 adds the
correction term. :func:`one_run_p_value` is that right-hand side (the p-value of "the mechanism
is (epsilon, delta)-DP" given ``v`` right guesses, as in the paper's Algorithm 2);
:func:`epsilon_lower_bound` is Algorithm 2's binary search for the largest epsilon that the
observation rejects at the given confidence.

The bound is valid whatever the guessing strategy, as long as ``r`` (the number of guesses) is
fixed before the output is seen; an auditor who tries several ``(k_plus, k_minus)`` must pay
for it, e.g. with a union bound (see ``simulations.audit_empirical``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit
from scipy.stats import binom

__all__ = ["audit_guesses", "epsilon_lower_bound", "one_run_p_value"]

_BISECTION_STEPS = 50
"""Halvings of the epsilon bracket in :func:`epsilon_lower_bound`: the bracket is at most a few
tens wide, so 50 steps leave an error far below 1e-9."""

_MAX_EPSILON = 1000.0
"""Epsilons beyond this are not searched: the p-value of any finite observation has reached its
limit long before (randomized response with eps = 1000 is always right)."""


def _check_counts(*, m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m!r}")
    if r > m:
        raise ValueError(f"r must be <= m (one guess per canary at most), got r={r}, m={m}")
    if v > r:
        raise ValueError(f"v must be <= r (right guesses among r), got v={v}, r={r}")


def _check_delta(delta: float) -> None:
    # delta = 0 (pure DP) is a meaningful null hypothesis here, unlike for a claimed guarantee.
    if not (math.isfinite(delta) and 0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[at least ``v`` right guesses out of ``r``] for an (epsilon, delta)-DP mechanism.

    Steinke, Nasr and Jagielski 2023, main theorem and Algorithm 2: with
    ``f(u) = P[Binomial(r, p) >= u]`` and ``p = e^eps / (1 + e^eps)``, returns
    ``min(1, f(v) + 2 m delta * max_{i=1..v} (f(v - i) - f(v)) / i)``. Since
    ``f(v - i) - f(v) = P[v - i <= Binomial(r, p) < v]``, the maximum is a running sum of the
    binomial pmf below ``v``, divided by ``i``.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2, >= 1.
    r : int
        Number of guesses (canaries not abstained on), 0 <= r <= m.
    v : int
        Number of right guesses, 0 <= v <= r.
    epsilon : float
        Epsilon of the null hypothesis, >= 0.
    delta : float
        Delta of the null hypothesis, in [0, 1).

    Returns
    -------
    float
        The p-value, in [0, 1]; 1.0 when ``v = 0``.
    """
    _check_counts(m=m, r=r, v=v)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    _check_delta(delta)
    if v == 0:
        return 1.0
    p = float(expit(epsilon))  # accuracy of eps-DP randomized response, e^eps / (1 + e^eps)
    tail = float(binom.sf(v - 1, r, p))  # f(v) = P[Binomial(r, p) >= v]
    if delta == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, p)  # (v,) P[B = v-1], ..., P[B = 0]
    # (v,) i-th entry: P[v - i <= B < v] / i for i = 1..v
    per_step = np.cumsum(below) / np.arange(1, v + 1)
    return min(tail + 2 * m * delta * float(per_step.max()), 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon that ``v`` right guesses out of ``r`` rule out at ``confidence``.

    Steinke, Nasr and Jagielski 2023, Algorithm 2: binary search for the largest ``eps`` with
    ``one_run_p_value(eps) < 1 - confidence`` (the p-value grows with ``eps``). With probability
    at least ``confidence`` over the inclusion bits and the mechanism's randomness, a mechanism
    that is (eps, delta)-DP does not produce an observation whose bound exceeds ``eps``.

    Worked case (delta = 0, m = r = v = 100, 95%): the p-value is ``p^100`` with
    ``p = e^eps / (1 + e^eps)``, below 0.05 iff ``p < 0.05^(1/100) = 0.97049``, so the bound is
    ``log(0.97049 / 0.02951) = 3.493``.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2, >= 1.
    r : int
        Number of guesses, fixed before the output is seen, 0 <= r <= m.
    v : int
        Number of right guesses, 0 <= v <= r.
    delta : float
        Delta of the guarantee under test, in [0, 1); use the claimed guarantee's delta.
    confidence : float, default 0.95
        Probability, in (0, 1), that the bound does not exceed the true epsilon.

    Returns
    -------
    float
        The lower bound (>= 0; 0.0 when even eps = 0 is not rejected), to within 1e-9.
    """
    _check_counts(m=m, r=r, v=v)
    _check_delta(delta)
    if not (math.isfinite(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1 - confidence

    def rejected(epsilon: float) -> bool:
        return one_run_p_value(m=m, r=r, v=v, epsilon=epsilon, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    # Bracket: ``low`` is rejected, ``high`` is not (or is the search limit).
    low, high = 0.0, 1.0
    while rejected(high) and high < _MAX_EPSILON:
        low, high = high, min(2 * high, _MAX_EPSILON)
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def audit_guesses(
    scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """Guess "included" for the ``k_plus`` highest scores, "excluded" for the ``k_minus`` lowest.

    The guessing rule of Steinke, Nasr and Jagielski 2023 (section 7): abstain on the canaries in
    between. Ties are broken by canary index (a stable sort), which carries no information as the
    inclusion bits are drawn independently of it.

    Parameters
    ----------
    scores : np.ndarray
        ``(m,)`` score per canary, higher meaning "more likely included"; finite.
    included : np.ndarray
        ``(m,)`` bool, the secret inclusion bits.
    k_plus, k_minus : int
        Numbers of "included" and "excluded" guesses, >= 0, ``k_plus + k_minus <= m``.

    Returns
    -------
    tuple[int, int]
        ``(r, v)``: the number of guesses ``k_plus + k_minus`` and how many were right.
    """
    scores = np.asarray(scores)
    included = np.asarray(included)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError(
            f"scores and included must be 1-D of the same length, got shapes {scores.shape} "
            f"and {included.shape}"
        )
    if included.dtype != np.bool_:
        raise ValueError(f"included must be a bool array, got dtype {included.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    m = scores.shape[0]
    for name, value in (("k_plus", k_plus), ("k_minus", k_minus)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus must be <= m = {m}, got {k_plus} + {k_minus}")
    order = np.argsort(scores, kind="stable")  # (m,) ascending
    guessed_in = order[m - k_plus :]  # (k_plus,)
    guessed_out = order[:k_minus]  # (k_minus,)
    right = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_plus + k_minus, right

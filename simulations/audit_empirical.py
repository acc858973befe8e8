"""Empirical privacy audit of client-level DP-FedAvg with canary clients, in one training run.

The one-run audit of Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training
Run", NeurIPS 2023) in its white-box "Dirac canary" setting, run on the same client-side math as
fedrec's clients (:mod:`common.privacy`: clip to C, each participant adds its share
``N(0, (z C)^2 / m_exp)``, the server sums and divides by ``m_exp``; McMahan et al. 2018,
Algorithm 1), but without Flower or a model, so that an audit takes about a second:

- the model update space is R^d; ``m`` canary clients each own one coordinate (a Dirac canary,
  ``d >= m``) and submit, whenever sampled, an update of ``2 C`` on it, clipped to C;
- each canary is registered with probability 1/2 (the secret inclusion bits); every round, each
  of the ``N`` benign clients and each registered canary takes part with probability ``q``;
- the auditor sees every released aggregate and scores each canary by its coordinate of their sum
  (the final model of FedAvg with server learning rate 1), then guesses with
  :func:`common.privacy.empirical.audit_guesses` and turns (r, v) into a bound with
  :func:`common.privacy.empirical.epsilon_lower_bound`.

Shortcuts, each statistically equivalent or conservative for the claim "the bound stays below the
claimed epsilon":

- only the ``m`` canary coordinates are simulated: nothing else enters the scores;
- the ``k`` noise shares of a round are drawn as one Gaussian of std ``sqrt(k) z C / sqrt(m_exp)``
  (a sum of independent Gaussians: exact);
- a benign client's update is a uniformly random direction of norm C (the largest the clip lets
  through); its coordinates on the canary coordinates are close to i.i.d. ``N(0, C^2 / d)`` when
  ``d >> m``, so the ``k_b`` benign updates of a round are drawn as one ``N(0, k_b C^2 / d)`` per
  coordinate (central limit theorem; exact in mean and covariance).

The auditor tries a fixed grid of ``(k_plus, k_minus)`` chosen from public parameters only, and
pays for the choice with a union bound: each try is tested at level ``(1 - confidence) / tries``,
so the best bound over the grid holds with probability ``confidence``.

Run it (prints DP off and DP on side by side)::

    python -m simulations.audit_empirical --noise-multiplier 1.0 --rounds 100 --sample-rate 0.01
    python -m simulations.audit_empirical --target-epsilon 4 --rounds 100 --sample-rate 0.01
    python -m simulations.audit_empirical --tiny      # a small, fast run
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from common.privacy import (
    AccountantKind,
    MechanismStep,
    add_gaussian_noise_inplace,
    calibrate_noise_multiplier,
    client_noise_std,
    clip_inplace,
    compute_epsilon,
    default_delta,
)
from common.privacy.empirical import audit_guesses, epsilon_lower_bound

__all__ = ["DEFAULT_DIM", "AuditResult", "main", "run_audit"]

logger = logging.getLogger(__name__)

DEFAULT_DIM = 2_000_000
"""Default model dimension d: about the Mult-VAE's parameter count at ML-100K size
(I-600-200-600-I with I = 1413 items has 2.06 million)."""

_CANARY_GAIN = 2.0
"""A canary's raw update is ``_CANARY_GAIN * C`` on its coordinate; clipping brings it to C, the
largest change one client may make."""

_GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.9)
"""``k_plus`` candidates, as fractions of the expected number of registered canaries that are
sampled at least once (the ones that can leave a trace); each is tried with ``k_minus = 0`` and
with ``k_minus = k_plus``."""


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one canary audit (one training run)."""

    noise_multiplier: float
    """z of the audited run; 0 means DP off (clipping stays on)."""
    claimed_epsilon: float
    """Epsilon the accountant claims (PRV, nominal z, same q, rounds and delta); inf if z = 0."""
    epsilon_lower_bound: float
    """Empirical lower bound on epsilon at ``confidence`` (Steinke et al. 2023); >= 0."""
    delta: float
    """Delta of the claimed guarantee, also used in the bound."""
    confidence: float
    """Probability that the bound is valid, over the whole grid of guess counts."""
    m: int
    """Number of canaries, each registered with probability 1/2."""
    r: int
    """Guesses made by the best try (``k_plus + k_minus``)."""
    v: int
    """Right guesses of the best try."""
    k_plus: int
    """"Included" guesses of the best try (highest scores)."""
    k_minus: int
    """"Excluded" guesses of the best try (lowest scores)."""

    @property
    def accuracy(self) -> float:
        """``v / r``, the share of right guesses (nan when no guess was made)."""
        return self.v / self.r if self.r else math.nan


def _check_inputs(
    *,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    rounds: int,
    population: int,
    delta: float,
    canaries: int,
    dim: int,
    confidence: float,
) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (math.isfinite(confidence) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    for name, value, minimum in (
        ("rounds", rounds, 1),
        ("population", population, 0),
        ("canaries", canaries, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < canaries:
        raise ValueError(f"dim must be an integer >= canaries = {canaries}, got {dim!r}")


def _canary_scores(
    *,
    included: np.ndarray,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    rounds: int,
    population: int,
    dim: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Run DP-FedAvg with Dirac canaries; return the final model on the canary coordinates.

    ``included`` is the ``(m,)`` bool vector of registered canaries. Returns ``(m,)`` scores: the
    sum over rounds of the released aggregates, on canary ``i``'s coordinate.
    """
    m = included.shape[0]
    # The server's fixed denominator must not depend on the secret bits: use their expectation.
    expected = sample_rate * (population + m / 2)
    canary_update = {"canary": np.array([_CANARY_GAIN * clip])}  # its one non-zero coordinate
    clip_inplace(canary_update, max_norm=clip)
    canary_value = float(canary_update["canary"][0])  # = clip
    share_std = client_noise_std(
        noise_multiplier=noise_multiplier, clip=clip, expected_participants=expected
    )
    model = np.zeros(m)  # (m,) final model on the canary coordinates
    for _ in range(rounds):
        sampled = included & (rng.random(m) < sample_rate)  # (m,) canaries taking part
        benign = int(rng.binomial(population, sample_rate))
        participants = benign + int(sampled.sum())
        if participants == 0:
            continue  # nothing is released in an empty round
        total = np.where(sampled, canary_value, 0.0)  # (m,) canaries' clipped updates
        total += rng.normal(0.0, clip * math.sqrt(benign / dim), size=m)  # benign updates
        noised = {"sum": total}
        add_gaussian_noise_inplace(noised, std=share_std * math.sqrt(participants), rng=rng)
        model += noised["sum"] / expected
    return model


def _guess_grid(*, m: int, sample_rate: float, rounds: int) -> list[tuple[int, int]]:
    """``(k_plus, k_minus)`` tries, from public parameters only (never from the scores)."""
    seen = m / 2 * (1 - (1 - sample_rate) ** rounds)  # registered canaries sampled at least once
    grid: list[tuple[int, int]] = []
    for fraction in _GUESS_FRACTIONS:
        k = max(1, round(fraction * seen))
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in grid:
                grid.append(pair)
    return grid


def run_audit(
    *,
    noise_multiplier: float,
    clip: float,
    sample_rate: float,
    rounds: int,
    population: int,
    delta: float,
    canaries: int = 1000,
    dim: int | None = None,
    seed: int = 0,
    confidence: float = 0.95,
) -> AuditResult:
    """One-run canary audit of DP-FedAvg (Steinke, Nasr and Jagielski 2023, Dirac canaries).

    Parameters
    ----------
    noise_multiplier : float
        z, >= 0; 0 audits DP off (clipping still on).
    clip : float
        C, the clipping norm, > 0.
    sample_rate : float
        q, each client's probability to take part in a round, in (0, 1].
    rounds : int
        Training rounds, >= 1.
    population : int
        Benign clients N, >= 0; the canaries come on top.
    delta : float
        Delta of the claimed guarantee, in (0, 1) (fedrec's default is ``1 / N^1.1``).
    canaries : int, default 1000
        m, number of canary clients, >= 1.
    dim : int or None, default None
        d, the model dimension, >= m; None means :data:`DEFAULT_DIM`.
    seed : int, default 0
        Seeds the inclusion bits, the sampling and all noise.
    confidence : float, default 0.95
        Probability that the bound is valid, in (0, 1).

    Returns
    -------
    AuditResult
        The claimed epsilon, the empirical lower bound and the best try's (r, v).
    """
    dim = DEFAULT_DIM if dim is None else dim
    _check_inputs(
        noise_multiplier=noise_multiplier,
        clip=clip,
        sample_rate=sample_rate,
        rounds=rounds,
        population=population,
        delta=delta,
        canaries=canaries,
        dim=dim,
        confidence=confidence,
    )
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5  # (m,) the secret bits
    scores = _canary_scores(
        included=included,
        noise_multiplier=noise_multiplier,
        clip=clip,
        sample_rate=sample_rate,
        rounds=rounds,
        population=population,
        dim=dim,
        rng=rng,
    )
    grid = _guess_grid(m=canaries, sample_rate=sample_rate, rounds=rounds)
    per_try_confidence = 1 - (1 - confidence) / len(grid)  # union bound over the tries
    best: tuple[float, int, int, int, int] | None = None
    for k_plus, k_minus in grid:
        r, v = audit_guesses(scores, included, k_plus=k_plus, k_minus=k_minus)
        bound = epsilon_lower_bound(
            m=canaries, r=r, v=v, delta=delta, confidence=per_try_confidence
        )
        if best is None or bound > best[0]:
            best = (bound, r, v, k_plus, k_minus)
    assert best is not None  # the grid is never empty
    bound, r, v, k_plus, k_minus = best
    step = MechanismStep(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=rounds)
    claimed = compute_epsilon([step], delta=delta, accountant=AccountantKind.PRV)
    logger.info(
        "audit z=%s q=%s rounds=%s N=%s m=%s: claimed eps %.3f, empirical eps >= %.3f (r=%s v=%s)",
        noise_multiplier,
        sample_rate,
        rounds,
        population,
        canaries,
        claimed,
        bound,
        r,
        v,
    )
    return AuditResult(
        noise_multiplier=noise_multiplier,
        claimed_epsilon=claimed,
        epsilon_lower_bound=bound,
        delta=delta,
        confidence=confidence,
        m=canaries,
        r=r,
        v=v,
        k_plus=k_plus,
        k_minus=k_minus,
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.audit_empirical",
        description="One-run canary audit (Steinke et al. 2023) of DP-FedAvg: DP off vs DP on.",
    )
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--noise-multiplier", type=float, help="z of the DP-on run (default 1.0)")
    noise.add_argument("--target-epsilon", type=float, help="calibrate z to this epsilon (PRV)")
    parser.add_argument("--rounds", type=int, default=100, help="training rounds (100)")
    parser.add_argument("--sample-rate", type=float, default=0.01, help="q per round (0.01)")
    parser.add_argument("--population", type=int, default=10_000, help="benign clients (10000)")
    parser.add_argument("--canaries", type=int, default=1000, help="canary clients m (1000)")
    parser.add_argument("--clip", type=float, default=1.0, help="clipping norm C (1.0)")
    parser.add_argument("--dim", type=int, default=None, help=f"model dim d ({DEFAULT_DIM})")
    parser.add_argument("--delta", type=float, default=None, help="delta (1 / N^1.1)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence (0.95)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--tiny", action="store_true", help="small fast run: m=200, 20 rounds, q=0.05"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.canaries, args.rounds, args.sample_rate = 200, 20, 0.05
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: audit DP off and DP on with the same sizes and print both rows."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    delta = args.delta if args.delta is not None else default_delta(args.population)
    if args.target_epsilon is not None:
        z = calibrate_noise_multiplier(
            target_epsilon=args.target_epsilon,
            delta=delta,
            sample_rate=args.sample_rate,
            steps=args.rounds,
            accountant=AccountantKind.PRV,
        )
    else:
        z = 1.0 if args.noise_multiplier is None else args.noise_multiplier
    table = Table(
        title=(
            f"One-run audit: N={args.population}, q={args.sample_rate}, rounds={args.rounds}, "
            f"m={args.canaries}, C={args.clip}, delta={delta:.2e}, {args.confidence:.0%}"
        )
    )
    for column in ("mode", "z", "claimed eps", "empirical eps >=", "r", "v", "accuracy"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, noise_multiplier in (("DP off", 0.0), ("DP on", z)):
        result = run_audit(
            noise_multiplier=noise_multiplier,
            clip=args.clip,
            sample_rate=args.sample_rate,
            rounds=args.rounds,
            population=args.population,
            delta=delta,
            canaries=args.canaries,
            dim=args.dim,
            seed=args.seed,
            confidence=args.confidence,
        )
        table.add_row(
            mode,
            f"{noise_multiplier:.3g}",
            f"{result.claimed_epsilon:.3f}",
            f"{result.epsilon_lower_bound:.3f}",
            str(result.r),
            str(result.v),
            f"{result.accuracy:.3f}",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

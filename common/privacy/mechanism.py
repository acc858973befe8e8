"""The Gaussian mechanism of client-level DP-FedAvg: clip, noise, pre-scale.

McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private Recurrent Language
Models" (ICLR 2018), Algorithm 1, with the noise spread over the participants
(docs/design.md, "One training round"):

- each participant clips its update ``Delta`` to L2 norm ``C`` (:func:`clip_inplace`) and adds its
  share ``N(0, (z C)^2 / m)`` of the Gaussian noise (:func:`client_noise_std`,
  :func:`add_gaussian_noise_inplace`), ``m = q * population`` the expected participant count,
  then divides by ``m`` (the fixed denominator): :func:`privatize_update` does all three;
- the server sums the noised updates; relative to the sensitivity ``C`` the sum carries noise
  multiplier ``z * sqrt(k / m)`` for ``k`` actual participants
  (:func:`effective_noise_multiplier`), which is what the ledger records and accounts.

Every parameter is keyword-only and checked: ``clip > 0``, ``std >= 0``, finite floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.privacy._checks import check_count, check_non_negative, check_positive

__all__ = [
    "add_gaussian_noise_inplace",
    "client_noise_std",
    "clip_inplace",
    "effective_noise_multiplier",
    "l2_norm",
    "privatize_update",
]


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
    check_non_negative("noise_multiplier", noise_multiplier)
    check_count("participated", participated, minimum=0)
    check_positive("expected", expected)
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
    check_non_negative("noise_multiplier", noise_multiplier)
    check_positive("clip", clip)
    check_positive("expected_participants", expected_participants)
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
    check_positive("max_norm", max_norm)
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
    check_non_negative("std", std)
    _check_floating(arrays)
    if std == 0:
        return
    for array in arrays.values():
        array += rng.normal(0.0, std, size=array.shape)  # (same shape as array), float64


def privatize_update(
    update: Mapping[str, np.ndarray],
    *,
    weight: float,
    clip: float,
    noise_std: float,
    denominator: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``(clip_C(update / weight) + N(0, noise_std^2)) / m``: what a DP client sends (float32).

    McMahan et al. 2018, Alg. 1 with the noise spread over the participants: ``update`` is the
    example-weighted delta ``weight * (local - global)``, ``clip`` is C, ``noise_std`` this
    client's share (:func:`client_noise_std`) and ``denominator`` m = qN. The input is not
    changed. Shared by the client's DP mod and the in-process engine.
    """
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight}")
    arrays = {k: (np.asarray(a) / weight).astype(np.float32) for k, a in update.items()}
    clip_inplace(arrays, max_norm=clip)
    add_gaussian_noise_inplace(arrays, std=noise_std, rng=rng)
    for key in arrays:
        arrays[key] /= np.float32(denominator)
    return arrays

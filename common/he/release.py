"""What a decryption committee releases: noise-flooded, rounded sums that several members agree on.

CKKS decryption returns the message plus an error that depends on the secret key. Li and
Micciancio 2021, "On the Security of Homomorphic Encryption on Approximate Numbers" (EUROCRYPT
2021), show that publishing a raw decryption lets anyone holding the ciphertext solve for the secret
key (a passive key-recovery attack); their countermeasure is to
add fresh noise much larger than the CKKS error before release, and to round. Li, Micciancio,
Schultz and Sorrell 2022, "Securing Approximate Homomorphic Encryption Using Differential Privacy"
(CRYPTO 2022), analyse how much noise that takes.

fedrec's choice (:func:`default_flood_std`): Gaussian flooding noise with standard deviation
:data:`FLOOD_MARGIN` (1024) times the modelled CKKS error of the sum (:func:`ckks_error_std`),
rounded up to a power of two, then rounding to a grid of that power of two
(:func:`flood_and_round_inplace`). Per slot, the released value's distribution then moves by about
``1 / 1024`` of a standard deviation with the key-dependent error (Kullback-Leibler divergence
``1 / (2 * 1024**2)`` nats). For fedrec's parameters and 10 updates the flood std is ``2**-19``
(about 2e-6), four orders of magnitude below the DP noise on an averaged update (``z * C / m``,
about 1e-2 for ``z = 1, C = 1, m = 100``), so it costs the model nothing measurable.

Two or more committee members decrypt independently; :func:`committee_agree` releases their mean
only when they agree elementwise within :func:`committee_tolerance`, else the round is discarded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from common.he.params import HEParams

__all__ = [
    "FLOOD_MARGIN",
    "SEAL_NOISE_STD",
    "ckks_error_std",
    "committee_agree",
    "committee_tolerance",
    "default_flood_std",
    "flood_and_round_inplace",
    "rounding_step",
]

logger = logging.getLogger(__name__)

SEAL_NOISE_STD = 3.2
"""Standard deviation of SEAL's encryption error per coefficient (``seal/util/globals.h``)."""

FLOOD_MARGIN = 1024.0
"""Flooding noise std over the modelled CKKS error std (see the module docstring)."""


def ckks_error_std(params: HEParams, *, n_updates: int) -> float:
    """Modelled standard deviation of the error of one decrypted slot of a sum of fresh ciphertexts.

    Each symmetric-key ciphertext carries a coefficient error of std :data:`SEAL_NOISE_STD` plus
    the encoder's rounding error (uniform, variance 1/12); a slot is a sum of ``n`` coefficients
    times unit roots, real part kept, divided by the scale (the canonical embedding of Cheon, Kim,
    Kim and Song 2017). Adding ``n_updates`` independent ciphertexts adds the variances::

        std = sqrt(n_updates * n * (3.2**2 + 1/12) / 2) / 2**scale_bits

    For fedrec's set and 10 updates this gives 1.67e-9; ``fedrec bench he`` measures 1.7e-9.
    """
    if n_updates < 1:
        raise ValueError(f"n_updates must be >= 1, got {n_updates}")
    variance = n_updates * params.poly_modulus_degree * (SEAL_NOISE_STD**2 + 1.0 / 12.0) / 2.0
    return math.sqrt(variance) / params.scale


def default_flood_std(params: HEParams, *, n_updates: int) -> float:
    """:data:`FLOOD_MARGIN` times :func:`ckks_error_std`, rounded up to a power of two."""
    return float(
        2.0 ** math.ceil(math.log2(FLOOD_MARGIN * ckks_error_std(params, n_updates=n_updates)))
    )


def rounding_step(flood_std: float) -> float:
    """The release grid: the largest power of two not above ``flood_std`` (exact in binary)."""
    _check_positive("flood_std", flood_std)
    return float(2.0 ** math.floor(math.log2(flood_std)))


def committee_tolerance(flood_std: float) -> float:
    """Largest elementwise gap allowed between two honest members' outputs.

    Two members add independent ``N(0, flood_std**2)`` noise, so their difference has std
    ``sqrt(2) * flood_std``; 8 of those (a two-sided tail of 1e-15 per value) plus one rounding
    step: ``8 * sqrt(2) * flood_std + rounding_step(flood_std)``.
    """
    return 8.0 * math.sqrt(2.0) * flood_std + rounding_step(flood_std)


def flood_and_round_inplace(
    values: np.ndarray, *, flood_std: float, rng: np.random.Generator
) -> None:
    """Add ``N(0, flood_std**2)`` to each value, then round to :func:`rounding_step` in place.

    Li and Micciancio 2021 (EUROCRYPT), the noise-flooding countermeasure: fresh noise much larger
    than the CKKS error hides the key-dependent error before the value is released.

    Parameters
    ----------
    values:
        float64 decrypted values, shape ``(n,)``; changed in place.
    flood_std:
        Standard deviation of the flooding noise (> 0), see :func:`default_flood_std`.
    rng:
        Source of the noise; each committee member uses its own.
    """
    _check_positive("flood_std", flood_std)
    if values.dtype != np.float64:
        raise ValueError(f"values must be float64, got {values.dtype}")
    step = rounding_step(flood_std)
    values += rng.normal(0.0, flood_std, size=values.shape)
    # step is a power of two: the division and the multiplication are exact
    np.divide(values, step, out=values)
    np.rint(values, out=values)
    np.multiply(values, step, out=values)


def committee_agree(
    outputs: Sequence[Mapping[str, np.ndarray]], *, tolerance: float
) -> dict[str, np.ndarray] | None:
    """The elementwise mean of the committee's decryptions, or ``None`` when they disagree.

    Parameters
    ----------
    outputs:
        At least two members' outputs of :func:`common.he.codec.decrypt_sum`.
    tolerance:
        Largest allowed elementwise gap between any two outputs (> 0), normally
        :func:`committee_tolerance` of the flood std.

    Returns
    -------
    dict or None
        The mean, with each tensor's dtype; ``None`` when the outputs differ in names or shapes,
        hold a non-finite value, or differ by more than ``tolerance`` anywhere (the round is then
        discarded; a warning says why).
    """
    if len(outputs) < 2:
        raise ValueError(f"outputs must hold at least two decryptions, got {len(outputs)}")
    _check_positive("tolerance", tolerance)
    first = outputs[0]
    for i, other in enumerate(outputs[1:], start=1):
        if list(other) != list(first) or any(
            np.shape(other[k]) != np.shape(first[k]) for k in first
        ):
            logger.warning("committee: output %d has other tensors or shapes than output 0", i)
            return None
    mean: dict[str, np.ndarray] = {}
    for name, reference in first.items():
        stacked = np.stack([np.asarray(o[name], dtype=np.float64) for o in outputs])  # (k, ...)
        if not np.isfinite(stacked).all():
            logger.warning("committee: non-finite values in %s", name)
            return None
        spread = float((stacked.max(axis=0) - stacked.min(axis=0)).max(initial=0.0))
        if spread > tolerance:
            logger.warning(
                "committee: outputs disagree on %s by %.3g > tolerance %.3g",
                name,
                spread,
                tolerance,
            )
            return None
        mean[name] = stacked.mean(axis=0).astype(np.asarray(reference).dtype)
    return mean


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

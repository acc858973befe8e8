"""CKKS parameter sets for encrypted aggregation, and the security check every context passes.

CKKS is the approximate-number scheme of Cheon, Kim, Kim and Song 2017, "Homomorphic Encryption for
Arithmetic of Approximate Numbers" (ASIACRYPT 2017), here through Microsoft SEAL 4 inside TenSEAL.
A parameter set fixes the ring degree ``n`` (``poly_modulus_degree``; a ciphertext has ``n / 2``
complex slots), the bit sizes of the RNS primes of the coefficient modulus (the last prime is SEAL's
"special" key-switching prime; the others form the data level a fresh ciphertext lives at) and the
encoding scale ``2**scale_bits``.

Security follows the Homomorphic Encryption Standard (Albrecht et al. 2018, "Homomorphic Encryption
Security Standard", HomomorphicEncryption.org, Table 1, classical 128-bit security, ternary secret):
for each ``n`` the total coefficient-modulus bits may not exceed :data:`MAX_COEFF_BITS_128`.
:func:`check_security` applies it to a parameter set when it is made and to every context that is
created or loaded (see :mod:`common.he.keys`).

fedrec's set (:attr:`ParamSet.FEDREC`) is sized for what the server does, which is additions only:
no multiplication, so no rescaling and a single data prime. A ciphertext is two polynomials of ``n``
coefficients; :mod:`common.he.codec` packs ``n`` real values into its ``n / 2`` complex slots and
sends it seeded (one polynomial plus a seed), so it costs ``data_bits / 8`` bytes per value: about
7.5 bytes for fedrec's 52 data bits, against about 60 for FLARE's default (100 data bits,
``n / 2`` real values per ciphertext, public-key encryption, not seeded).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_COEFF_BITS_128",
    "MIN_HEADROOM_BITS",
    "HEParams",
    "ParamSet",
    "check_security",
]

MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
"""Largest total coefficient-modulus bit count per ring degree for 128-bit classical security
(HE Standard 2018, Table 1, uniform ternary secret; the same table SEAL enforces as ``tc128``)."""

MIN_HEADROOM_BITS = 10
"""Bits the data level must keep above the scale: a decrypted slot wraps around once
``|value| >= 2**(data_bits - scale_bits - 1)``, so 10 bits leave room for sums up to about 500."""

_MIN_SCALE_BITS = 20
"""Below ``2**20`` the fresh-encryption error (about ``sqrt(n) * 3.2 / scale``) exceeds 1e-4."""

_MAX_PRIME_BITS = 60
"""SEAL's ``CoeffModulus::Create`` makes primes of at most 60 bits."""


def check_security(*, poly_modulus_degree: int, total_coeff_bits: int) -> None:
    """Refuse a ring degree or coefficient modulus below 128-bit security.

    Parameters
    ----------
    poly_modulus_degree:
        Ring degree ``n``; one of the keys of :data:`MAX_COEFF_BITS_128`.
    total_coeff_bits:
        Bits of the whole coefficient modulus (all primes, the special prime included).

    Raises
    ------
    ValueError
        Naming ``poly_modulus_degree`` or ``coeff_mod_bit_sizes``, with the standard's limit.
    """
    if poly_modulus_degree not in MAX_COEFF_BITS_128:
        raise ValueError(
            f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)} "
            f"(HE Standard 128-bit table), got {poly_modulus_degree}"
        )
    limit = MAX_COEFF_BITS_128[poly_modulus_degree]
    if total_coeff_bits > limit:
        raise ValueError(
            f"coeff_mod_bit_sizes total {total_coeff_bits} bits exceeds {limit}, the most that "
            f"poly_modulus_degree={poly_modulus_degree} allows for 128-bit security "
            "(HE Standard 2018, Table 1)"
        )


@dataclass(frozen=True)
class HEParams:
    """A CKKS parameter set; checked against the HE Standard when made.

    Raises ``ValueError`` naming the field when the set is insecure or unusable.
    """

    name: str
    """Identifier carried in every ciphertext header and in ``params.json`` of a key folder."""
    poly_modulus_degree: int
    """Ring degree ``n``, a power of two; a ciphertext has ``n / 2`` complex slots."""
    coeff_mod_bit_sizes: tuple[int, ...]
    """Bit sizes of the RNS primes, at least two (TenSEAL needs a key-switching prime, the last)."""
    scale_bits: int
    """``log2`` of the CKKS encoding scale; decoded error is about ``sqrt(n) * 3.2 / 2**scale``."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise ValueError(f"name must be a non-empty [A-Za-z0-9-] identifier, got {self.name!r}")
        check_security(
            poly_modulus_degree=self.poly_modulus_degree,
            total_coeff_bits=sum(self.coeff_mod_bit_sizes),
        )
        sizes = self.coeff_mod_bit_sizes
        if len(sizes) < 2:
            raise ValueError(
                "coeff_mod_bit_sizes needs at least two primes (data + key-switching), "
                f"got {list(sizes)}"
            )
        if any(not 20 <= bits <= _MAX_PRIME_BITS for bits in sizes):
            raise ValueError(
                f"coeff_mod_bit_sizes must each lie in [20, {_MAX_PRIME_BITS}], got {list(sizes)}"
            )
        if not _MIN_SCALE_BITS <= self.scale_bits <= self.data_bits - MIN_HEADROOM_BITS:
            raise ValueError(
                f"scale_bits must lie in [{_MIN_SCALE_BITS}, data bits - {MIN_HEADROOM_BITS}] = "
                f"[{_MIN_SCALE_BITS}, {self.data_bits - MIN_HEADROOM_BITS}] for "
                f"coeff_mod_bit_sizes {list(sizes)}, got {self.scale_bits}"
            )

    @property
    def slots(self) -> int:
        """Complex CKKS slots per ciphertext, ``n / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_chunk(self) -> int:
        """Real values per ciphertext, ``n``: two per complex slot (real and imaginary part)."""
        return self.poly_modulus_degree

    @property
    def data_bits(self) -> int:
        """Bits of the data level a fresh ciphertext is at: every prime but the special one."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def scale(self) -> float:
        """The encoding scale ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude a (summed) slot may reach before it wraps around the modulus.

        Half the headroom bit of ``2**(data_bits - scale_bits - 1)``, as a safety factor for the
        encoding's spread between slots and coefficients.
        """
        return float(2 ** (self.data_bits - self.scale_bits - 2))

    @property
    def max_chunk_bytes(self) -> int:
        """Upper bound on a serialized ciphertext: two uncompressed polynomials plus a header."""
        return 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8 + 1024

    def to_json(self) -> dict[str, object]:
        """The set as a JSON object (``params.json`` of a key folder)."""
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_json(cls, obj: object) -> HEParams:
        """Parse :meth:`to_json`'s output; raises ``ValueError`` naming a missing or bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"params must be a JSON object, got {type(obj).__name__}")
        for key in ("name", "poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits"):
            if key not in obj:
                raise ValueError(f"params: missing {key!r}")
        name, degree, sizes, scale_bits = (
            obj["name"],
            obj["poly_modulus_degree"],
            obj["coeff_mod_bit_sizes"],
            obj["scale_bits"],
        )
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        if not _is_int(degree):
            raise ValueError(f"poly_modulus_degree must be an integer, got {degree!r}")
        if not isinstance(sizes, list) or not all(_is_int(b) for b in sizes):
            raise ValueError(f"coeff_mod_bit_sizes must be a list of integers, got {sizes!r}")
        if not _is_int(scale_bits):
            raise ValueError(f"scale_bits must be an integer, got {scale_bits!r}")
        return cls(
            name=name,
            poly_modulus_degree=degree,
            coeff_mod_bit_sizes=tuple(sizes),
            scale_bits=scale_bits,
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ParamSet(enum.StrEnum):
    """The named parameter sets (``fedrec keys init --params NAME``)."""

    FEDREC = "fedrec"
    """fedrec's set: ``n = 4096``, primes ``[52, 52]`` (104 of 109 bits allowed), scale ``2**38``.
    One 52-bit data prime: about 7.5 bytes per value; decryption error about
    ``5.3e-10 * sqrt(updates summed)`` (RMS); sums up to ``2**12`` in magnitude."""
    THRESHOLD = "threshold"
    """The threshold scheme's set (:mod:`common.he.threshold`): ``n = 8192``, primes
    ``[60, 60, 60]`` (180 of 218 bits allowed), scale ``2**104``. Public-key ciphertexts at two
    60-bit data primes: 32 bytes per value; the flood of a t-of-n decryption (about ``2**83`` per
    coefficient) decodes to an error std near 3e-5; sums up to ``2**14`` in magnitude."""
    FLARE_DEFAULT = "flare-default"
    """NVIDIA FLARE's default CKKS set (``n = 8192``, primes ``[60, 40, 40]``, scale ``2**40``),
    kept as the comparison point of ``fedrec bench he``."""

    @property
    def params(self) -> HEParams:
        """The :class:`HEParams` of this set."""
        return _PARAMS[self]

    @classmethod
    def of_name(cls, name: str) -> ParamSet:
        """The set named ``name``; ``ValueError`` naming ``name`` when unknown."""
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(s.value for s in cls)
            raise ValueError(f"name: unknown HE parameter set {name!r} (known: {known})") from None


_PARAMS: dict[ParamSet, HEParams] = {
    ParamSet.FEDREC: HEParams(
        name=ParamSet.FEDREC.value,
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(52, 52),
        scale_bits=38,
    ),
    ParamSet.THRESHOLD: HEParams(
        name=ParamSet.THRESHOLD.value,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 60, 60),
        scale_bits=104,
    ),
    ParamSet.FLARE_DEFAULT: HEParams(
        name=ParamSet.FLARE_DEFAULT.value,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 40, 40),
        scale_bits=40,
    ),
}

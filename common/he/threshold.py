"""Threshold CKKS: a collective key no single party holds, t-of-n decryption with flooding.

Multiparty CKKS after Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux, "Multiparty Homomorphic
Encryption from Ring-Learning-with-Errors" (PETS 2021), with Shamir sharing of the secret as in
their threshold variant (and Lattigo's ``multiparty`` package), written over SEAL's own objects.

Key generation, no dealer (:func:`keygen_party`, :func:`deal_shares`,
:func:`collective_public_key`):

1. Everyone derives the common polynomial ``a`` from a public seed with SHAKE-256
   (:func:`common_polynomial`).
2. Key holder ``i`` draws its own secret ``s_i`` with SEAL's ``KeyGenerator`` (uniform ternary)
   and publishes ``p_i = -a s_i + e_i``. It takes SEAL's public key
   ``(b', a') = (-a' s_i + e', a')`` for ``s_i`` and returns ``b' + (a' - a) s_i``, so the error
   is SEAL's own Gaussian.
3. The collective public key is ``(sum p_i, a)``: an ordinary SEAL public key for ``s = sum s_i``,
   which nobody ever holds. Encryption is SEAL's, unchanged (:func:`public_context`).
4. t-of-n: holder ``i`` also Shamir-shares ``s_i`` with a random polynomial ``f_i`` of degree
   ``t - 1`` over each RNS prime, sends ``f_i(j)`` to holder ``j`` (encrypted to it); holder ``j``
   keeps ``S_j = sum_i f_i(j)``, a Shamir share of ``s``.

Decryption (:meth:`KeyShare.partial_decrypt`, :func:`combine`): for a committee ``T`` of ``t``
holders, member ``j`` returns ``d_j = c0 + c1 (lambda_j S_j) + E_j`` (``lambda_j`` its Lagrange
coefficient at 0), and ``sum_j d_j - (t - 1) c0 = c0 + c1 s + sum E_j`` is the plaintext. ``E_j``
is flooding noise: exact integers uniform in ``[-2**F, 2**F)`` drawn from the OS CSPRNG, added in
the coefficient domain, with ``F`` by the rule of :func:`flood_bits`. Any ``t - 1`` shares are
independent of ``s``; fewer than ``t`` partial decryptions decode to noise (the tests show it).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

import numpy as np
import tenseal as ts
from tenseal import sealapi

from common.he._seal import buffer
from common.he.keys import new_context
from common.he.params import HEParams
from common.he.sealio import (
    CiphertextData,
    PlaintextData,
    read_ciphertext,
    read_plaintext,
    write_ciphertext,
    write_plaintext,
)

__all__ = [
    "MAX_FLOOD_BITS",
    "STATISTICAL_BITS",
    "FloodPlan",
    "KeyShare",
    "Ring",
    "ThresholdError",
    "collective_public_key",
    "combine",
    "combine_shares",
    "common_polynomial",
    "deal_shares",
    "flood_bits",
    "keygen_party",
    "lagrange_at_zero",
    "plan_flood",
    "public_context",
    "ring_of",
    "sum_noise_bound",
]

STATISTICAL_BITS = 40
"""Statistical security of the flooding: the released distribution is within ``2**-40`` of one
computable from the plaintext alone, over every coefficient of every decryption of the key."""

MAX_FLOOD_BITS = 105
"""Largest flood sampled exactly: ``hi * c < 2**64`` for ``hi < 2**(F - 59)``, ``c < 2**18``."""

_SIGMA_SEAL = 3.2
"""SEAL's error standard deviation."""


class ThresholdError(ValueError):
    """A threshold operation refused: too few shares, a share of another key, no headroom..."""


@dataclass(frozen=True)
class Ring:
    """The RNS ring of a parameter set: primes, levels and SEAL objects to load into."""

    params: HEParams
    context: Any
    """SEAL context (``sealapi.SEALContext``) of the parameter set."""
    key_primes: tuple[int, ...]
    """Every prime, the special (key-switching) one last."""
    key_parms_id: tuple[int, int, int, int]
    data_parms_id: tuple[int, int, int, int]

    @property
    def degree(self) -> int:
        """Ring degree ``n``."""
        return self.params.poly_modulus_degree

    @property
    def data_primes(self) -> tuple[int, ...]:
        """Primes of the level fresh ciphertexts are at (all but the special one)."""
        return self.key_primes[:-1]

    @cached_property
    def evaluator(self) -> Any:
        """SEAL evaluator (NTT transforms)."""
        return sealapi.Evaluator(self.context)

    @cached_property
    def encoder(self) -> Any:
        """SEAL CKKS encoder."""
        return sealapi.CKKSEncoder(self.context)

    @cached_property
    def null_key(self) -> Any:
        """A SEAL secret key of zeros: decrypting ``(c, 0)`` with it reads ``c`` as a plaintext."""
        return self.secret_key(np.zeros((len(self.key_primes), self.degree), dtype=np.uint64))

    def secret_key(self, residues: np.ndarray) -> Any:
        """A SEAL ``SecretKey`` holding ``residues`` (NTT form; the data-level rows suffice)."""
        full = np.zeros((len(self.key_primes), self.degree), dtype=np.uint64)
        full[: residues.shape[0]] = residues
        key = sealapi.SecretKey()
        blob = write_plaintext(PlaintextData(parms_id=self.key_parms_id, scale=1.0, data=full))
        buffer().load(key, self.context, blob)
        return key

    def load_ciphertext(self, ct: CiphertextData) -> Any:
        """A SEAL ciphertext from arrays (SEAL checks every residue is below its prime)."""
        out = sealapi.Ciphertext(self.context)
        buffer().load(out, self.context, write_ciphertext(ct))
        return out

    def to_ntt(self, coeffs: np.ndarray) -> np.ndarray:
        """The NTT form of data-level polynomials given by their coefficient residues."""
        size = coeffs.shape[0]
        # SEAL refuses a "transparent" ciphertext (second part zero): pad with a copy
        padded = coeffs if size >= 2 else np.concatenate([coeffs, coeffs])
        ct = self.load_ciphertext(
            CiphertextData(parms_id=self.data_parms_id, is_ntt_form=False, scale=1.0, data=padded)
        )
        self.evaluator.transform_to_ntt_inplace(ct)
        return read_ciphertext(buffer().save(ct)).data[:size]


@cache
def ring_of(params: HEParams) -> Ring:
    """The :class:`Ring` of a parameter set (made once per set)."""
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    primes = tuple(int(q.value()) for q in context.key_context_data().parms().coeff_modulus())
    return Ring(
        params=params,
        context=context,
        key_primes=primes,
        key_parms_id=tuple(int(x) for x in context.key_parms_id()),  # type: ignore[arg-type]
        data_parms_id=tuple(int(x) for x in context.first_parms_id()),  # type: ignore[arg-type]
    )


# -- arithmetic mod the RNS primes (rows of an array are primes) ---------------------------------


def _col(primes: Sequence[int]) -> np.ndarray:
    return np.asarray(primes, dtype=np.uint64)[:, None]


def add_mod(a: np.ndarray, b: np.ndarray, primes: Sequence[int]) -> np.ndarray:
    """``(a + b) mod q`` row by row (residues below 2**62)."""
    return (a + b) % _col(primes)


def sub_mod(a: np.ndarray, b: np.ndarray, primes: Sequence[int]) -> np.ndarray:
    """``(a - b) mod q`` row by row."""
    q = _col(primes)
    return (a + (q - b)) % q


def mul_mod(a: np.ndarray, b: np.ndarray, primes: Sequence[int]) -> np.ndarray:
    """``(a * b) mod q`` row by row, exact for primes below 2**60 (4-bit Horner steps).

    ``b`` may be an array of ``a``'s shape or one integer per row (shape ``(rows, 1)``).
    """
    q = _col(primes)
    if int(q.max()) >= 1 << 60:
        raise ThresholdError("mul_mod needs primes below 2**60")
    a = a % q
    b = np.broadcast_to(np.asarray(b, dtype=np.uint64) % q, a.shape)
    acc = np.zeros_like(a)
    for shift in range(56, -1, -4):
        digit = (b >> np.uint64(shift)) & np.uint64(15)
        acc = ((acc << np.uint64(4)) % q + (a * digit) % q) % q
    return acc


def _uniform_mod(
    shape: tuple[int, ...], primes: Sequence[int], xof: Any | None = None
) -> np.ndarray:
    """Residues uniform below each prime: rejection sampling from SHAKE-256 (``xof``) or the OS."""
    rows = []
    count = math.prod(shape[1:])
    for q in primes:
        bits = q.bit_length()
        mask = np.uint64((1 << bits) - 1)
        got = np.empty(0, dtype=np.uint64)
        while got.size < count:
            need = 2 * (count - got.size) + 16
            raw = xof.read(8 * need) if xof is not None else os.urandom(8 * need)
            draw = np.frombuffer(raw, dtype="<u8") & mask
            got = np.concatenate([got, draw[draw < np.uint64(q)]])
        rows.append(got[:count])
    return np.stack(rows).reshape(shape)


class _Shake:
    """A SHAKE-256 stream; its output is made in doubling blocks, not again on every read."""

    def __init__(self, seed: bytes) -> None:
        self._shake = hashlib.shake_256(b"fedrec-threshold-a\x00" + seed)
        self._buffer = b""
        self._offset = 0

    def read(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._buffer):
            self._buffer = self._shake.digest(max(end, 2 * len(self._buffer)))
        out = self._buffer[self._offset : end]
        self._offset = end
        return out


def common_polynomial(ring: Ring, seed: bytes) -> np.ndarray:
    """The public polynomial ``a`` (NTT form, every prime) from ``seed``, by SHAKE-256.

    Uniform residues are uniform in either domain, so ``a`` is drawn directly in NTT form.
    """
    if len(seed) < 16:
        raise ThresholdError(f"seed must hold at least 16 bytes, got {len(seed)}")
    return _uniform_mod((len(ring.key_primes), ring.degree), ring.key_primes, _Shake(seed))


# -- key generation --------------------------------------------------------------------------------


def keygen_party(ring: Ring, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One holder's secret ``s_i`` and public share ``p_i = -a s_i + e_i`` (NTT form, key level).

    ``s_i`` is SEAL's own uniform ternary secret; ``e_i`` is SEAL's error: with SEAL's public key
    ``(b', a')`` of ``s_i``, ``p_i = b' + (a' - a) s_i`` (module docstring).
    """
    generator = sealapi.KeyGenerator(ring.context)
    secret = read_plaintext(buffer().save(generator.secret_key()), degree=ring.degree).data.copy()
    public_key = sealapi.PublicKey()
    generator.create_public_key(public_key)
    b_prime, a_prime = read_ciphertext(buffer().save(public_key)).data
    primes = ring.key_primes
    share = add_mod(b_prime, mul_mod(sub_mod(a_prime, a, primes), secret, primes), primes)
    return secret, share


def collective_public_key(ring: Ring, a: np.ndarray, shares: Sequence[np.ndarray]) -> bytes:
    """The SEAL ``PublicKey`` ``(sum p_i, a)`` of the holders' public shares, serialized."""
    if not shares:
        raise ThresholdError("no public shares")
    total = np.zeros_like(a)
    for share in shares:
        if share.shape != a.shape:
            raise ThresholdError(f"public share of shape {share.shape}, expected {a.shape}")
        total = add_mod(total, share, ring.key_primes)
    data = np.stack([total, a])
    return write_ciphertext(
        CiphertextData(parms_id=ring.key_parms_id, is_ntt_form=True, scale=1.0, data=data)
    )


def public_context(params: HEParams, public_key: bytes) -> ts.Context:
    """A TenSEAL public context (no secret key) whose public key is ``public_key``.

    TenSEAL makes a context with a key of its own; its serialized protobuf
    (``TenSEALContextProto.public_context.public_key``, field 2 then field 1) gets the collective
    key instead, and TenSEAL loads it back. ``ts.ckks_vector`` and SEAL's ``Encryptor`` then
    encrypt under the collective key unchanged.
    """
    context = new_context(params)
    blob = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    fields = _proto_fields(blob)
    inner = _proto_fields(fields[2][0])
    inner[1] = [public_key]
    fields[2] = [_proto_join(inner)]
    return ts.context_from(_proto_join(fields), n_threads=1)


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _proto_fields(data: bytes) -> dict[int, list[Any]]:
    """Top-level protobuf fields, by number: bytes for length-delimited, (wire type, raw) else."""
    fields: dict[int, list[Any]] = {}
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, offset = _varint(data, offset)
            fields.setdefault(number, []).append(data[offset : offset + length])
            offset += length
        elif wire == 0:
            start = offset
            _, offset = _varint(data, offset)
            fields.setdefault(number, []).append((0, data[start:offset]))
        elif wire == 1:
            fields.setdefault(number, []).append((1, data[offset : offset + 8]))
            offset += 8
        elif wire == 5:
            fields.setdefault(number, []).append((5, data[offset : offset + 4]))
            offset += 4
        else:
            raise ThresholdError(f"unexpected protobuf wire type {wire} in a TenSEAL context")
    return fields


def _proto_join(fields: Mapping[int, list[Any]]) -> bytes:
    out = bytearray()
    for number in sorted(fields):
        for value in fields[number]:
            if isinstance(value, bytes):
                out += _put_varint(number << 3 | 2) + _put_varint(len(value)) + value
            else:
                wire, raw = value
                out += _put_varint(number << 3 | wire) + raw
    return bytes(out)


# -- Shamir sharing over each prime ----------------------------------------------------------------


def deal_shares(
    ring: Ring, secret: np.ndarray, *, holders: Sequence[int], threshold: int
) -> dict[int, np.ndarray]:
    """Shamir shares ``f(j)`` of ``secret`` (data-level rows) for each holder index ``j``.

    ``f(x) = secret + r_1 x + ... + r_{t-1} x**(t-1)`` with ``r_k`` uniform mod each prime (OS
    CSPRNG); any ``threshold - 1`` shares are independent of the secret.
    """
    _check_holders(holders, threshold)
    primes = ring.data_primes
    base = secret[: len(primes)] % _col(primes)
    coefficients = [_uniform_mod(base.shape, primes) for _ in range(threshold - 1)]
    out = {}
    for j in holders:
        value = np.zeros_like(base)
        for coefficient in reversed(coefficients):  # Horner: ((r_{t-1} j + r_{t-2}) j + ...)
            value = add_mod(mul_mod(value, _per_row(j, primes), primes), coefficient, primes)
        value = add_mod(mul_mod(value, _per_row(j, primes), primes), base, primes)
        out[j] = value
    return out


def combine_shares(ring: Ring, received: Sequence[np.ndarray]) -> np.ndarray:
    """A holder's share ``S_j = sum_i f_i(j)`` from what every dealer sent it."""
    primes = ring.data_primes
    total = np.zeros((len(primes), ring.degree), dtype=np.uint64)
    for part in received:
        if part.shape != total.shape or bool((part >= _col(primes)).any()):
            raise ThresholdError("a dealt share has the wrong shape or a residue above its prime")
        total = add_mod(total, part, primes)
    return total


def _per_row(value: int, primes: Sequence[int]) -> np.ndarray:
    return np.asarray([value % q for q in primes], dtype=np.uint64)[:, None]


def lagrange_at_zero(index: int, committee: Sequence[int], prime: int) -> int:
    """``prod_{k != j} k / (k - j) mod prime``: member ``index``'s weight in interpolating at 0."""
    if index not in committee:
        raise ThresholdError(f"holder {index} is not in the committee {sorted(committee)}")
    numerator = denominator = 1
    for k in committee:
        if k != index:
            numerator = numerator * k % prime
            denominator = denominator * (k - index) % prime
    return numerator * pow(denominator, -1, prime) % prime


def _check_holders(holders: Sequence[int], threshold: int) -> None:
    if len(set(holders)) != len(holders) or any(j < 1 for j in holders):
        raise ThresholdError(f"holder indices must be distinct and >= 1, got {list(holders)}")
    if not 1 <= threshold <= len(holders):
        raise ThresholdError(f"threshold must lie in [1, {len(holders)}], got {threshold}")


# -- flooding --------------------------------------------------------------------------------------


def sum_noise_bound(params: HEParams, *, n_updates: int, parties: int) -> float:
    """High-probability bound ``B`` on a coefficient of the noise of a sum of fresh ciphertexts.

    SEAL encrypts with the public key at the key level and divides by the special prime, so a
    fresh ciphertext's noise is the rounding term ``r0 + r1 s`` (``r`` uniform in ``[-1/2, 1/2]``)
    plus the encoder's rounding; ``s`` sums ``parties`` ternary secrets (variance ``2/3`` per
    coefficient each). Per coefficient ``sigma**2 = (2 + n * parties * 2/3) / 12``; ``n_updates``
    independent ciphertexts add variances; ``B`` is 10 standard deviations (a tail below 2**-70).
    """
    if n_updates < 1 or parties < 1:
        raise ThresholdError(f"n_updates and parties must be >= 1, got {n_updates}, {parties}")
    n = params.poly_modulus_degree
    variance = (2.0 + n * parties * 2.0 / 3.0) / 12.0 + _SIGMA_SEAL**2 * 2.0**-40
    return 10.0 * math.sqrt(n_updates * variance)


def flood_bits(params: HEParams, *, n_updates: int, parties: int, max_decryptions: int) -> int:
    """Bits ``F`` of the flood (uniform in ``[-2**F, 2**F)`` per coefficient), by the rule

    ``F >= 40 + log2 n + log2 B + log2(max_decryptions)``: each coefficient's released value is
    within ``B / 2**F`` in statistical distance of the flood alone, and there are
    ``n * max_decryptions`` of them over the key's life.
    """
    if max_decryptions < 1:
        raise ThresholdError(f"max_decryptions must be >= 1, got {max_decryptions}")
    bound = sum_noise_bound(params, n_updates=n_updates, parties=parties)
    return math.ceil(
        STATISTICAL_BITS
        + math.log2(params.poly_modulus_degree)
        + math.log2(bound)
        + math.log2(max_decryptions)
    )


@dataclass(frozen=True)
class FloodPlan:
    """The flood of one decryption and what it costs (:func:`plan_flood`)."""

    bits: int
    """``F``: each member's flood is uniform in ``[-2**F, 2**F)``."""
    value_std: float
    """Standard deviation of the total flood in a decoded value."""
    headroom_bits: float
    """Bits left between the flood plus the largest message and half the data modulus."""


def plan_flood(
    params: HEParams,
    *,
    n_updates: int,
    parties: int,
    members: int,
    max_decryptions: int,
    max_value_std: float = 1e-4,
) -> FloodPlan:
    """:func:`flood_bits`, with the check that the data modulus has room for it.

    Raises :class:`ThresholdError` when the flood would reach the message's bits (a decoded
    value's flood std above ``max_value_std``) or wrap around the modulus.
    """
    bits = flood_bits(params, n_updates=n_updates, parties=parties, max_decryptions=max_decryptions)
    if bits > MAX_FLOOD_BITS:
        raise ThresholdError(
            f"a flood of {bits} bits is beyond what is sampled here ({MAX_FLOOD_BITS})"
        )
    # uniform in [-2**F, 2**F): variance 2**(2F) / 3 per coefficient and member; a decoded value
    # (real or imaginary part of a slot) sums n coefficients times unit roots, halved
    coefficient_std = math.sqrt(members / 3.0) * 2.0**bits
    value_std = coefficient_std * math.sqrt(params.poly_modulus_degree / 2.0) / params.scale
    # a decrypted coefficient is the message (below scale * max_abs_value) plus every flood;
    # it must stay below half the data modulus
    top = params.scale * params.max_abs_value + members * 2.0**bits
    headroom = params.data_bits - 1 - math.log2(top)
    if value_std > max_value_std:
        raise ThresholdError(
            f"a flood of 2**{bits} gives decoded values an error std of {value_std:.3g} > "
            f"{max_value_std:.3g}: raise scale_bits or lower max_decryptions"
        )
    if headroom < 0:
        raise ThresholdError(f"no modulus headroom for a flood of 2**{bits} ({headroom:.1f} bits)")
    return FloodPlan(bits=bits, value_std=value_std, headroom_bits=headroom)


def _flood_residues(ring: Ring, bits: int) -> np.ndarray:
    """Integers uniform in ``[-2**bits, 2**bits)`` (OS CSPRNG), as residues mod each data prime.

    ``U = hi * 2**60 + lo`` uniform below ``2**(bits + 1)``; mod ``q = 2**60 - c`` it is
    ``(lo + hi * c) mod q``, exact in uint64 while ``hi * c < 2**64``; then ``U - 2**bits``.
    """
    n = ring.degree
    lo = np.frombuffer(os.urandom(8 * n), dtype="<u8") >> np.uint64(4)
    high_bits = bits + 1 - 60
    hi = (
        np.frombuffer(os.urandom(8 * n), dtype="<u8") >> np.uint64(64 - high_bits)
        if high_bits > 0
        else None
    )
    if high_bits <= 0:
        lo = lo >> np.uint64(60 - (bits + 1))
    rows = []
    for q in ring.data_primes:
        c = (1 << 60) - q
        if not 0 < c < 1 << 18:
            raise ThresholdError(f"prime {q} is not just below 2**60; cannot reduce the flood")
        qq = np.uint64(q)
        value = lo % qq
        if hi is not None:
            value = (value + (hi * np.uint64(c)) % qq) % qq
        offset = np.uint64((1 << bits) % q)
        rows.append((value + (qq - offset)) % qq)
    return np.stack(rows)


# -- shares and decryption -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KeyShare:
    """One key holder's Shamir share of the collective secret, and what it belongs to."""

    index: int
    """This holder's Shamir point (1-based)."""
    holders: tuple[int, ...]
    """Every holder's index."""
    threshold: int
    """Partial decryptions needed."""
    params: HEParams
    fingerprint: str
    """Fingerprint of the collective public context the share decrypts."""
    residues: np.ndarray
    """``S_j`` in NTT form, one row per data prime."""

    def __post_init__(self) -> None:
        _check_holders(self.holders, self.threshold)
        if self.index not in self.holders:
            raise ThresholdError(f"holder {self.index} is not among {list(self.holders)}")
        ring = ring_of(self.params)
        if self.residues.shape != (len(ring.data_primes), ring.degree):
            raise ThresholdError(f"share of shape {self.residues.shape}, expected data level")
        if bool((self.residues >= _col(ring.data_primes)).any()):
            raise ThresholdError("share has a residue above its prime")
        frozen = np.array(self.residues, dtype=np.uint64, copy=True)
        frozen.setflags(write=False)  # checked once: nobody changes it in place afterwards
        object.__setattr__(self, "residues", frozen)

    def digest(self) -> str:
        """SHA-256 committing to this share (index, fingerprint, residues)."""
        h = hashlib.sha256(f"fedrec-share\x00{self.index}\x00{self.fingerprint}\x00".encode())
        h.update(np.ascontiguousarray(self.residues, dtype="<u8").tobytes())
        return h.hexdigest()

    def partial_decrypt(
        self, chunks: Sequence[bytes], *, committee: Sequence[int], flood: int
    ) -> list[bytes]:
        """``d_j = c0 + c1 (lambda_j S_j) + E_j`` per chunk, as raw little-endian residues.

        ``chunks`` are the serialized sum ciphertexts; ``committee`` the holders whose partial
        decryptions will be combined (this one among them, at least ``threshold``); ``flood``
        the bits of ``E_j`` (:func:`plan_flood`).
        """
        if not 0 < flood <= MAX_FLOOD_BITS:
            raise ThresholdError(f"flood must lie in (0, {MAX_FLOOD_BITS}] bits, got {flood}")
        committee = sorted(set(committee))
        if len(committee) < self.threshold:
            raise ThresholdError(
                f"a committee of {len(committee)} cannot decrypt; the threshold is {self.threshold}"
            )
        if any(j not in self.holders for j in committee):
            raise ThresholdError(f"committee {committee} names holders not in {self.holders}")
        ring = ring_of(self.params)
        primes = ring.data_primes
        weights = np.asarray(
            [lagrange_at_zero(self.index, committee, q) for q in primes], dtype=np.uint64
        )[:, None]
        key = ring.secret_key(mul_mod(self.residues, weights, primes))
        decryptor = sealapi.Decryptor(ring.context, key)
        buf = buffer()
        out = []
        plain = sealapi.Plaintext()
        for chunk in chunks:
            ct = sealapi.Ciphertext(ring.context)
            buf.load(ct, ring.context, chunk)
            if ct.size() != 2 or tuple(ct.parms_id()) != ring.data_parms_id:
                raise ThresholdError("a chunk is not a 2-part ciphertext at the data level")
            decryptor.decrypt(ct, plain)
            masked = read_plaintext(buf.save(plain), degree=ring.degree).data
            noise = ring.to_ntt(_flood_residues(ring, flood)[None])[0]
            out.append(add_mod(masked, noise, primes).astype("<u8").tobytes())
        return out


def combine(
    params: HEParams,
    chunks: Sequence[bytes],
    partials: Mapping[int, Sequence[bytes]],
    *,
    threshold: int,
) -> np.ndarray:
    """Decode the sum from ``threshold`` or more members' partial decryptions (float64 values).

    ``partials`` maps each member's index to its :meth:`KeyShare.partial_decrypt` output; every
    member must have used this same committee. Returns the ``n`` values per chunk, concatenated.
    """
    if len(partials) < threshold:
        raise ThresholdError(f"{len(partials)} partial decryptions, the threshold is {threshold}")
    ring = ring_of(params)
    primes = ring.data_primes
    shape = (len(primes), ring.degree)
    decryptor = sealapi.Decryptor(ring.context, ring.null_key)
    values = []
    for k, chunk in enumerate(chunks):
        c0 = read_ciphertext(chunk).data[0]
        extra = len(partials) - 1  # each partial carries c0 once: take all but one away
        if extra < 16:  # (q - c0) * extra < 2**64 for 60-bit primes: exact in uint64
            q = _col(primes)
            total = ((q - c0) % q * np.uint64(extra)) % q
        else:
            total = mul_mod(c0, _per_row(-extra, primes), primes)
        for member, parts in partials.items():
            if len(parts) != len(chunks):
                raise ThresholdError(f"member {member} sent {len(parts)} of {len(chunks)} chunks")
            part = np.frombuffer(parts[k], dtype="<u8")
            if part.size != total.size:
                raise ThresholdError(f"member {member}: chunk {k} has {part.size} residues")
            part = part.reshape(shape)
            if bool((part >= _col(primes)).any()):
                raise ThresholdError(f"member {member}: chunk {k} has a residue above its prime")
            total = add_mod(total, part, primes)
        # (total, 0) decrypted with a zero key is total itself, as a plaintext CKKS decodes
        ct = ring.load_ciphertext(
            CiphertextData(
                parms_id=ring.data_parms_id,
                is_ntt_form=True,
                scale=params.scale,
                data=np.stack([total, np.zeros_like(total)]),
            )
        )
        plain = sealapi.Plaintext()
        decryptor.decrypt(ct, plain)
        slots = np.asarray(ring.encoder.decode_complex(plain), dtype=np.complex128)
        values.append(slots.view(np.float64))
    return np.concatenate(values) if values else np.zeros(0)

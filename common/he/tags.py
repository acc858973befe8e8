"""What a key holder checks before it decrypts: the sum is the sum of the listed senders' uploads.

A server that could have the committee decrypt anything it likes would ask for one client's
ciphertext, or for two sums that differ by one client. Each holder therefore takes part in one
decryption per slot (a round, or a warm-start release), refuses a contributor list with fewer than
``min_contributors`` distinct registered senders, and checks the sum against the senders' own word:

1. Every sender signs the digest of its upload (round, slot, its id, SHA-256 of its ciphertexts).
2. The server sends each holder the digest of the sum and the signed list ``T``; the holder fixes
   them and only then draws a fresh random seed ``rho`` and returns it.
3. The server hands each sender in ``T`` its own upload's second halves back (and its first
   halves' digests, :func:`split_upload`) with the holders' seeds; the sender checks them
   against the digest it signed (:func:`upload_digest`) and signs the tags
   ``h_rho(c1) = sum_k r_k c1_k mod q`` of its upload's second polynomials (:func:`tags_of`),
   ``r`` expanded from ``rho`` (AES-256-CTR under a SHAKE-256 key), entries below ``2**20``,
   three independent vectors.
4. The holder receives the sum, checks its digest, and decrypts it only if
   ``h_rho(c1_sum) = sum over T of the senders' tags`` for every vector and prime
   (:func:`check_tags`).

Why the server cannot pass a forged sum. ``Delta = c1' - sum_T c1_i`` is fixed before ``rho``
exists (the sum by its digest, each ``c1_i`` by its sender's signed digest), so for ``Delta != 0``
mod a prime ``q`` a uniformly drawn ``r_k < 2**20 < q`` hits the one value that cancels with
probability at most ``2**-20`` (Schwartz-Zippel in one variable), ``2**-60`` for the three
vectors. A public linear hash, by contrast, can be cancelled by a crafted term chosen after
seeing it. Only ``c1`` is checked: with ``c1 = sum_T c1_i`` fixed, the decryption of any ``c0'``
reveals ``c0' + c1 s``, from which the server, knowing every ``c0_i``, learns exactly the sum of
``T``'s messages and nothing about any one of them.

What stays open: sybil senders. A server that registers ``min_contributors - 1`` devices of its
own, or colludes with that many, can surround one honest upload by uploads it knows and subtract
them. That client's update is then protected only by its own share of the DP noise (std
``z C / sqrt(m)`` per coordinate in a round of ``m``), which bounds what the attack learns.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from common.he.sealio import read_ciphertext
from common.he.threshold import Ring

__all__ = [
    "SEED_BYTES",
    "TAG_BITS",
    "TAG_VECTORS",
    "check_tags",
    "chunks_digest",
    "halves_of",
    "new_seed",
    "split_upload",
    "sum_tags",
    "tags_of",
    "tags_of_halves",
    "upload_digest",
]

TAG_BITS = 20
"""Bits of each entry of a check vector (soundness ``2**-20`` per vector and prime)."""
TAG_VECTORS = 3
"""Independent check vectors per seed (soundness ``2**-60``)."""
SEED_BYTES = 32
"""Bytes of a holder's seed."""

_LIMB = 20
_LIMBS = 3  # 60-bit residues in 20-bit limbs: products of 40 bits, sums of 2**15 of them fit


def new_seed() -> bytes:
    """A fresh check seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def chunks_digest(chunks: Iterable[bytes]) -> str:
    """SHA-256 of a list of serialized ciphertexts (length-prefixed, in order)."""
    h = hashlib.sha256(b"fedrec-chunks\x00")
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


def _vectors(seed: bytes, index: int, shape: tuple[int, int]) -> np.ndarray:
    """Chunk ``index``'s check vectors: AES-256-CTR keystream under a key that SHAKE-256
    derives from the seed and the index (SHAKE alone is several times slower per byte)."""
    count = TAG_VECTORS * shape[0] * shape[1]
    key = hashlib.shake_256(b"fedrec-tag\x00" + seed + index.to_bytes(8, "little")).digest(32)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = stream.update(bytes(4 * count))
    r = np.frombuffer(raw, dtype="<u4").astype(np.uint64) & np.uint64((1 << TAG_BITS) - 1)
    return r.reshape(TAG_VECTORS, shape[0], shape[1])


def tags_of(ring: Ring, chunks: Sequence[bytes], seed: bytes) -> list[int]:
    """``h_rho(c1)`` of a list of serialized ciphertexts (:func:`tags_of_halves`)."""
    return tags_of_halves(ring, [read_ciphertext(c).data[1] for c in chunks], seed)


def tags_of_halves(ring: Ring, halves: Sequence[np.ndarray], seed: bytes) -> list[int]:
    """``h_rho(c1)`` of the ciphertexts' second polynomials (``(primes, n)`` residues each):
    ``TAG_VECTORS x primes`` integers, vector-major.

    Exact: each 60-bit residue is split into 20-bit limbs, whose inner products with the
    20-bit vector entries fit in 64 bits; the limbs are recombined mod the prime in Python ints.
    """
    primes = ring.data_primes
    totals = [0] * (TAG_VECTORS * len(primes))
    mask = np.uint64((1 << _LIMB) - 1)
    for index, c1 in enumerate(halves):
        if c1.ndim != 2 or c1.shape[0] != len(primes):
            raise ValueError(f"chunk {index} is not at the data level (shape {c1.shape})")
        vectors = _vectors(seed, index, (int(c1.shape[0]), int(c1.shape[1])))
        limbs = [(c1 >> np.uint64(_LIMB * k)) & mask for k in range(_LIMBS)]
        for v in range(TAG_VECTORS):
            for p, q in enumerate(primes):
                value = 0
                for k, limb in enumerate(limbs):
                    value += int(np.dot(vectors[v, p], limb[p])) << (_LIMB * k)
                slot = v * len(primes) + p
                totals[slot] = (totals[slot] + value) % q
    return totals


def split_upload(chunks: Sequence[bytes]) -> tuple[list[str], list[bytes]]:
    """An upload as what its digest covers: per chunk, the SHA-256 of its first polynomial (with
    the level and scale) and the raw residues of its second one, which the tags read.

    The server hands a sender back only the second halves and the first halves' digests: half
    the bytes of the whole upload, and enough to check it is the upload the sender signed.
    """
    firsts, seconds = [], []
    for chunk in chunks:
        ct = read_ciphertext(chunk)
        if ct.data.shape[0] != 2:
            raise ValueError(f"a {ct.data.shape[0]}-part ciphertext, expected 2")
        head = f"{ct.parms_id}|{ct.is_ntt_form}|{ct.scale!r}|{ct.data.shape}".encode()
        firsts.append(hashlib.sha256(head + ct.data[0].astype("<u8").tobytes()).hexdigest())
        seconds.append(ct.data[1].astype("<u8").tobytes())
    return firsts, seconds


def upload_digest(firsts: Sequence[str], seconds: Sequence[bytes]) -> str:
    """The digest a sender signs: of its chunks' first-half digests and second halves."""
    if len(firsts) != len(seconds):
        raise ValueError(f"{len(firsts)} first halves, {len(seconds)} second halves")
    h = hashlib.sha256(b"fedrec-upload-v2\x00")
    for first, second in zip(firsts, seconds, strict=True):
        h.update(bytes.fromhex(first))
        h.update(hashlib.sha256(second).digest())
    return h.hexdigest()


def halves_of(ring: Ring, seconds: Sequence[bytes]) -> list[np.ndarray]:
    """Second halves from their raw bytes, checked: data-level shape, residues below primes."""
    shape = (len(ring.data_primes), ring.degree)
    primes = np.asarray(ring.data_primes, dtype=np.uint64)[:, None]
    out = []
    for blob in seconds:
        if len(blob) != 8 * shape[0] * shape[1]:
            raise ValueError(
                f"a second half of {len(blob)} bytes, expected {8 * shape[0] * shape[1]}"
            )
        half = np.frombuffer(blob, dtype="<u8").reshape(shape)
        if bool((half >= primes).any()):
            raise ValueError("a second half has a residue above its prime")
        out.append(half)
    return out


def sum_tags(ring: Ring, tags: Iterable[Sequence[int]]) -> list[int]:
    """The elementwise sum of several senders' tags, mod the primes."""
    primes = ring.data_primes
    total = [0] * (TAG_VECTORS * len(primes))
    for tag in tags:
        if len(tag) != len(total):
            raise ValueError(f"a tag has {len(tag)} entries, expected {len(total)}")
        for slot, value in enumerate(tag):
            total[slot] = (total[slot] + int(value)) % primes[slot % len(primes)]
    return total


def check_tags(
    ring: Ring, sum_chunks: Sequence[bytes], seed: bytes, tags: Iterable[Sequence[int]]
) -> bool:
    """Whether the sum's tag equals the sum of the senders' tags (module docstring, step 4)."""
    return tags_of(ring, sum_chunks, seed) == sum_tags(ring, tags)

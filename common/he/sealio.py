"""Read and write the coefficients of SEAL objects: the serialization layout of SEAL 4.x.

The threshold scheme (:mod:`common.he.threshold`) works on the RNS coefficients of SEAL's
ciphertexts, plaintexts and keys, which TenSEAL 0.3.18's ``sealapi`` does not expose as arrays.
Its ``save`` writes a SEAL object in SEAL's own format, compressed with zstd, and ``load`` reads it
back and validates it against the context (a coefficient not below its prime is refused). This
module parses that format and writes it, uncompressed, so arrays go in and out of SEAL exactly.

The layout (SEAL 4.1, ``serialization.h``, ``ciphertext.cpp``, ``plaintext.cpp``; the golden
tests in ``tests/common/he/test_sealio.py`` pin it)::

    SEALHeader, 16 bytes, little-endian:
        magic u16 = 0xA15E, header size u8 = 16, version major u8 = 4, minor u8,
        compression u8 (0 none, 1 zlib, 2 zstd), reserved u16, total size u64 (header included)
    Ciphertext (a PublicKey is one):
        parms_id 4 x u64, is_ntt_form u8, size u64, poly_modulus_degree u64,
        coeff_modulus_size u64, scale f64, correction_factor u64,
        data: SEALHeader + count u64 + count x u64   (poly-major: [size][coeff_modulus_size][n])
    Plaintext (a SecretKey is one):
        parms_id 4 x u64, coeff_count u64, scale f64,
        data: SEALHeader + count u64 + count x u64   ([coeff_modulus_size][n] when in NTT form)

zstd comes from the SEAL build inside TenSEAL itself (``_sealapi_cpp`` exports
``ZSTD_decompress``), so nothing else is installed for it.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = [
    "SEAL_MAGIC",
    "SEAL_VERSION_MAJOR",
    "CiphertextData",
    "PlaintextData",
    "SealFormatError",
    "read_ciphertext",
    "read_plaintext",
    "unwrap",
    "write_ciphertext",
    "write_plaintext",
]

SEAL_MAGIC = 0xA15E
SEAL_VERSION_MAJOR = 4
_HEADER = struct.Struct("<HBBBBHQ")
_COMPR_NONE, _COMPR_ZSTD = 0, 2
_CT_FIXED = struct.Struct("<4QBQQQdQ")
_PT_FIXED = struct.Struct("<4QQd")


class SealFormatError(ValueError):
    """Bytes that are not a SEAL object of the expected kind and layout."""


@cache
def _zstd() -> Any:
    import _sealapi_cpp  # type: ignore[import-not-found]  # TenSEAL's SEAL binding

    lib = ctypes.CDLL(_sealapi_cpp.__file__)
    lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
    lib.ZSTD_getFrameContentSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


def unwrap(data: bytes) -> bytes:
    """The body of a SEAL-serialized object (after its header), decompressed.

    Raises :class:`SealFormatError` for a wrong magic, version, size or compression mode.
    """
    if len(data) < _HEADER.size:
        raise SealFormatError(f"{len(data)} bytes: shorter than a SEAL header")
    magic, header_size, major, _minor, compression, _reserved, size = _HEADER.unpack_from(data)
    if magic != SEAL_MAGIC or header_size != _HEADER.size:
        raise SealFormatError(f"not a SEAL object (magic {magic:#x}, header size {header_size})")
    if major != SEAL_VERSION_MAJOR:
        raise SealFormatError(f"SEAL format version {major}, this reader knows 4")
    if size != len(data):
        raise SealFormatError(f"header says {size} bytes, got {len(data)}")
    body = data[_HEADER.size :]
    if compression == _COMPR_NONE:
        return body
    if compression != _COMPR_ZSTD:
        raise SealFormatError(f"compression mode {compression} is not read here (zstd or none)")
    lib = _zstd()
    expected = lib.ZSTD_getFrameContentSize(body, len(body))
    if expected >= (1 << 63):  # ZSTD_CONTENTSIZE_UNKNOWN / _ERROR
        raise SealFormatError("zstd frame without a content size")
    out = ctypes.create_string_buffer(int(expected))
    got = lib.ZSTD_decompress(out, expected, body, len(body))
    if lib.ZSTD_isError(got) or got != expected:
        raise SealFormatError("zstd frame does not decompress")
    return out.raw


@cache
def _version_minor() -> int:
    """The minor version of the SEAL inside TenSEAL (SEAL loads only its own), read once."""
    from tenseal import sealapi

    from common.he._seal import buffer

    return int(_HEADER.unpack_from(buffer().save(sealapi.Plaintext()))[3])


def _wrap(body: bytes) -> bytes:
    size = _HEADER.size + len(body)
    minor = _version_minor()
    header = _HEADER.pack(SEAL_MAGIC, _HEADER.size, SEAL_VERSION_MAJOR, minor, _COMPR_NONE, 0, size)
    return header + body


def _read_array(body: bytes, offset: int) -> np.ndarray:
    inner = body[offset:]
    size = _inner_size(inner)
    payload = unwrap(inner[:size])
    if size != len(inner):
        raise SealFormatError(
            f"{len(inner) - size} bytes after the coefficient array (a seeded ciphertext is not "
            "read here)"
        )
    (count,) = struct.unpack_from("<Q", payload)
    if len(payload) != 8 + 8 * count:
        raise SealFormatError(f"coefficient array says {count} values, holds {len(payload) - 8}")
    return np.frombuffer(payload, dtype="<u8", count=count, offset=8)


def _inner_size(data: bytes) -> int:
    if len(data) < _HEADER.size:
        raise SealFormatError("truncated coefficient array")
    return int(_HEADER.unpack_from(data)[6])


def _write_array(values: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(values, dtype="<u8").ravel()
    return _wrap(struct.pack("<Q", flat.size) + flat.tobytes())


@dataclass(frozen=True)
class CiphertextData:
    """A SEAL ciphertext (or public key) as arrays; ``data`` has shape ``(size, primes, n)``."""

    parms_id: tuple[int, int, int, int]
    """SEAL's id of the modulus level the polynomials are reduced at."""
    is_ntt_form: bool
    """Whether the polynomials are in NTT (evaluation) form; CKKS ciphertexts always are."""
    scale: float
    """The CKKS scale (1.0 for a public key)."""
    data: np.ndarray
    """uint64 residues, ``[polynomial][prime][coefficient]``."""
    correction_factor: int = 1
    """SEAL's BGV correction factor; 1 for CKKS."""


@dataclass(frozen=True)
class PlaintextData:
    """A SEAL plaintext (or secret key) in NTT form; ``data`` has shape ``(primes, n)``."""

    parms_id: tuple[int, int, int, int]
    """Level of the residues (all zero for a plaintext not in NTT form)."""
    scale: float
    """The CKKS scale (1.0 for a secret key)."""
    data: np.ndarray
    """uint64 residues, ``[prime][coefficient]``."""


def read_ciphertext(data: bytes) -> CiphertextData:
    """Parse a saved ``Ciphertext`` or ``PublicKey`` (seeded ciphertexts are refused)."""
    body = unwrap(data)
    if len(body) < _CT_FIXED.size:
        raise SealFormatError("truncated ciphertext")
    p0, p1, p2, p3, ntt, size, degree, primes, scale, correction = _CT_FIXED.unpack_from(body)
    array = _read_array(body, _CT_FIXED.size)
    if array.size != size * primes * degree:
        raise SealFormatError(
            f"ciphertext of {size} x {primes} x {degree} holds {array.size} values "
            "(a seeded ciphertext is not read here)"
        )
    return CiphertextData(
        parms_id=(p0, p1, p2, p3),
        is_ntt_form=bool(ntt),
        scale=scale,
        data=array.reshape(size, primes, degree),
        correction_factor=correction,
    )


def write_ciphertext(ct: CiphertextData) -> bytes:
    """Serialize :class:`CiphertextData` uncompressed, for SEAL's ``load`` to read and check."""
    size, primes, degree = ct.data.shape
    fixed = _CT_FIXED.pack(
        *ct.parms_id,
        int(ct.is_ntt_form),
        size,
        degree,
        primes,
        ct.scale,
        ct.correction_factor,
    )
    return _wrap(fixed + _write_array(ct.data))


def read_plaintext(data: bytes, *, degree: int) -> PlaintextData:
    """Parse a saved ``Plaintext`` or ``SecretKey`` of ring degree ``degree``."""
    body = unwrap(data)
    if len(body) < _PT_FIXED.size:
        raise SealFormatError("truncated plaintext")
    p0, p1, p2, p3, coeff_count, scale = _PT_FIXED.unpack_from(body)
    array = _read_array(body, _PT_FIXED.size)
    if array.size != coeff_count or coeff_count % degree:
        raise SealFormatError(
            f"plaintext of {coeff_count} coefficients holds {array.size} for degree {degree}"
        )
    return PlaintextData(parms_id=(p0, p1, p2, p3), scale=scale, data=array.reshape(-1, degree))


def write_plaintext(pt: PlaintextData) -> bytes:
    """Serialize :class:`PlaintextData` uncompressed."""
    fixed = _PT_FIXED.pack(*pt.parms_id, pt.data.size, pt.scale)
    return _wrap(fixed + _write_array(pt.data))

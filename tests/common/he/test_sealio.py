"""Golden tests of SEAL 4.x's serialization layout, as :mod:`common.he.sealio` reads and writes it.

Every fixed field is pinned against what TenSEAL's own SEAL saves, and against SEAL's own accessors
and loader, so a TenSEAL or SEAL upgrade that moves a byte fails here first.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from common.he._seal import buffer
from common.he.params import ParamSet
from common.he.sealio import (
    SEAL_MAGIC,
    SEAL_VERSION_MAJOR,
    CiphertextData,
    PlaintextData,
    SealFormatError,
    read_ciphertext,
    read_plaintext,
    unwrap,
    write_ciphertext,
    write_plaintext,
)

P = ParamSet.THRESHOLD.params  # n = 8192, primes [60, 60, 60]: 2 data primes, 3 at the key level
N = P.poly_modulus_degree
SEAL_MINOR = 3
"""Minor version of the SEAL inside TenSEAL 0.3.18 (SEAL loads only its own major.minor)."""
ZSTD = 2
HEADER = struct.Struct("<HBBBBHQ")


class Objects:
    """One secret-key context of the threshold parameter set and SEAL objects of it, saved."""

    def __init__(self) -> None:
        self.context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=N,
            coeff_mod_bit_sizes=list(P.coeff_mod_bit_sizes),
            n_threads=1,
        )
        self.seal = self.context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.seal)
        self.secret = self.context.secret_key().data
        self.public = self.context.public_key().data
        self.decryptor = sealapi.Decryptor(self.seal, self.secret)
        self.values = np.random.default_rng(0).normal(0.0, 1.0, N // 2)
        self.plain = sealapi.Plaintext()
        self.encoder.encode(self.values.tolist(), P.scale, self.plain)
        self.ciphertext = sealapi.Ciphertext(self.seal)
        sealapi.Encryptor(self.seal, self.public).encrypt(self.plain, self.ciphertext)
        self.seeded = buffer().save(
            sealapi.Encryptor(self.seal, self.secret).encrypt_symmetric(self.plain)
        )
        self.data_primes = _primes(self.seal.first_context_data())
        self.key_primes = _primes(self.seal.key_context_data())

    def save(self, obj: Any) -> bytes:
        return buffer().save(obj)

    def decode(self, ciphertext: Any) -> np.ndarray:
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.encoder.decode_double(plain))

    def load_ciphertext(self, data: bytes) -> Any:
        out = sealapi.Ciphertext(self.seal)
        buffer().load(out, self.seal, data)
        return out


def _primes(context_data: Any) -> list[int]:
    return [int(q.value()) for q in context_data.parms().coeff_modulus()]


@pytest.fixture(scope="module")
def objs() -> Objects:
    return Objects()


def _header(data: bytes) -> tuple[int, ...]:
    return HEADER.unpack_from(data)


# -- the header ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ciphertext", "public key", "secret key", "plaintext"])
def test_header_of_seal_saves(objs: Objects, kind: str, tmp_path: Path) -> None:
    # Prepare
    obj = {
        "ciphertext": objs.ciphertext,
        "public key": objs.public,
        "secret key": objs.secret,
        "plaintext": objs.plain,
    }[kind]

    # Execute
    data = objs.save(obj)
    magic, header_size, major, minor, compression, reserved, size = _header(data)

    # Assert: the 16 bytes SEAL writes first, field by field
    assert data[:2] == b"\x5e\xa1" and magic == SEAL_MAGIC == 0xA15E
    assert header_size == 16
    assert major == SEAL_VERSION_MAJOR == 4
    assert minor == SEAL_MINOR == sealapi.Serialization.SEALHeader().version_minor
    assert compression == ZSTD  # SEAL's own saves are zstd-compressed
    assert reserved == 0
    assert size == len(data)
    # SEAL's own header parser reads the same fields
    path = tmp_path / "obj"
    path.write_bytes(data)
    seal_header = sealapi.Serialization.SEALHeader()
    sealapi.Serialization.LoadHeader(str(path), seal_header, False)
    assert (seal_header.magic, seal_header.header_size) == (0xA15E, 16)
    assert (seal_header.version_major, seal_header.version_minor) == (4, SEAL_MINOR)
    assert seal_header.compr_mode == sealapi.COMPR_MODE_TYPE.ZSTD
    assert seal_header.size == len(data)


def test_written_objects_have_an_uncompressed_header_of_this_seal(objs: Objects) -> None:
    # Execute
    data = write_ciphertext(read_ciphertext(objs.save(objs.ciphertext)))

    # Assert
    magic, header_size, major, minor, compression, reserved, size = _header(data)
    assert (magic, header_size, major, minor) == (0xA15E, 16, 4, SEAL_MINOR)
    assert (compression, reserved, size) == (0, 0, len(data))


# -- fixed fields ---------------------------------------------------------------------------------


def test_ciphertext_fixed_fields(objs: Objects) -> None:
    # Execute
    ct = read_ciphertext(objs.save(objs.ciphertext))

    # Assert
    assert ct.parms_id == tuple(objs.seal.first_parms_id())
    assert ct.is_ntt_form is True
    assert ct.data.shape == (2, 2, N)  # size 2, 2 primes at the data level, degree n
    assert ct.data.dtype == np.dtype("<u8")
    assert ct.scale == P.scale == 2.0**104
    assert ct.correction_factor == 1
    assert (ct.data < np.asarray(objs.data_primes, dtype=np.uint64)[None, :, None]).all()


def test_ciphertext_fixed_fields_raw_bytes(objs: Objects) -> None:
    # Execute: the body after the header, decompressed, parsed here independently of sealio
    body = unwrap(objs.save(objs.ciphertext))
    fixed = struct.unpack_from("<4QBQQQdQ", body)

    # Assert: parms_id, is_ntt_form, size, degree, primes, scale, correction factor
    assert fixed[:4] == tuple(objs.seal.first_parms_id())
    assert fixed[4:] == (1, 2, N, 2, 2.0**104, 1)
    inner = body[73:]
    assert _header(inner)[:5] == (0xA15E, 16, 4, SEAL_MINOR, 0)  # the array is never compressed
    assert _header(inner)[6] == len(inner) == 16 + 8 + 8 * 2 * 2 * N
    assert struct.unpack_from("<Q", inner, 16) == (2 * 2 * N,)


def test_public_key_fields(objs: Objects) -> None:
    # Execute
    pk = read_ciphertext(objs.save(objs.public))

    # Assert: a ciphertext of 2 polynomials at the key level (3 primes), scale 1
    assert pk.parms_id == tuple(objs.seal.key_parms_id())
    assert pk.is_ntt_form is True
    assert pk.data.shape == (2, 3, N)
    assert pk.scale == 1.0 and pk.correction_factor == 1
    assert (pk.data < np.asarray(objs.key_primes, dtype=np.uint64)[None, :, None]).all()


def test_plaintext_fields(objs: Objects) -> None:
    # Execute
    data = objs.save(objs.plain)
    pt = read_plaintext(data, degree=N)

    # Assert: coeff_count = primes * n, at the data level, NTT form
    assert pt.parms_id == tuple(objs.seal.first_parms_id())
    assert pt.data.shape == (2, N)
    assert struct.unpack_from("<Q", unwrap(data), 32) == (2 * N,)
    assert objs.plain.coeff_count() == 2 * N
    assert pt.scale == P.scale


def test_secret_key_fields(objs: Objects) -> None:
    # Execute
    data = objs.save(objs.secret)
    sk = read_plaintext(data, degree=N)

    # Assert: every prime of the key level
    assert sk.parms_id == tuple(objs.seal.key_parms_id())
    assert sk.data.shape == (3, N)
    assert struct.unpack_from("<Q", unwrap(data), 32) == (3 * N,)
    assert sk.scale == 1.0
    assert (sk.data < np.asarray(objs.key_primes, dtype=np.uint64)[:, None]).all()


# -- the arrays: order and meaning ----------------------------------------------------------------


def test_arrays_match_seal_own_accessors(objs: Objects) -> None:
    # Prepare
    ct = read_ciphertext(objs.save(objs.ciphertext)).data.ravel()
    pt = read_plaintext(objs.save(objs.plain), degree=N).data.ravel()
    flat = objs.ciphertext.dyn_array()

    # Assert: [polynomial][prime][coefficient] is SEAL's own memory order
    for k in (0, 1, N - 1, N, 2 * N + 5, 3 * N + 17, 4 * N - 1):
        assert int(ct[k]) == flat.at(k)
    for k in (0, 1, N, 2 * N - 1):
        assert int(pt[k]) == objs.plain[k]


def test_arrays_decrypt_by_hand(objs: Objects) -> None:
    # Prepare: c0 + c1 s, in NTT form, prime by prime, is SEAL's decrypted plaintext
    c0, c1 = read_ciphertext(objs.save(objs.ciphertext)).data
    s = read_plaintext(objs.save(objs.secret), degree=N).data
    plain = sealapi.Plaintext()
    objs.decryptor.decrypt(objs.ciphertext, plain)
    m = read_plaintext(objs.save(plain), degree=N).data

    # Assert (exact Python integers, a sample of coefficients of both data primes)
    for i, q in enumerate(objs.data_primes):
        for k in range(0, N, 257):
            assert (int(c0[i, k]) + int(c1[i, k]) * int(s[i, k])) % q == int(m[i, k])


# -- round trips ----------------------------------------------------------------------------------


def test_ciphertext_round_trip_through_seal(objs: Objects) -> None:
    # Prepare
    original = read_ciphertext(objs.save(objs.ciphertext))

    # Execute: arrays -> bytes -> SEAL load -> decrypt
    loaded = objs.load_ciphertext(write_ciphertext(original))

    # Assert: the same ciphertext, so the same values
    np.testing.assert_array_equal(objs.decode(loaded), objs.decode(objs.ciphertext))
    assert np.abs(objs.decode(loaded) - objs.values).max() < 1e-6
    again = read_ciphertext(objs.save(loaded))
    assert (again.parms_id, again.scale, again.is_ntt_form) == (
        original.parms_id,
        original.scale,
        original.is_ntt_form,
    )
    np.testing.assert_array_equal(again.data, original.data)


def test_secret_key_round_trip_through_seal(objs: Objects) -> None:
    # Prepare
    sk = read_plaintext(objs.save(objs.secret), degree=N)

    # Execute
    key = sealapi.SecretKey()
    buffer().load(key, objs.seal, write_plaintext(sk))
    plain = sealapi.Plaintext()
    sealapi.Decryptor(objs.seal, key).decrypt(objs.ciphertext, plain)

    # Assert
    np.testing.assert_array_equal(
        np.asarray(objs.encoder.decode_double(plain)), objs.decode(objs.ciphertext)
    )


def test_public_key_round_trip_encrypts(objs: Objects) -> None:
    # Prepare
    pk = read_ciphertext(objs.save(objs.public))

    # Execute
    key = sealapi.PublicKey()
    buffer().load(key, objs.seal, write_ciphertext(pk))
    ct = sealapi.Ciphertext(objs.seal)
    sealapi.Encryptor(objs.seal, key).encrypt(objs.plain, ct)

    # Assert
    assert np.abs(objs.decode(ct) - objs.values).max() < 1e-6


def test_seal_refuses_a_residue_at_or_above_its_prime(objs: Objects) -> None:
    # Prepare
    original = read_ciphertext(objs.save(objs.ciphertext))
    q1 = objs.data_primes[1]
    below, at = original.data.copy(), original.data.copy()
    below[0, 1, 7] = q1 - 1
    at[0, 1, 7] = q1

    # Execute / Assert: q - 1 loads, q does not
    objs.load_ciphertext(write_ciphertext(replace(original, data=below)))
    with pytest.raises(RuntimeError, match="invalid"):
        objs.load_ciphertext(write_ciphertext(replace(original, data=at)))


def test_seal_refuses_a_wrong_parms_id(objs: Objects) -> None:
    original = read_ciphertext(objs.save(objs.ciphertext))
    with pytest.raises(RuntimeError, match="invalid"):
        objs.load_ciphertext(write_ciphertext(replace(original, parms_id=(1, 2, 3, 4))))


# -- exact bytes ----------------------------------------------------------------------------------

_SMALL_CT = CiphertextData(
    parms_id=(1, 2, 3, 0xFFFFFFFFFFFFFFFF),
    is_ntt_form=True,
    scale=2.0**40,
    data=np.array([[[0, 1, 2, 3]], [[4, 5, 6, (1 << 60) - 1]]], dtype=np.uint64),
)
_SMALL_CT_HEX = (
    # header: magic 5EA1, size 16, SEAL 4.3, uncompressed, reserved, total 177 bytes
    "5ea1100403000000"
    "b100000000000000"
    # parms_id
    "0100000000000000"
    "0200000000000000"
    "0300000000000000"
    "ffffffffffffffff"
    # is_ntt_form, size 2, degree 4, 1 prime, scale 2^40, correction factor 1
    "01"
    "0200000000000000"
    "0400000000000000"
    "0100000000000000"
    "0000000000007042"
    "0100000000000000"
    # data: header (88 bytes, uncompressed), count 8, then the values
    "5ea1100403000000"
    "5800000000000000"
    "0800000000000000"
    "0000000000000000"
    "0100000000000000"
    "0200000000000000"
    "0300000000000000"
    "0400000000000000"
    "0500000000000000"
    "0600000000000000"
    "ffffffffffffff0f"
)


def test_write_ciphertext_exact_bytes() -> None:
    # Execute
    data = write_ciphertext(_SMALL_CT)

    # Assert
    assert data[:16] == bytes.fromhex("5ea1100403000000b100000000000000")
    assert data.hex() == _SMALL_CT_HEX
    assert len(data) == 177


def test_write_plaintext_exact_bytes() -> None:
    # Prepare
    pt = PlaintextData(
        parms_id=(5, 6, 7, 8), scale=1.0, data=np.array([[9, 10], [11, 12]], dtype=np.uint64)
    )

    # Execute
    data = write_plaintext(pt)

    # Assert: header (total 16 + 48 + 56 = 120), parms_id, coeff_count 4, scale 1.0, 4 values
    assert data.hex() == (
        "5ea1100403000000"
        "7800000000000000"
        "0500000000000000"
        "0600000000000000"
        "0700000000000000"
        "0800000000000000"
        "0400000000000000"
        "000000000000f03f"
        "5ea1100403000000"
        "3800000000000000"
        "0400000000000000"
        "0900000000000000"
        "0a00000000000000"
        "0b00000000000000"
        "0c00000000000000"
    )


def test_read_inverts_write() -> None:
    # Execute
    ct = read_ciphertext(write_ciphertext(_SMALL_CT))
    pt = PlaintextData(parms_id=(0, 0, 0, 9), scale=3.5, data=np.arange(12, dtype=np.uint64))
    pt_back = read_plaintext(write_plaintext(replace(pt, data=pt.data.reshape(3, 4))), degree=4)

    # Assert
    assert ct.parms_id == _SMALL_CT.parms_id and ct.scale == _SMALL_CT.scale
    assert ct.is_ntt_form and ct.correction_factor == 1
    np.testing.assert_array_equal(ct.data, _SMALL_CT.data)
    assert ct.data.shape == (2, 1, 4)
    assert pt_back.parms_id == pt.parms_id and pt_back.scale == 3.5
    np.testing.assert_array_equal(pt_back.data, pt.data.reshape(3, 4))
    # a non-NTT ciphertext keeps its flag
    assert (
        read_ciphertext(write_ciphertext(replace(_SMALL_CT, is_ntt_form=False))).is_ntt_form
        is False
    )


# -- refusals -------------------------------------------------------------------------------------


def _patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("magic", "not a SEAL object"),
        ("header size", "not a SEAL object"),
        ("major", "version 3"),
        ("size field", "header says"),
        ("truncated", "header says"),
        ("extra byte", "header says"),
        ("too short", "shorter than a SEAL header"),
        ("zlib", "compression mode 1"),
        ("bad zstd", "zstd"),
    ],
)
def test_unwrap_refuses(objs: Objects, case: str, message: str) -> None:
    # Prepare
    good = objs.save(objs.plain)
    bad = {
        "magic": _patch(good, 0, b"\x5f\xa1"),
        "header size": _patch(good, 2, b"\x20"),
        "major": _patch(good, 3, b"\x03"),
        "size field": _patch(good, 8, struct.pack("<Q", len(good) + 1)),
        "truncated": good[:-1],
        "extra byte": good + b"\x00",
        "too short": good[:15],
        "zlib": _patch(good, 5, b"\x01"),
        "bad zstd": good[:16] + bytes(len(good) - 16),
    }[case]

    # Execute / Assert
    with pytest.raises(SealFormatError, match=message):
        unwrap(bad)
    assert unwrap(good)  # the unpatched bytes read


def test_unwrap_of_zstd_equals_the_uncompressed_body(objs: Objects) -> None:
    # SEAL's zstd save, decompressed, is byte for byte the body sealio writes uncompressed
    data = objs.save(objs.ciphertext)
    body = unwrap(data)
    assert unwrap(write_ciphertext(read_ciphertext(data))) == body


def test_read_ciphertext_refuses_a_seeded_ciphertext(objs: Objects) -> None:
    with pytest.raises(SealFormatError, match="seeded"):
        read_ciphertext(objs.seeded)


def test_read_plaintext_refuses_a_wrong_degree(objs: Objects) -> None:
    with pytest.raises(SealFormatError, match="degree"):
        read_plaintext(objs.save(objs.plain), degree=3 * N)


def test_read_refuses_truncated_bodies() -> None:
    # Prepare: a valid outer header around too little
    data = write_ciphertext(_SMALL_CT)
    short_fixed = _rewrap(unwrap(data)[:40])
    short_array = _rewrap(unwrap(data)[:100])
    wrong_count = _rewrap(_patch(unwrap(data), 73 + 16, struct.pack("<Q", 7)))

    # Execute / Assert
    with pytest.raises(SealFormatError, match="truncated ciphertext"):
        read_ciphertext(short_fixed)
    with pytest.raises(SealFormatError, match="header says 88 bytes, got 27"):
        read_ciphertext(short_array)
    with pytest.raises(SealFormatError, match="says 7 values"):
        read_ciphertext(wrong_count)
    with pytest.raises(SealFormatError, match="truncated plaintext"):
        read_plaintext(_rewrap(b"\x00" * 20), degree=4)


def _rewrap(body: bytes) -> bytes:
    return HEADER.pack(0xA15E, 16, 4, SEAL_MINOR, 0, 0, 16 + len(body)) + body

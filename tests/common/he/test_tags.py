"""The key holders' check that a sum is the sum of the listed uploads (common/he/tags.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.he import ParamSet, add_updates, encrypt_update
from common.he.ceremony import run_local
from common.he.keys import ServerKeys, fingerprint_of
from common.he.sealio import CiphertextData, read_ciphertext, write_ciphertext
from common.he.tags import (
    TAG_BITS,
    TAG_VECTORS,
    _vectors,
    check_tags,
    chunks_digest,
    new_seed,
    sum_tags,
    tags_of,
)
from common.he.threshold import ring_of

PARAMS = ParamSet.THRESHOLD.params
RING = ring_of(PARAMS)


@pytest.fixture(scope="module")
def keys() -> ServerKeys:
    done = run_local(PARAMS, holders=3, threshold=2)
    return ServerKeys(context=done.context, params=PARAMS, fingerprint=fingerprint_of(done.context))


@pytest.fixture(scope="module")
def uploads(keys: ServerKeys) -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    return [
        list(encrypt_update({"w": rng.normal(size=9000).astype(np.float32)}, keys=keys).chunks)
        for _ in range(4)
    ]


def _sum(uploads: list[list[bytes]]) -> list[bytes]:
    """The residue-wise sum mod the primes: what SEAL's homomorphic addition computes."""
    total = None
    for chunks in uploads:
        arrays = [read_ciphertext(c) for c in chunks]
        if total is None:
            total = [a.data.copy() for a in arrays]
        else:
            q = np.asarray(RING.data_primes, dtype=np.uint64)[None, :, None]
            total = [(t + a.data) % q for t, a in zip(total, arrays, strict=True)]
    assert total is not None
    first = read_ciphertext(uploads[0][0])
    return [
        write_ciphertext(
            CiphertextData(parms_id=first.parms_id, is_ntt_form=True, scale=first.scale, data=t)
        )
        for t in total
    ]


def _server_sum(keys: ServerKeys, uploads: list[list[bytes]]) -> list[bytes]:
    from common.he.wire import EncryptedUpdate

    template = encrypt_update({"w": np.zeros(9000, dtype=np.float32)}, keys=keys)
    updates = [EncryptedUpdate(header=template.header, chunks=tuple(c)) for c in uploads]
    return list(add_updates(updates, keys=keys).chunks)


def test_the_tag_of_the_true_sum_is_the_sum_of_the_tags(
    keys: ServerKeys, uploads: list[list[bytes]]
) -> None:
    # Prepare: the sum as the server's SEAL addition makes it, and as residues
    seed = new_seed()
    total = _sum(uploads)
    homomorphic = _server_sum(keys, uploads)
    assert [read_ciphertext(c).data.tolist() for c in homomorphic] == [
        read_ciphertext(c).data.tolist() for c in total
    ]

    # Execute
    tags = [tags_of(RING, chunks, seed) for chunks in uploads]

    # Assert
    assert len(tags[0]) == TAG_VECTORS * len(RING.data_primes)
    assert check_tags(RING, total, seed, tags)
    assert tags_of(RING, total, seed) == sum_tags(RING, tags)


def test_a_forged_sum_fails_the_check(keys: ServerKeys, uploads: list[list[bytes]]) -> None:
    # Prepare: the forgeries a server would try once the list is fixed
    seed = new_seed()
    tags = [tags_of(RING, chunks, seed) for chunks in uploads]
    total = _sum(uploads)
    alone = uploads[0]  # one client's upload, passed off as the sum of four
    fewer = _sum(uploads[:3])  # the sum of three, with the tags of four
    doubled = _sum([uploads[0], *uploads])  # one upload counted twice
    nudged = read_ciphertext(total[0])
    data = nudged.data.copy()
    data[1, 0, 5] = (data[1, 0, 5] + 1) % np.uint64(RING.data_primes[0])  # one residue of c1
    one_off = [
        write_ciphertext(
            CiphertextData(
                parms_id=nudged.parms_id, is_ntt_form=True, scale=nudged.scale, data=data
            )
        ),
        *total[1:],
    ]

    # Execute / Assert
    for forged in (alone, fewer, doubled, one_off):
        assert not check_tags(RING, forged, seed, tags)
    assert not check_tags(RING, total, seed, tags[:3])  # a sender left out of the tags
    assert check_tags(RING, total, seed, tags)


def test_the_check_reads_only_the_second_halves(
    keys: ServerKeys, uploads: list[list[bytes]]
) -> None:
    # c0 may be anything: with c1 fixed the server learns only the listed senders' sum
    seed = new_seed()
    tags = [tags_of(RING, chunks, seed) for chunks in uploads]
    total = _sum(uploads)
    changed = read_ciphertext(total[0])
    data = changed.data.copy()
    data[0] = 0
    swapped = [
        write_ciphertext(
            CiphertextData(
                parms_id=changed.parms_id, is_ntt_form=True, scale=changed.scale, data=data
            )
        ),
        *total[1:],
    ]
    assert check_tags(RING, swapped, seed, tags)


def test_tags_are_exact_and_depend_on_the_seed(uploads: list[list[bytes]]) -> None:
    # Prepare
    seed, other = new_seed(), new_seed()
    chunks = uploads[0]
    c1 = [read_ciphertext(c).data[1] for c in chunks]

    # Execute
    got = tags_of(RING, chunks, seed)

    # Assert: Python integers give the same inner products
    expected = []
    for v in range(TAG_VECTORS):
        for p, q in enumerate(RING.data_primes):
            total = 0
            for index, poly in enumerate(c1):
                r = _vectors(seed, index, poly.shape)[v, p]
                assert int(r.max()) < 2**TAG_BITS
                total += sum(int(a) * int(b) for a, b in zip(r, poly[p], strict=True))
            expected.append(total % q)
    assert got == expected
    assert tags_of(RING, chunks, other) != got


def test_the_chunks_digest_binds_order_and_content() -> None:
    a, b = b"x" * 10, b"y" * 10
    assert chunks_digest([a, b]) != chunks_digest([b, a])
    assert chunks_digest([a + b]) != chunks_digest([a, b])
    assert chunks_digest([a, b]) == chunks_digest([a, b])

"""Threshold CKKS: t-of-n decryption is right, fewer than t (or one share and every public thing)
decode to noise, tampering shows, the flood follows its rule, and the arithmetic is exact."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
import tenseal as ts

from common.he import codec
from common.he import threshold as th
from common.he._seal import buffer
from common.he.keys import ServerKeys, fingerprint_of
from common.he.params import HEParams, ParamSet
from common.he.sealio import CiphertextData, read_ciphertext
from common.he.threshold import KeyShare, ThresholdError
from common.he.wire import EncryptedSum

P = ParamSet.THRESHOLD.params
N = P.poly_modulus_degree
RIGHT = 1e-5
"""Largest error of a correct decryption."""
GARBAGE = 1e3
"""Smallest median error of a failed one (random residues decode to about 1e6)."""


@pytest.fixture(scope="module")
def ring() -> th.Ring:
    return th.ring_of(P)


@dataclass(frozen=True)
class Setup:
    """One collective key, its Shamir sharing and an encrypted sum of three updates."""

    holders: tuple[int, ...]
    threshold: int
    seed: bytes
    a: np.ndarray
    secrets: tuple[np.ndarray, ...]
    publics: tuple[np.ndarray, ...]
    public_key: bytes
    keys: ServerKeys
    shares: dict[int, KeyShare]
    total: EncryptedSum
    reference: np.ndarray
    """The float64 sum, flat in layout order."""
    flood: int
    """Flood bits of :func:`th.plan_flood` for this sum."""

    def partials(
        self,
        committee: Sequence[int],
        chunks: Sequence[bytes],
        members: Sequence[int] | None = None,
    ) -> dict[int, list[bytes]]:
        return {
            j: self.shares[j].partial_decrypt(chunks, committee=committee, flood=self.flood)
            for j in (committee if members is None else members)
        }


def _updates(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` updates of 9013 values (two chunks of 8192), two tensors, two dtypes."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(0.0, 1.0, (60, 150)).astype(np.float32),
            "b": rng.normal(0.0, 1.0, 13),
        }
        for _ in range(count)
    ]


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


def _make_setup(ring: th.Ring, threshold: int, holders_count: int) -> Setup:
    holders = tuple(range(1, holders_count + 1))
    seed = bytes([threshold, holders_count]) * 16
    a = th.common_polynomial(ring, seed)
    pairs = [th.keygen_party(ring, a) for _ in holders]
    public_key = th.collective_public_key(ring, a, [p for _, p in pairs])
    context = th.public_context(P, public_key)
    keys = ServerKeys(context=context, params=P, fingerprint=fingerprint_of(context))
    dealt = [th.deal_shares(ring, s, holders=holders, threshold=threshold) for s, _ in pairs]
    shares = {
        j: KeyShare(
            index=j,
            holders=holders,
            threshold=threshold,
            params=P,
            fingerprint=keys.fingerprint,
            residues=th.combine_shares(ring, [d[j] for d in dealt]),
        )
        for j in holders
    }
    updates = _updates(threshold * 10 + holders_count, 3)
    total = codec.add_updates([codec.encrypt_update(u, keys=keys) for u in updates], keys=keys)
    flood = th.plan_flood(
        P, n_updates=3, parties=holders_count, members=threshold, max_decryptions=1024
    ).bits
    return Setup(
        holders=holders,
        threshold=threshold,
        seed=seed,
        a=a,
        secrets=tuple(s for s, _ in pairs),
        publics=tuple(p for _, p in pairs),
        public_key=public_key,
        keys=keys,
        shares=shares,
        total=total,
        reference=np.sum([_flat(u) for u in updates], axis=0),
        flood=flood,
    )


_SETUPS: dict[tuple[int, int], Setup] = {}


@pytest.fixture(scope="module", params=[(3, 5), (2, 3), (3, 3)], ids=["3of5", "2of3", "3of3"])
def setup(request: pytest.FixtureRequest, ring: th.Ring) -> Setup:
    key = request.param
    if key not in _SETUPS:
        _SETUPS[key] = _make_setup(ring, *key)
    return _SETUPS[key]


@pytest.fixture(scope="module")
def two_of_three(ring: th.Ring) -> Setup:
    if (2, 3) not in _SETUPS:
        _SETUPS[(2, 3)] = _make_setup(ring, 2, 3)
    return _SETUPS[(2, 3)]


def _decode(parts: dict[int, list[bytes]], chunks: Sequence[bytes]) -> np.ndarray:
    """Combine ``parts`` as given, whatever their number (no threshold check)."""
    return th.combine(P, chunks, parts, threshold=len(parts))


def _median_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.median(np.abs(got[: reference.size] - reference)))


def _max_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(got[: reference.size] - reference).max())


def _arrays(chunk: bytes) -> tuple[np.ndarray, np.ndarray]:
    c0, c1 = read_ciphertext(chunk).data
    return c0, c1


def _partial_with_key(ring: th.Ring, chunk: bytes, key: np.ndarray) -> bytes:
    """``c0 + c1 key`` exactly, no flood: what a partial decryption would be without one."""
    c0, c1 = _arrays(chunk)
    primes = ring.data_primes
    return th.add_mod(c0, th.mul_mod(c1, key, primes), primes).astype("<u8").tobytes()


def _weights(ring: th.Ring, index: int, committee: Sequence[int]) -> np.ndarray:
    return np.asarray(
        [th.lagrange_at_zero(index, committee, q) for q in ring.data_primes], dtype=np.uint64
    )[:, None]


def _inverse(ring: th.Ring, values: np.ndarray) -> np.ndarray:
    return np.asarray(
        [
            [pow(int(x), -1, q) for x in row]
            for row, q in zip(values, ring.data_primes, strict=True)
        ],
        dtype=np.uint64,
    )


def _lift(ring: th.Ring, residues: np.ndarray) -> list[int]:
    """Centered integers of data-level residues (CRT over the data primes)."""
    q0, q1 = ring.data_primes
    big = q0 * q1
    m0, m1 = q1 * pow(q1, -1, q0), q0 * pow(q0, -1, q1)
    out = []
    for r0, r1 in zip(residues[0].tolist(), residues[1].tolist(), strict=True):
        x = (r0 * m0 + r1 * m1) % big
        out.append(x - big if x > big // 2 else x)
    return out


def _from_ntt(ring: th.Ring, ntt: np.ndarray) -> np.ndarray:
    ct = ring.load_ciphertext(
        CiphertextData(
            parms_id=ring.data_parms_id, is_ntt_form=True, scale=1.0, data=np.stack([ntt, ntt])
        )
    )
    ring.evaluator.transform_from_ntt_inplace(ct)
    return read_ciphertext(buffer().save(ct)).data[0]


# -- correctness ----------------------------------------------------------------------------------


def test_sum_of_updates_is_right(setup: Setup) -> None:
    # Prepare
    committee = setup.holders[: setup.threshold]

    # Execute
    out = codec.combine_sum(
        setup.total,
        setup.partials(committee, setup.total.chunks),
        keys=setup.keys,
        threshold=setup.threshold,
    )

    # Assert
    assert len(setup.total.chunks) == 2
    assert out["w"].dtype == np.float32 and out["w"].shape == (60, 150)
    assert out["b"].dtype == np.float64
    assert _max_error(_flat(out), setup.reference) < RIGHT


def test_every_threshold_sized_committee_decrypts(setup: Setup) -> None:
    # Prepare: the first chunk is enough here
    chunks = setup.total.chunks[:1]
    reference = setup.reference[:N]

    # Execute / Assert
    committees = list(itertools.combinations(setup.holders, setup.threshold))
    assert len(committees) == math.comb(len(setup.holders), setup.threshold)
    for committee in committees:
        got = th.combine(P, chunks, setup.partials(committee, chunks), threshold=setup.threshold)
        assert _max_error(got, reference) < RIGHT, committee


def test_more_than_threshold_members_decrypt(setup: Setup) -> None:
    chunks = setup.total.chunks[:1]
    got = th.combine(P, chunks, setup.partials(setup.holders, chunks), threshold=setup.threshold)
    assert _max_error(got, setup.reference[:N]) < RIGHT


def test_fewer_than_threshold_members_decode_to_garbage(setup: Setup) -> None:
    # Prepare
    chunks = setup.total.chunks[:1]
    reference = setup.reference[:N]
    t = setup.threshold

    # Execute / Assert: every subset of fewer than t members, two ways of trying
    subsets = [s for size in range(1, t) for s in itertools.combinations(setup.holders, size)]
    assert len(subsets) == sum(math.comb(len(setup.holders), k) for k in range(1, t))
    for subset in subsets:
        # the library refuses outright
        with pytest.raises(ThresholdError, match="threshold"):
            setup.shares[subset[0]].partial_decrypt(chunks, committee=subset, flood=setup.flood)
        # (a) the weights of a full committee, but only the subset's partial decryptions
        others = tuple(h for h in setup.holders if h not in subset)
        committee = tuple(sorted(subset + others[: t - len(subset)]))
        parts = setup.partials(committee, chunks, members=subset)
        with pytest.raises(ThresholdError, match="threshold"):
            th.combine(P, chunks, parts, threshold=t)
        assert _median_error(_decode(parts, chunks), reference) > GARBAGE, (subset, committee)
        # (b) the subset interpolating as if it were a committee (its threshold lowered)
        forged = {
            j: replace(setup.shares[j], threshold=len(subset)).partial_decrypt(
                chunks, committee=subset, flood=setup.flood
            )
            for j in subset
        }
        assert _median_error(_decode(forged, chunks), reference) > GARBAGE, subset


# -- a server holding every public thing and one share --------------------------------------------


def test_server_with_public_material_and_one_share_cannot_decrypt(
    ring: th.Ring, two_of_three: Setup
) -> None:
    # Prepare: what the server holds
    s = two_of_three
    primes = ring.data_primes
    a = th.common_polynomial(ring, s.seed)  # the seed of a is public
    np.testing.assert_array_equal(a, s.a)
    pk = read_ciphertext(s.public_key).data
    total = np.zeros_like(a)
    for p in s.publics:
        total = th.add_mod(total, p, ring.key_primes)
    np.testing.assert_array_equal(pk, np.stack([total, a]))  # every p_i, and the key they sum to
    old = s.total.chunks[:1]
    old_partials = {
        committee: s.partials(committee, old) for committee in itertools.combinations(s.holders, 2)
    }
    stolen = s.shares[3]  # ONE share
    new_update = _updates(99, 1)[0]
    new = codec.encrypt_update(new_update, keys=s.keys).chunks[:1]
    truth = _flat(new_update)[:N]
    c0_old, c1_old = _arrays(old[0])

    # Execute / Assert
    # the ciphertext alone (a zero key)
    zero = np.zeros((len(primes), N), dtype=np.uint64)
    assert (
        _median_error(_decode({1: [_partial_with_key(ring, new[0], zero)]}, new), truth) > GARBAGE
    )
    # the share as if it were the key
    as_key = _decode({3: [_partial_with_key(ring, new[0], stolen.residues)]}, new)
    assert _median_error(as_key, truth) > GARBAGE
    for committee in ((1, 3), (2, 3)):
        # the share with the Lagrange weight of a full committee, alone
        mine = stolen.partial_decrypt(new, committee=committee, flood=s.flood)
        assert _median_error(_decode({3: mine}, new), truth) > GARBAGE
        # ... completed with the other member's partial decryption of the OLD sum
        other = committee[0]
        replay = _decode({3: mine, other: old_partials[committee][other]}, new)
        assert _median_error(replay, truth) > GARBAGE
        # ... completed with the other member's weighted share solved out of its old partial
        # decryption, (d - c0) / c1 = lambda S + E / c1: the flood leaves nothing usable
        d_old = np.frombuffer(old_partials[committee][other][0], dtype="<u8").reshape(
            len(primes), N
        )
        guess = th.mul_mod(th.sub_mod(d_old, c0_old, primes), _inverse(ring, c1_old), primes)
        solved = _decode({3: mine, other: [_partial_with_key(ring, new[0], guess)]}, new)
        assert _median_error(solved, truth) > GARBAGE
        # control: without the flood that same attack recovers the share and decrypts
        weighted = th.mul_mod(s.shares[other].residues, _weights(ring, other, committee), primes)
        d_bare = np.frombuffer(_partial_with_key(ring, old[0], weighted), dtype="<u8")
        guess_bare = th.mul_mod(
            th.sub_mod(d_bare.reshape(len(primes), N), c0_old, primes),
            _inverse(ring, c1_old),
            primes,
        )
        np.testing.assert_array_equal(guess_bare, weighted)
        broken = _decode({3: mine, other: [_partial_with_key(ring, new[0], guess_bare)]}, new)
        assert _max_error(broken, truth) < RIGHT


def test_one_member_in_two_committees_leaks_no_share(ring: th.Ring, two_of_three: Setup) -> None:
    # Prepare: member 1 decrypts the same sum for committees (1, 2) and (1, 3); the server
    # holds both, and share 3
    s = two_of_three
    primes = ring.data_primes
    old = s.total.chunks[:1]
    _, c1 = _arrays(old[0])
    first = s.shares[1].partial_decrypt(old, committee=(1, 2), flood=s.flood)
    second = s.shares[1].partial_decrypt(old, committee=(1, 3), flood=s.flood)
    new_update = _updates(98, 1)[0]
    new = codec.encrypt_update(new_update, keys=s.keys).chunks[:1]
    truth = _flat(new_update)[:N]
    mine = s.shares[3].partial_decrypt(new, committee=(1, 3), flood=s.flood)
    step = th.sub_mod(_weights(ring, 1, (1, 2)), _weights(ring, 1, (1, 3)), primes)
    step_inverse = np.asarray(
        [[pow(int(x), -1, q)] for x, q in zip(step[:, 0], primes, strict=True)], dtype=np.uint64
    )

    def solve(d_12: bytes, d_13: bytes) -> np.ndarray:
        # d_12 - d_13 = c1 (lambda_12 - lambda_13) S_1 + (E - E')
        diff = th.sub_mod(
            np.frombuffer(d_12, dtype="<u8").reshape(2, N),
            np.frombuffer(d_13, dtype="<u8").reshape(2, N),
            primes,
        )
        return th.mul_mod(th.mul_mod(diff, _inverse(ring, c1), primes), step_inverse, primes)

    def attack(share_1: np.ndarray) -> np.ndarray:
        key_1 = th.mul_mod(share_1, _weights(ring, 1, (1, 3)), primes)
        return _decode({3: mine, 1: [_partial_with_key(ring, new[0], key_1)]}, new)

    # Execute / Assert: flooded, the guess is noise
    guess = solve(first[0], second[0])
    assert (guess != s.shares[1].residues).mean() > 0.99
    assert _median_error(attack(guess), truth) > GARBAGE
    # control: unflooded partial decryptions give the share away
    bare = [
        _partial_with_key(ring, old[0], th.mul_mod(s.shares[1].residues, w, primes))
        for w in (_weights(ring, 1, (1, 2)), _weights(ring, 1, (1, 3)))
    ]
    np.testing.assert_array_equal(solve(*bare), s.shares[1].residues)
    assert _max_error(attack(solve(*bare)), truth) < RIGHT


def test_no_single_party_secret_decrypts_but_their_sum_does(
    ring: th.Ring, two_of_three: Setup
) -> None:
    s = two_of_three
    chunks = s.total.chunks[:1]
    primes = ring.data_primes
    reference = s.reference[:N]
    for secret in s.secrets:
        got = _decode({1: [_partial_with_key(ring, chunks[0], secret[: len(primes)])]}, chunks)
        assert _median_error(got, reference) > GARBAGE
    together = np.zeros((len(primes), N), dtype=np.uint64)
    for secret in s.secrets:
        together = th.add_mod(together, secret[: len(primes)], primes)
    got = _decode({1: [_partial_with_key(ring, chunks[0], together)]}, chunks)
    assert _max_error(got, reference) < RIGHT


# -- tampering and share checks -------------------------------------------------------------------


def test_tampered_share_breaks_the_combination(ring: th.Ring, two_of_three: Setup) -> None:
    # Prepare
    s = two_of_three
    chunks = s.total.chunks[:1]
    reference = s.reference[:N]
    share = s.shares[1]
    one = share.residues.copy()
    one[0, 123] = (int(one[0, 123]) + 1) % ring.data_primes[0]
    row = share.residues.copy()
    row[1] = th.common_polynomial(ring, b"another row of residues")[1]

    # Execute / Assert
    honest = s.partials((1, 2), chunks)
    assert _max_error(_decode(honest, chunks), reference) < RIGHT
    for residues in (one, row):
        tampered = replace(share, residues=residues)
        assert tampered.digest() != share.digest()
        parts = {**honest, 1: tampered.partial_decrypt(chunks, committee=(1, 2), flood=s.flood)}
        assert _median_error(_decode(parts, chunks), reference) > GARBAGE


def test_share_digest(two_of_three: Setup) -> None:
    share = two_of_three.shares[1]
    same = replace(share, residues=share.residues.copy())
    assert share.digest() == same.digest()
    assert len(share.digest()) == 64
    assert share.digest() != two_of_three.shares[2].digest()
    assert share.digest() != replace(share, fingerprint="0" * 64).digest()
    assert share.digest() != replace(share, index=2).digest()


def test_key_share_refusals(ring: th.Ring, two_of_three: Setup) -> None:
    share = two_of_three.shares[1]
    at_prime = share.residues.copy()
    at_prime[1, 0] = ring.data_primes[1]
    with pytest.raises(ThresholdError, match="above its prime"):
        replace(share, residues=at_prime)
    for shape in ((1, N), (2, N - 1), (3, N)):
        with pytest.raises(ThresholdError, match="shape"):
            replace(share, residues=np.zeros(shape, dtype=np.uint64))
    with pytest.raises(ThresholdError, match="not among"):
        replace(share, index=4)
    with pytest.raises(ThresholdError, match="distinct"):
        replace(share, holders=(1, 1, 2))
    with pytest.raises(ThresholdError, match="threshold"):
        replace(share, threshold=4)
    with pytest.raises(ThresholdError, match="threshold"):
        replace(share, threshold=0)
    chunks = two_of_three.total.chunks[:1]
    with pytest.raises(ThresholdError, match="not in"):
        share.partial_decrypt(chunks, committee=(1, 7), flood=60)


def test_combine_refusals(ring: th.Ring, two_of_three: Setup) -> None:
    s = two_of_three
    chunks = s.total.chunks
    parts = s.partials((1, 2), chunks)
    with pytest.raises(ThresholdError, match="threshold is 2"):
        th.combine(P, chunks, {1: parts[1]}, threshold=2)
    with pytest.raises(ThresholdError, match="sent 1 of 2"):
        th.combine(P, chunks, {1: parts[1], 2: parts[2][:1]}, threshold=2)
    with pytest.raises(ThresholdError, match="residues"):
        th.combine(P, chunks, {1: parts[1], 2: [parts[2][0][:-8], parts[2][1]]}, threshold=2)
    high = np.frombuffer(parts[2][0], dtype="<u8").copy()
    high[5] = ring.data_primes[0]
    with pytest.raises(ThresholdError, match="above its prime"):
        th.combine(P, chunks, {1: parts[1], 2: [high.tobytes(), parts[2][1]]}, threshold=2)


# -- the flood ------------------------------------------------------------------------------------


def test_flood_bits_follow_the_rule_by_hand() -> None:
    # 10 updates, 3 parties, n = 8192: per-coefficient variance (2 + n * 3 * 2/3) / 12 = 1365.5,
    # B = 10 sqrt(10 * 1365.5) = 1168.546; F = ceil(40 + 13 + log2(1168.546) + log2(1024))
    #   = ceil(40 + 13 + 10.190 + 10) = ceil(73.190) = 74
    bound = th.sum_noise_bound(P, n_updates=10, parties=3)
    assert bound == pytest.approx(1168.546, abs=1e-3)
    assert th.flood_bits(P, n_updates=10, parties=3, max_decryptions=1024) == 74
    # 1 update, 1 party, 1 decryption: variance (2 + 8192 * 2/3) / 12 = 455.28, B = 213.37,
    # F = ceil(40 + 13 + 7.737) = 61
    assert th.sum_noise_bound(P, n_updates=1, parties=1) == pytest.approx(213.37, abs=1e-2)
    assert th.flood_bits(P, n_updates=1, parties=1, max_decryptions=1) == 61


@pytest.mark.parametrize("decryptions", [1, 2, 7, 1000, 1024, 2**20])
def test_flood_grows_one_bit_when_decryptions_double(decryptions: int) -> None:
    bits = th.flood_bits(P, n_updates=10, parties=3, max_decryptions=decryptions)
    assert th.flood_bits(P, n_updates=10, parties=3, max_decryptions=2 * decryptions) == bits + 1
    # and never shrinks with more updates or parties
    assert th.flood_bits(P, n_updates=20, parties=3, max_decryptions=decryptions) >= bits
    assert th.flood_bits(P, n_updates=10, parties=5, max_decryptions=decryptions) >= bits


def test_flood_arguments_are_checked() -> None:
    with pytest.raises(ThresholdError, match="max_decryptions"):
        th.flood_bits(P, n_updates=1, parties=1, max_decryptions=0)
    with pytest.raises(ThresholdError, match="n_updates"):
        th.sum_noise_bound(P, n_updates=0, parties=1)
    with pytest.raises(ThresholdError, match="parties"):
        th.sum_noise_bound(P, n_updates=1, parties=0)


def test_plan_flood_of_the_threshold_set() -> None:
    plan = th.plan_flood(P, n_updates=10, parties=3, members=2, max_decryptions=1024)
    assert plan.bits == 74
    # sqrt(2 / 3) 2**74 sqrt(8192 / 2) / 2**104
    assert plan.value_std == pytest.approx(math.sqrt(2 / 3) * 2.0**74 * 64 / 2.0**104)
    assert plan.value_std < 1e-7
    assert plan.headroom_bits >= 0


def test_plan_flood_refuses_without_headroom() -> None:
    with pytest.raises(ThresholdError, match="error std"):
        th.plan_flood(P, n_updates=10, parties=3, members=2, max_decryptions=2**40)
    small_scale = HEParams(
        name="small-scale",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(60, 60, 60),
        scale_bits=60,
    )
    with pytest.raises(ThresholdError, match="error std"):
        th.plan_flood(small_scale, n_updates=10, parties=3, members=2, max_decryptions=1024)
    with pytest.raises(ThresholdError, match="beyond"):
        th.plan_flood(
            P, n_updates=1, parties=3, members=2, max_decryptions=2**60, max_value_std=math.inf
        )
    tight = HEParams(
        name="tight", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40), scale_bits=40
    )
    with pytest.raises(ThresholdError, match="headroom"):
        th.plan_flood(
            tight, n_updates=1, parties=3, members=2, max_decryptions=1024, max_value_std=math.inf
        )


def test_plan_value_std_matches_the_measured_error(two_of_three: Setup) -> None:
    # Prepare: a flood large enough to dominate every other error (94 bits, std about 0.05)
    s = two_of_three
    plan = th.plan_flood(
        P, n_updates=1, parties=3, members=2, max_decryptions=2**32, max_value_std=1.0
    )
    assert plan.bits == 94
    chunks = s.total.chunks[:1]

    # Execute
    parts = {
        j: s.shares[j].partial_decrypt(chunks, committee=(1, 3), flood=plan.bits) for j in (1, 3)
    }
    error = th.combine(P, chunks, parts, threshold=2) - s.reference[:N]

    # Assert: 8192 values; the std's sampling error is about 1 %
    assert error.size == N
    assert plan.value_std / 3 < float(error.std()) < 3 * plan.value_std
    assert float(error.std()) == pytest.approx(plan.value_std, rel=0.1)
    assert abs(float(error.mean())) < 5 * plan.value_std / math.sqrt(N)


def test_partial_decryptions_are_fresh_and_reduced(ring: th.Ring, two_of_three: Setup) -> None:
    # Prepare
    s = two_of_three
    chunks = s.total.chunks[:1]
    primes = np.asarray(ring.data_primes, dtype=np.uint64)[:, None]

    # Execute
    first = s.partials((1, 2), chunks)
    second = s.partials((1, 2), chunks)

    # Assert
    assert first[1][0] != first[2][0]  # two members
    assert first[1][0] != second[1][0]  # two calls: a fresh flood each time
    for part in (*first.values(), *second.values()):
        assert len(part[0]) == 2 * N * 8
        assert (np.frombuffer(part[0], dtype="<u8").reshape(2, N) < primes).all()
    # the two calls differ by E - E', two floods of F bits, in the coefficient domain
    diff = th.sub_mod(
        np.frombuffer(first[1][0], dtype="<u8").reshape(2, N),
        np.frombuffer(second[1][0], dtype="<u8").reshape(2, N),
        ring.data_primes,
    )
    lifted = np.asarray(_lift(ring, _from_ntt(ring, diff)), dtype=np.float64)
    assert np.abs(lifted).max() <= 2.0 ** (s.flood + 1)
    assert np.abs(lifted).max() > 2.0 ** (s.flood - 1)
    assert float(lifted.std()) == pytest.approx(math.sqrt(2 / 3) * 2.0**s.flood, rel=0.05)


@pytest.mark.parametrize("bits", [0, 10, 59, 60, 75, 100])
def test_flood_residues_are_uniform_integers_of_f_bits(ring: th.Ring, bits: int) -> None:
    # Execute
    residues = th._flood_residues(ring, bits)

    # Assert: below each prime, and one integer in [-2**F, 2**F) per coefficient
    assert residues.shape == (2, N)
    assert (residues < np.asarray(ring.data_primes, dtype=np.uint64)[:, None]).all()
    values = _lift(ring, residues)
    assert min(values) >= -(2**bits) and max(values) < 2**bits
    if bits >= 10:
        assert max(values) > 2 ** (bits - 1) and min(values) < -(2 ** (bits - 1))
        std = float(np.std(np.asarray(values, dtype=np.float64)))
        assert std == pytest.approx(2.0**bits / math.sqrt(3), rel=0.05)
    else:
        assert set(values) == {-1, 0}
    assert not np.array_equal(residues, th._flood_residues(ring, bits))


# -- Shamir and Lagrange --------------------------------------------------------------------------


def test_lagrange_interpolates_a_random_polynomial_at_zero(ring: th.Ring) -> None:
    rng = np.random.default_rng(1)
    holders = (1, 2, 3, 4, 5)
    for q in ring.data_primes:
        for degree in (0, 1, 2, 4):
            coefficients = [int(x) % q for x in rng.integers(0, 2**62, degree + 1)]
            f = {j: sum(c * j**k for k, c in enumerate(coefficients)) % q for j in holders}
            for committee in itertools.combinations(holders, degree + 1):
                weights = {j: th.lagrange_at_zero(j, committee, q) for j in committee}
                assert sum(weights[j] * f[j] for j in committee) % q == coefficients[0]
                assert sum(weights.values()) % q == 1
            if degree:  # one point fewer than the degree needs: another value
                short = holders[:degree]
                guess = sum(th.lagrange_at_zero(j, short, q) * f[j] for j in short) % q
                assert guess != coefficients[0]
    with pytest.raises(ThresholdError, match="not in the committee"):
        th.lagrange_at_zero(3, (1, 2), ring.data_primes[0])


def test_dealt_shares_reconstruct_the_secret(ring: th.Ring) -> None:
    # Prepare
    primes = ring.data_primes
    secret = th.common_polynomial(ring, b"a random secret, uniform mod q..")
    holders = (1, 2, 3, 4, 5)

    # Execute
    shares = th.deal_shares(ring, secret, holders=holders, threshold=3)

    # Assert
    assert sorted(shares) == list(holders)
    for j in holders:
        assert shares[j].shape == (2, N)
        assert (shares[j] < np.asarray(primes, dtype=np.uint64)[:, None]).all()
    for size in (3, 4, 5):
        for committee in itertools.combinations(holders, size):
            total = np.zeros((2, N), dtype=np.uint64)
            for j in committee:
                total = th.add_mod(
                    total, th.mul_mod(shares[j], _weights(ring, j, committee), primes), primes
                )
            np.testing.assert_array_equal(total, secret[:2])
    for committee in itertools.combinations(holders, 2):
        total = np.zeros((2, N), dtype=np.uint64)
        for j in committee:
            total = th.add_mod(
                total, th.mul_mod(shares[j], _weights(ring, j, committee), primes), primes
            )
        assert (total != secret[:2]).mean() > 0.99
    # threshold 1: every share is the secret
    for value in th.deal_shares(ring, secret, holders=(1, 2), threshold=1).values():
        np.testing.assert_array_equal(value, secret[:2])


def test_deal_and_combine_refusals(ring: th.Ring) -> None:
    secret = np.zeros((3, N), dtype=np.uint64)
    with pytest.raises(ThresholdError, match="distinct"):
        th.deal_shares(ring, secret, holders=(0, 1), threshold=1)
    with pytest.raises(ThresholdError, match="distinct"):
        th.deal_shares(ring, secret, holders=(1, 1), threshold=1)
    with pytest.raises(ThresholdError, match="threshold"):
        th.deal_shares(ring, secret, holders=(1, 2), threshold=3)
    with pytest.raises(ThresholdError, match="shape"):
        th.combine_shares(ring, [np.zeros((3, N), dtype=np.uint64)])
    high = np.zeros((2, N), dtype=np.uint64)
    high[0, 0] = ring.data_primes[0]
    with pytest.raises(ThresholdError, match="above its prime"):
        th.combine_shares(ring, [high])


# -- modular arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["data", "key"])
def test_modular_arithmetic_matches_python_integers(ring: th.Ring, level: str) -> None:
    # Prepare: full 64-bit inputs (mul_mod reduces them) and the edge values
    primes = ring.data_primes if level == "data" else ring.key_primes
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2**64 - 1, (len(primes), 500), dtype=np.uint64, endpoint=True)
    b = rng.integers(0, 2**64 - 1, (len(primes), 500), dtype=np.uint64, endpoint=True)
    for row, q in enumerate(primes):
        a[row, :4] = [0, 1, q - 1, 2**64 - 1]
        b[row, :4] = [q - 1, q - 1, q - 1, 2**64 - 1]
    per_row = np.asarray([[q - 2] for q in primes], dtype=np.uint64)

    # Execute
    product = th.mul_mod(a, b, primes)
    scaled = th.mul_mod(a, per_row, primes)
    ar, br = (
        a % np.asarray(primes, dtype=np.uint64)[:, None],
        b % np.asarray(primes, dtype=np.uint64)[:, None],
    )
    added, subtracted = th.add_mod(ar, br, primes), th.sub_mod(ar, br, primes)

    # Assert
    for row, q in enumerate(primes):
        for k in range(a.shape[1]):
            x, y = int(a[row, k]), int(b[row, k])
            assert int(product[row, k]) == x * y % q
            assert int(scaled[row, k]) == x * (q - 2) % q
            assert int(added[row, k]) == (x % q + y % q) % q
            assert int(subtracted[row, k]) == (x % q - y % q) % q


def test_mul_mod_refuses_primes_of_60_bits_or_more() -> None:
    with pytest.raises(ThresholdError, match="below 2\\*\\*60"):
        th.mul_mod(np.ones((1, 2), dtype=np.uint64), np.ones((1, 2), dtype=np.uint64), [2**61 - 1])


# -- the common polynomial ------------------------------------------------------------------------


def test_common_polynomial(ring: th.Ring) -> None:
    # Execute
    a = th.common_polynomial(ring, b"s" * 32)
    again = th.common_polynomial(ring, b"s" * 32)
    other = th.common_polynomial(ring, b"t" + b"s" * 31)

    # Assert
    assert a.shape == (3, N) and a.dtype == np.uint64
    np.testing.assert_array_equal(a, again)  # deterministic in the seed
    assert (a != other).mean() > 0.99
    primes = np.asarray(ring.key_primes, dtype=np.uint64)[:, None]
    assert (a < primes).all()
    assert (a / primes.astype(np.float64)).mean() == pytest.approx(0.5, abs=0.01)
    th.common_polynomial(ring, b"x" * 16)
    with pytest.raises(ThresholdError, match="16 bytes"):
        th.common_polynomial(ring, b"x" * 15)


# -- the collective public context ----------------------------------------------------------------


def test_public_context_holds_the_collective_key_only(ring: th.Ring, two_of_three: Setup) -> None:
    # Prepare
    s = two_of_three
    context = s.keys.context
    total = np.zeros_like(s.a)
    for p in s.publics:
        total = th.add_mod(total, p, ring.key_primes)

    # Execute
    pk = read_ciphertext(buffer().save(context.public_key().data))

    # Assert
    assert not context.has_secret_key() and context.has_public_key() and context.is_public()
    assert pk.parms_id == ring.key_parms_id and pk.is_ntt_form
    np.testing.assert_array_equal(pk.data, np.stack([total, s.a]))
    assert context.global_scale == P.scale


def test_tenseal_ckks_vector_encrypts_for_the_committee(ring: th.Ring, two_of_three: Setup) -> None:
    # Prepare
    s = two_of_three
    values = np.random.default_rng(3).normal(0.0, 1.0, 1000)

    # Execute
    vector = ts.ckks_vector(s.keys.context, values.tolist())
    chunk = buffer().save(vector.ciphertext()[0])
    got = th.combine(P, [chunk], s.partials((2, 3), [chunk]), threshold=2)

    # Assert: real-slot encoding, so the values are the real parts (even positions)
    assert np.abs(got[0::2][: values.size] - values).max() < RIGHT
    assert np.abs(got[1::2]).max() < RIGHT
    with pytest.raises(Exception):  # noqa: B017 - TenSEAL raises its own types
        vector.decrypt()


def test_collective_public_key_refusals(ring: th.Ring, two_of_three: Setup) -> None:
    with pytest.raises(ThresholdError, match="no public shares"):
        th.collective_public_key(ring, two_of_three.a, [])
    with pytest.raises(ThresholdError, match="shape"):
        th.collective_public_key(ring, two_of_three.a, [two_of_three.publics[0][:2]])

"""Encrypt, check, add, decrypt: round trips within tolerance, and every bad payload rejected."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from common.he import (
    FORMAT_VERSION,
    CiphertextRejectedError,
    ClientKeys,
    EncryptedUpdate,
    Layout,
    ParamSet,
    RejectReason,
    ServerKeys,
    SumAccumulator,
    add_updates,
    check_update,
    committee_tolerance,
    decrypt_sum,
    default_flood_std,
    encrypt_update,
    from_record,
    generate_keys,
    layout_of,
    sum_from_record,
    to_record,
)
from common.he._seal import SealBuffer, buffer

FLOOD = 2.0**-20


@pytest.fixture(scope="module")
def client() -> ClientKeys:
    return generate_keys(ParamSet.FEDREC.params)


@pytest.fixture(scope="module")
def server(client: ClientKeys) -> ServerKeys:
    return client.public()


def _delta(seed: int) -> dict[str, np.ndarray]:
    """5013 values (two chunks of 4096, the last odd-sized), two dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(0.0, 1e-3, (100, 50)).astype(np.float32),
        "b": rng.normal(0.0, 1e-3, 13),
    }


@pytest.fixture(scope="module")
def update(client: ClientKeys) -> EncryptedUpdate:
    return encrypt_update(_delta(0), keys=client)


@pytest.fixture(scope="module")
def layout() -> Layout:
    return layout_of(_delta(0))


def test_hand_worked_sum(client: ClientKeys, server: ServerKeys) -> None:
    # Prepare
    a = {"x": np.array([1.0, -2.5, 0.25], dtype=np.float32)}
    b = {"x": np.array([0.5, 0.5, 0.5], dtype=np.float32)}

    # Execute
    total = add_updates(
        [encrypt_update(a, keys=client), encrypt_update(b, keys=client)], keys=server
    )
    out = decrypt_sum(total, keys=client, flood_std=FLOOD, rng=np.random.default_rng(0))

    # Assert
    assert out["x"].dtype == np.float32
    np.testing.assert_allclose(out["x"], [1.5, -2.0, 0.75], atol=8 * FLOOD)


def test_round_trip_within_tolerance(
    client: ClientKeys, server: ServerKeys, layout: Layout
) -> None:
    # Prepare
    deltas = [_delta(seed) for seed in range(3)]
    updates = [encrypt_update(d, keys=client) for d in deltas]
    flood_std = default_flood_std(client.params, n_updates=3)

    # Execute
    for u in updates:
        check_update(u, keys=server, expected_layout=layout)
    total = add_updates(updates, keys=server, expected_layout=layout)
    out = decrypt_sum(total, keys=client, flood_std=flood_std, rng=np.random.default_rng(1))

    # Assert
    assert total.n_updates == 3 and len(total.chunks) == 2
    assert list(out) == ["w", "b"]
    assert out["w"].shape == (100, 50) and out["w"].dtype == np.float32
    assert out["b"].shape == (13,) and out["b"].dtype == np.float64
    for name in ("w", "b"):
        expected = sum(d[name].astype(np.float64) for d in deltas)
        assert np.abs(out[name] - expected).max() < committee_tolerance(flood_std)
        assert np.abs(out[name] - expected).max() > 0  # the flood noise is there


def test_update_size_is_about_eight_bytes_per_value(update: EncryptedUpdate) -> None:
    # seeded (one polynomial of 4096 52-bit coefficients, in zstd-compressed 64-bit words) and two
    # values per complex slot: between 52 / 8 = 6.5 and 64 / 8 = 8 bytes per value, plus headers
    assert update.header.chunk_count == 2
    assert update.nbytes / 8192 < 8.5


def test_record_round_trip_through_flower_protobuf(update: EncryptedUpdate) -> None:
    # Execute
    record = to_record(update)
    proto = recorddict_to_proto(RecordDict({"he": record}))
    back = recorddict_from_proto(proto)["he"]

    # Assert
    assert isinstance(back, ConfigRecord)
    assert from_record(back) == update


def test_sum_record_round_trip(server: ServerKeys, update: EncryptedUpdate) -> None:
    total = add_updates([update, update], keys=server)
    assert sum_from_record(to_record(total)) == total
    with pytest.raises(CiphertextRejectedError) as err:
        from_record(to_record(total))
    assert err.value.reason is RejectReason.KIND
    disguised = EncryptedUpdate(header=total.header, chunks=total.chunks)
    assert _rejected(disguised, server, update.header.layout) is RejectReason.KIND


def _rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout, **kw: int
) -> RejectReason:
    with pytest.raises(CiphertextRejectedError) as err:
        check_update(update, keys=server, expected_layout=layout, **kw)
    assert str(err.value).startswith(f"ciphertext rejected ({err.value.reason.value}): ")
    return err.value.reason


def test_valid_update_passes(update: EncryptedUpdate, server: ServerKeys, layout: Layout) -> None:
    check_update(update, keys=server, expected_layout=layout)


def test_malformed_bytes_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    bad = replace(update, chunks=(b"not a ciphertext", *update.chunks[1:]))
    assert _rejected(bad, server, layout) is RejectReason.CIPHERTEXT


def test_truncated_chunk_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    first = update.chunks[0]
    bad = replace(update, chunks=(first[: len(first) // 2], *update.chunks[1:]))
    assert _rejected(bad, server, layout) is RejectReason.CIPHERTEXT


def test_wrong_fingerprint_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    bad = replace(update, header=replace(update.header, fingerprint="0" * 64))
    assert _rejected(bad, server, layout) is RejectReason.FINGERPRINT


def test_other_key_pair_rejected(server: ServerKeys, layout: Layout) -> None:
    other = encrypt_update(_delta(0), keys=generate_keys(ParamSet.FEDREC.params))
    assert _rejected(other, server, layout) is RejectReason.FINGERPRINT


def test_wrong_version_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    bad = replace(update, header=replace(update.header, version=FORMAT_VERSION + 1))
    assert _rejected(bad, server, layout) is RejectReason.VERSION
    record = to_record(update)
    record["version"] = FORMAT_VERSION + 1
    with pytest.raises(CiphertextRejectedError, match="format version 2"):
        from_record(record)


def test_wrong_chunk_count_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    dropped = replace(update, chunks=update.chunks[:1])
    lying = replace(update, header=replace(update.header, chunk_count=3))
    assert _rejected(dropped, server, layout) is RejectReason.CHUNK_COUNT
    assert _rejected(lying, server, layout) is RejectReason.CHUNK_COUNT


def test_oversized_chunk_rejected(
    update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    padded = update.chunks[0] + bytes(server.params.max_chunk_bytes)
    bad = replace(update, chunks=(padded, *update.chunks[1:]))
    assert _rejected(bad, server, layout) is RejectReason.OVERSIZED
    assert _rejected(update, server, layout, max_chunk_bytes=1000) is RejectReason.OVERSIZED


def test_layout_mismatch_rejected(update: EncryptedUpdate, server: ServerKeys) -> None:
    other = layout_of({"w": np.zeros((100, 50), np.float32), "c": np.zeros(13)})
    assert _rejected(update, server, other) is RejectReason.LAYOUT


def test_wrong_scale_rejected(
    client: ClientKeys, update: EncryptedUpdate, server: ServerKeys, layout: Layout
) -> None:
    # Prepare: a well-formed ciphertext at scale 2**30 instead of 2**38
    tools = client.seal
    plain = tools.new_plaintext()
    tools.encoder.encode([0.5] * 8, 2.0**30, plain)
    chunk = buffer().save(tools.encryptor.encrypt_symmetric(plain))
    bad = replace(update, chunks=(chunk, *update.chunks[1:]))

    # Execute / Assert
    assert _rejected(bad, server, layout) is RejectReason.CIPHERTEXT


def test_malformed_record_rejected(update: EncryptedUpdate) -> None:
    record = to_record(update)
    del record["fingerprint"]
    with pytest.raises(CiphertextRejectedError, match="'fingerprint' must be str") as err:
        from_record(record)
    assert err.value.reason is RejectReason.MALFORMED
    record = to_record(update)
    record["layout"] = "[[1, 2]]"
    with pytest.raises(CiphertextRejectedError, match="layout entry"):
        from_record(record)
    record["layout"] = '[["w", [2], "float32"], ["w", [3], "float32"]]'
    with pytest.raises(CiphertextRejectedError, match="repeats a tensor name"):
        from_record(record)


def test_buffer_without_memfd(
    monkeypatch: pytest.MonkeyPatch, client: ClientKeys, update: EncryptedUpdate
) -> None:
    # Prepare: systems without memfd_create fall back to a private temporary file
    monkeypatch.delattr(os, "memfd_create")
    buf = SealBuffer()
    ciphertext = client.seal.new_ciphertext()

    # Execute
    buf.load(ciphertext, client.seal.seal_context, update.chunks[0])
    saved = buf.save(ciphertext)

    # Assert: a loaded seeded ciphertext saves in full (about twice the bytes)
    assert len(saved) > 1.5 * len(update.chunks[0])


def test_accumulator_drops_a_bad_update_whole(
    client: ClientKeys, server: ServerKeys, update: EncryptedUpdate, layout: Layout
) -> None:
    # Prepare: second chunk broken, so the first one must not be added either
    good = [encrypt_update(_delta(s), keys=client) for s in (1, 2)]
    bad = replace(update, chunks=(update.chunks[0], b"\x00" * 100))
    acc = SumAccumulator(keys=server, layout=layout)

    # Execute
    acc.add(good[0])
    with pytest.raises(CiphertextRejectedError):
        acc.add(bad)
    acc.add(good[1])
    out = decrypt_sum(acc.result(), keys=client, flood_std=FLOOD, rng=np.random.default_rng(0))

    # Assert
    expected = _delta(1)["b"] + _delta(2)["b"]
    assert acc.count == 2
    assert np.abs(out["b"] - expected).max() < committee_tolerance(FLOOD)


def test_encrypt_refuses_bad_input(client: ClientKeys) -> None:
    with pytest.raises(ValueError, match="arrays must be finite"):
        encrypt_update({"x": np.array([1.0, np.nan])}, keys=client)
    with pytest.raises(ValueError, match="arrays hold"):
        encrypt_update({"x": np.array([1e6])}, keys=client)
    with pytest.raises(ValueError, match="arrays must hold at least one tensor"):
        encrypt_update({}, keys=client)
    with pytest.raises(ValueError, match="float16/32/64"):
        encrypt_update({"x": np.array([1, 2])}, keys=client)


def test_overflowing_sum_is_not_released(client: ClientKeys, server: ServerKeys) -> None:
    # Prepare: two updates each within range whose sum is not (max_abs_value = 4096)
    big = {"x": np.array([3000.0, 1.0])}
    total = add_updates([encrypt_update(big, keys=client)] * 2, keys=server)

    # Execute / Assert
    with pytest.raises(CiphertextRejectedError) as err:
        decrypt_sum(total, keys=client, flood_std=FLOOD, rng=np.random.default_rng(0))
    assert err.value.reason is RejectReason.OVERFLOW


def test_decrypt_checks_flood_std(
    client: ClientKeys, server: ServerKeys, update: EncryptedUpdate
) -> None:
    total = add_updates([update], keys=server)
    with pytest.raises(ValueError, match="flood_std"):
        decrypt_sum(total, keys=client, flood_std=float("nan"), rng=np.random.default_rng(0))

"""Encrypt a model update, check and add encrypted updates, decrypt the sum.

The three steps of docs/design.md, "One training round", for CKKS (Cheon, Kim, Kim and Song 2017):

- a client flattens its (clipped, noised, ``1/m``-scaled) update in layout order, cuts it into
  chunks of ``n`` values, packs each pair of values into one complex CKKS slot (real and imaginary
  part: ``n / 2`` slots hold ``n`` values, twice what real-only encoding holds) and encrypts each
  chunk with the *secret* key, as a seeded ciphertext (:func:`encrypt_update`). Symmetric-key
  encryption is enough because every device holds the secret key anyway (docs/design.md,
  "Encryption"), has a smaller error than public-key encryption, and SEAL can then send the
  ciphertext's random half as a 64-byte PRNG seed: half the bytes. Both halve the bytes and the
  time per value.
- the server checks each update (:func:`check_update`) and adds the valid ones
  (:class:`SumAccumulator`, :func:`add_updates`): additions only, with the public context.
- each committee member decrypts the sum, floods it with noise and rounds it
  (:func:`decrypt_sum`, see :mod:`common.he.release`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from common.he._seal import SealTools, buffer
from common.he.keys import ClientKeys, ServerKeys
from common.he.params import HEParams
from common.he.release import flood_and_round_inplace
from common.he.wire import (
    FORMAT_VERSION,
    CiphertextRejectedError,
    EncryptedSum,
    EncryptedUpdate,
    Layout,
    PayloadKind,
    RejectReason,
    UpdateHeader,
    check_header,
    layout_of,
)

__all__ = [
    "SumAccumulator",
    "add_updates",
    "check_update",
    "combine_sum",
    "decrypt_sum",
    "encrypt_update",
]

logger = logging.getLogger(__name__)


def encrypt_update(arrays: Mapping[str, np.ndarray], *, keys: ServerKeys) -> EncryptedUpdate:
    """Encrypt a dict of float arrays (a model delta) into CKKS ciphertexts.

    With a secret-key context (single-key mode) the ciphertexts are seeded symmetric-key ones;
    with a public context (threshold mode, :mod:`common.he.threshold`) they are public-key
    ciphertexts under the collective key, which cannot be seeded (32 bytes per value).

    Parameters
    ----------
    arrays:
        Named float tensors, e.g. ``{name: delta}`` of a model; their order is the layout.
    keys:
        The device's secret-key context (:func:`common.he.keys.load_client_context`), or the
        collective public context of a threshold key.

    Returns
    -------
    EncryptedUpdate
        Header (version, fingerprint, parameter set, layout, counts) and
        ``ceil(total / n)`` chunks.

    Raises
    ------
    ValueError
        Naming ``arrays`` when it is empty, holds non-float tensors or a non-finite value, or a
        value beyond ``keys.params.max_abs_value`` (it would wrap around); naming ``keys`` when
        they hold neither a secret nor a public key.
    """
    tools = keys.seal
    if tools.encryptor is None and tools.public_encryptor is None:
        raise ValueError("keys must hold a secret key (client.ctx) or a public key to encrypt")
    params = keys.params
    layout = layout_of(arrays)
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])
    if not np.isfinite(flat).all():
        raise ValueError("arrays must be finite (NaN or infinity found)")
    peak = float(np.abs(flat).max())
    if peak > params.max_abs_value:
        raise ValueError(
            f"arrays hold |value| = {peak:.4g} > {params.max_abs_value:.4g}, the most parameter "
            f"set {params.name!r} represents without wrapping around"
        )
    if flat.size % 2:
        flat = np.append(flat, 0.0)
    packed = flat.view(np.complex128)  # (ceil(total / 2),): value 2k real part, 2k+1 imaginary
    buf = buffer()
    plain = tools.new_plaintext()
    chunks = []
    for start in range(0, packed.size, params.slots):
        tools.encoder.encode(packed[start : start + params.slots].tolist(), params.scale, plain)
        if tools.encryptor is not None:
            chunks.append(buf.save(tools.encryptor.encrypt_symmetric(plain)))
        else:
            ciphertext = tools.new_ciphertext()
            tools.public_encryptor.encrypt(plain, ciphertext)
            chunks.append(buf.save(ciphertext))
    header = _header(keys, layout, PayloadKind.UPDATE)
    return EncryptedUpdate(header=header, chunks=tuple(chunks))


def check_update(
    update: EncryptedUpdate,
    *,
    keys: ServerKeys,
    expected_layout: Layout,
    max_chunk_bytes: int | None = None,
) -> None:
    """Check an update fully, as the server does before adding it.

    Checks, in order: format version, kind, key fingerprint, parameter-set name, layout and total,
    chunk count, each chunk's size, and that each chunk deserializes to a fresh ciphertext at the
    parameter set's data level and scale.

    Parameters
    ----------
    update:
        From :func:`common.he.wire.from_record`.
    keys:
        The server's public context; its fingerprint and parameters are the expected ones.
    expected_layout:
        The model's layout (:func:`common.he.wire.layout_of` of the global weights).
    max_chunk_bytes:
        Largest chunk accepted; default ``keys.params.max_chunk_bytes`` (an uncompressed
        unseeded ciphertext plus 1 KiB).

    Raises
    ------
    CiphertextRejectedError
        With the :class:`~common.he.wire.RejectReason` of the first failed check.
    """
    _check_and_load(update, keys, expected_layout, max_chunk_bytes)


class SumAccumulator:
    """Adds checked updates one at a time; an update is added whole or not at all.

    Parameters
    ----------
    keys:
        The server's public context (no secret key is needed to add).
    layout:
        The model's layout every update must have.
    max_chunk_bytes:
        As in :func:`check_update`.
    """

    def __init__(
        self, *, keys: ServerKeys, layout: Layout, max_chunk_bytes: int | None = None
    ) -> None:
        self._keys = keys
        self._layout = layout
        self._max_chunk_bytes = max_chunk_bytes
        self._sums: list[Any] | None = None  # SEAL ciphertexts, one per chunk
        self._count = 0

    @property
    def count(self) -> int:
        """Updates added so far."""
        return self._count

    def add(self, update: EncryptedUpdate) -> None:
        """Check ``update`` as :func:`check_update` does and add it to the running sum.

        Raises :class:`CiphertextRejectedError` and leaves the sum unchanged when a check fails.
        """
        keys = self._keys
        loaded = _check_and_load(update, keys, self._layout, self._max_chunk_bytes)
        if self._sums is None:
            self._sums = loaded
        else:
            evaluator = keys.seal.evaluator
            for acc, ciphertext in zip(self._sums, loaded, strict=True):
                evaluator.add_inplace(acc, ciphertext)
        self._count += 1

    def result(self) -> EncryptedSum:
        """The encrypted sum of the updates added; ``ValueError`` if there are none."""
        if self._sums is None:
            raise ValueError("no update was added: there is no sum")
        buf = buffer()
        chunks = tuple(buf.save(ciphertext) for ciphertext in self._sums)
        header = _header(self._keys, self._layout, PayloadKind.SUM)
        return EncryptedSum(header=header, chunks=chunks, n_updates=self._count)


def add_updates(
    updates: Iterable[EncryptedUpdate],
    *,
    keys: ServerKeys,
    expected_layout: Layout | None = None,
    max_chunk_bytes: int | None = None,
) -> EncryptedSum:
    """Homomorphically add encrypted updates (additions only; no secret key needed).

    Parameters
    ----------
    updates:
        At least one update, normally each already passed :func:`check_update`.
    keys:
        The server's public context.
    expected_layout:
        The model's layout; default the first update's.
    max_chunk_bytes:
        As in :func:`check_update`.

    Raises
    ------
    CiphertextRejectedError
        When an update fails a check (use :class:`SumAccumulator` to drop it and go on).
    ValueError
        Naming ``updates`` when there are none.
    """
    accumulator: SumAccumulator | None = None
    for update in updates:
        if accumulator is None:
            layout = expected_layout if expected_layout is not None else update.header.layout
            accumulator = SumAccumulator(keys=keys, layout=layout, max_chunk_bytes=max_chunk_bytes)
        accumulator.add(update)
    if accumulator is None:
        raise ValueError("updates must hold at least one update")
    return accumulator.result()


def decrypt_sum(
    total: EncryptedSum,
    *,
    keys: ClientKeys,
    flood_std: float,
    rng: np.random.Generator,
    expected_layout: Layout | None = None,
) -> dict[str, np.ndarray]:
    """Decrypt the server's sum, flood it with noise and round it before release.

    Li and Micciancio 2021: a raw CKKS decryption leaks the secret key, so the values are released
    only after :func:`common.he.release.flood_and_round_inplace`.

    Parameters
    ----------
    total:
        From :func:`common.he.wire.sum_from_record`.
    keys:
        A committee member's secret-key context.
    flood_std:
        Standard deviation of the flooding noise (> 0); use
        ``default_flood_std(keys.params, n_updates=total.n_updates)``.
    rng:
        This member's own random generator.
    expected_layout:
        The model's layout; default the header's.

    Returns
    -------
    dict[str, numpy.ndarray]
        The summed tensors, with the layout's names, shapes and dtypes.

    Raises
    ------
    CiphertextRejectedError
        When the sum fails a check, or a decrypted value lies beyond ``max_abs_value`` (the sum
        wrapped around the modulus: some update was out of range).
    ValueError
        Naming ``flood_std`` or ``keys``.
    """
    if not (math.isfinite(flood_std) and flood_std > 0):
        raise ValueError(f"flood_std must be a finite number > 0, got {flood_std!r}")
    flat = _decrypt_flat(total, keys, expected_layout)
    flood_and_round_inplace(flat, flood_std=flood_std, rng=rng)
    return _unflatten(flat, total.header.layout)


def combine_sum(
    total: EncryptedSum,
    partials: Mapping[int, Sequence[bytes]],
    *,
    keys: ServerKeys,
    threshold: int,
    expected_layout: Layout | None = None,
) -> dict[str, np.ndarray]:
    """The sum's tensors from ``threshold`` or more key holders' partial decryptions.

    Threshold mode (:mod:`common.he.threshold`): each holder floods its own partial decryption
    in the coefficient domain, so the combined values are released as they decode.

    Parameters
    ----------
    total:
        The encrypted sum the holders decrypted.
    partials:
        Holder index to its :meth:`common.he.threshold.KeyShare.partial_decrypt` output, all made
        for this same committee.
    keys:
        The collective public context (its parameters and fingerprint are checked).
    threshold:
        Partial decryptions needed.

    Raises
    ------
    CiphertextRejectedError
        When the sum fails a check or decodes beyond ``max_abs_value`` (it wrapped around).
    common.he.threshold.ThresholdError
        With fewer than ``threshold`` partial decryptions, or a malformed one.
    """
    from common.he.threshold import combine

    layout = expected_layout if expected_layout is not None else total.header.layout
    _check_and_load(total, keys, layout, None)
    flat = combine(keys.params, total.chunks, partials, threshold=threshold)[: layout.total]
    _check_range(flat, keys.params)
    return _unflatten(flat, layout)


def _check_range(flat: np.ndarray, params: HEParams) -> None:
    peak = float(np.abs(flat).max())
    if not peak <= params.max_abs_value:
        raise CiphertextRejectedError(
            RejectReason.OVERFLOW,
            f"decrypted sum reaches |value| = {peak:.4g} > {params.max_abs_value:.4g}: "
            "it wrapped around the modulus (an update was out of range)",
        )


def _decrypt_flat(
    total: EncryptedSum, keys: ClientKeys, expected_layout: Layout | None = None
) -> np.ndarray:
    """Decrypt to float64 values, shape ``(total_values,)``, WITHOUT flooding: never release."""
    tools = keys.seal
    if tools.decryptor is None:
        raise ValueError("keys must hold the secret key (client.ctx) to decrypt")
    layout = expected_layout if expected_layout is not None else total.header.layout
    ciphertexts = _check_and_load(total, keys, layout, None)
    plain = tools.new_plaintext()
    parts = []
    for ciphertext in ciphertexts:
        tools.decryptor.decrypt(ciphertext, plain)
        slots = np.asarray(tools.encoder.decode_complex(plain), dtype=np.complex128)
        parts.append(slots.view(np.float64))  # (n,): real, imaginary, real, ...
    flat = np.concatenate(parts)[: layout.total]
    _check_range(flat, keys.params)
    return flat


def _header(keys: ServerKeys, layout: Layout, kind: PayloadKind) -> UpdateHeader:
    return UpdateHeader(
        version=FORMAT_VERSION,
        kind=kind,
        fingerprint=keys.fingerprint,
        params_name=keys.params.name,
        layout=layout,
        total_values=layout.total,
        chunk_count=math.ceil(layout.total / keys.params.values_per_chunk),
    )


def _check_and_load(
    payload: EncryptedUpdate | EncryptedSum,
    keys: ServerKeys,
    layout: Layout,
    max_chunk_bytes: int | None,
) -> list[Any]:
    """Every check of :func:`check_update`; returns the deserialized SEAL ciphertexts."""
    check_header(
        payload.header,
        payload.chunks,
        fingerprint=keys.fingerprint,
        params=keys.params,
        layout=layout,
        kind=PayloadKind.SUM if isinstance(payload, EncryptedSum) else PayloadKind.UPDATE,
        max_chunk_bytes=max_chunk_bytes,
    )
    return _load_chunks(payload.chunks, keys.seal, keys.params)


def _load_chunks(chunks: Sequence[bytes], tools: SealTools, params: HEParams) -> list[Any]:
    """Deserialize every chunk and check it is a 2-part ciphertext at the data level and scale.

    SEAL's ``load`` reads seeded (updates) and full (sums) ciphertexts alike; it validates the
    bytes against the context (header, sizes, coefficients below their primes) and raises on
    anything else; those errors become ``CiphertextRejectedError``.
    """
    buf = buffer()
    loaded = []
    for i, chunk in enumerate(chunks):
        ciphertext = tools.new_ciphertext()
        try:
            buf.load(ciphertext, tools.seal_context, chunk)
        except Exception as err:  # SEAL raises several types (ValueError, RuntimeError, ...)
            raise CiphertextRejectedError(
                RejectReason.CIPHERTEXT, f"chunk {i} does not deserialize ({err})"
            ) from None
        if (
            ciphertext.size() != 2
            or list(ciphertext.parms_id()) != list(tools.first_parms_id)
            or not ciphertext.is_ntt_form()
            or ciphertext.scale != params.scale
        ):
            raise CiphertextRejectedError(
                RejectReason.CIPHERTEXT,
                f"chunk {i} is not a fresh ciphertext at the data level and scale "
                f"2**{params.scale_bits} (size {ciphertext.size()}, scale {ciphertext.scale:.6g})",
            )
        loaded.append(ciphertext)
    return loaded


def _unflatten(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in layout.tensors:
        out[spec.name] = flat[offset : offset + spec.size].reshape(spec.shape).astype(spec.dtype)
        offset += spec.size
    return out

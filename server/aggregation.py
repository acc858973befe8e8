"""Adding up a round's updates on the server, and what they cost on the wire.

Clients send their update already weighted (``weight * (local - global)``), so the server only
adds: :class:`PlainSum` in plaintext, or :class:`server.he.CommitteeSum` over ciphertexts, both
behind the :class:`UpdateSum` interface the plain strategy (:mod:`server.strategy`) drives.
:func:`apply_sum_inplace` moves the global model along the sum with the server optimizer; the
in-process engine (:mod:`simulations.fastsim`) applies its sums with it too. :func:`wire_bytes`
measures a message's serialized size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import InflatableObject

from common.protocol import ARRAYS_RECORD
from server.optimizer import ServerOpt

__all__ = ["PlainSum", "UpdateSum", "apply_sum_inplace", "to_numpy", "wire_bytes"]


_SIZE_CACHE: dict[tuple[object, ...], int] = {}


def _cached_size(key: tuple[object, ...], measure: Callable[[], int]) -> int:
    if key not in _SIZE_CACHE:
        _SIZE_CACHE[key] = measure()
    return _SIZE_CACHE[key]


def _nested_size(obj: InflatableObject) -> int:
    """Serialized size of ``obj`` and every object it references, counting repeats."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(_nested_size(child) for child in children.values())


def wire_bytes(content: RecordDict) -> int:
    """Bytes ``content`` takes on the wire: the serialized size of all its records.

    Flower sends a record tree as objects referenced by content hash (an ArrayRecord, its
    Arrays, their data chunks). Their serialized sizes depend only on names, dtypes and shapes,
    so an ArrayRecord's is measured once per layout; serializing and hashing every
    multi-megabyte update again only to measure it would cost the server about 12 ms per reply.
    The one difference from Flower's transfer: byte-identical chunks, which Flower sends once,
    are counted each time they occur (rare for trained float weights).
    """
    layout = tuple((key, type(rec).__name__) for key, rec in content.items())
    total = _cached_size(("dict", layout), lambda: len(content.deflate()))
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            sig = tuple((k, a.dtype, tuple(a.shape), a.stype, len(a.data)) for k, a in rec.items())
            total += _cached_size(("arrays", sig), lambda r=rec: _nested_size(r))  # type: ignore[misc]
        elif isinstance(rec, ConfigRecord):
            total += _config_size(rec)
        else:
            total += len(rec.deflate())
    return total


_BIG = 1 << 16


def _config_size(record: ConfigRecord) -> int:
    """Serialized size of a config record; a large list of bytes (ciphertext chunks) is counted
    as protobuf lays it out (a tag, a length and the bytes per item) without serializing it."""
    big: dict[str, list[bytes]] = {}
    for key, value in record.items():
        if isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
            blobs = [v for v in value if isinstance(v, bytes)]
            if sum(len(b) for b in blobs) > _BIG:
                big[key] = blobs
    if not big:
        return len(record.deflate())
    rest = ConfigRecord({k: v for k, v in record.items() if k not in big})
    size = len(rest.deflate())
    for key, blobs in big.items():
        items = sum(1 + _varint_size(len(b)) + len(b) for b in blobs)
        size += len(key) + 8 + _varint_size(items) + items  # the map entry around the list
    return size


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def apply_sum_inplace(
    weights: dict[str, np.ndarray],
    total: Mapping[str, np.ndarray],
    *,
    denominator: float,
    optimizer: ServerOpt,
    lr_scale: float,
) -> None:
    """Move ``weights`` (in place) by the optimizer along ``total / denominator``.

    ``total`` is the float64 sum of the returned (pre-weighted) updates; the average is taken
    in float64 and cast to float32, then applied with the round's learning-rate factor. Shared
    by :class:`FedRecStrategy` and the in-process engine (:mod:`simulations.fastsim`).
    """
    delta = {k: (v / denominator).astype(np.float32) for k, v in total.items()}
    optimizer.step_inplace(weights, delta, lr_scale=lr_scale)


class UpdateSum(Protocol):
    """How a round's returned updates are added up: in plaintext (:class:`PlainSum`) or as
    ciphertexts with committee decryption (:class:`server.he.EncryptedSum`)."""

    def announce(self, config: ConfigRecord) -> None:
        """Add what clients must know (e.g. the key fingerprint) to the train config."""

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start a round's sum; ``global_arrays`` is the model the clients received."""

    def add(self, msg: Message) -> str | None:
        """Add one reply's update; ``None`` when added, else why it was left out."""

    def total(self) -> dict[str, np.ndarray] | None:
        """The float64 sum of what was added, or ``None`` when it cannot be released."""

    def why_not(self) -> str:
        """Why :meth:`total` returned ``None``."""

    def timings(self) -> dict[str, float]:
        """Seconds the server side of the sum took this round, by name."""

    def cosignatures(self) -> list[dict[str, object]]:
        """Co-signatures of the round's released sum for its ledger line (encrypted runs)."""


class PlainSum:
    """Adds plaintext updates (``arrays`` record) in float64 after checking names and shapes."""

    def __init__(self) -> None:
        self._expected: dict[str, tuple[int, ...]] = {}
        self._total: dict[str, np.ndarray] | None = None

    def announce(self, config: ConfigRecord) -> None:
        """Nothing to announce."""

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Forget the last round's sum."""
        self._expected = {k: v.shape for k, v in global_arrays.items()}
        self._total = None

    def add(self, msg: Message) -> str | None:
        """Check the reply's arrays (names, shapes, finite) and add them."""
        record = msg.content.array_records.get(ARRAYS_RECORD)
        if record is None:
            return "reply has no arrays"
        update = to_numpy(record)
        if set(update) != set(self._expected):
            return "wrong array names"
        for k, v in update.items():
            if v.shape != self._expected[k]:
                return f"array {k} has shape {v.shape}, expected {self._expected[k]}"
            if not np.all(np.isfinite(v)):
                return f"array {k} is not finite"
        if self._total is None:
            self._total = {k: v.astype(np.float64, copy=True) for k, v in update.items()}
        else:
            for k, v in update.items():
                self._total[k] += v
        return None

    def total(self) -> dict[str, np.ndarray] | None:
        """The sum (``None`` only when nothing was added)."""
        return self._total

    def why_not(self) -> str:
        """Only an empty round has no sum."""
        return "no update was added"

    def timings(self) -> dict[str, float]:
        """Plain sums are not timed separately."""
        return {}

    def cosignatures(self) -> list[dict[str, object]]:
        """No committee: nothing is co-signed."""
        return []


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` as numpy arrays, by name."""
    return {key: arr.numpy() for key, arr in record.items()}

"""The versioned wire format of encrypted updates and sums, and its Flower ``ConfigRecord`` form.

An encrypted update is a header plus a list of chunks, each chunk one SEAL ciphertext of up to
``n`` values of the flattened model delta (two per complex slot)::

    header: version, kind ("update" | "sum"), key fingerprint, parameter-set name,
            layout (the tensors' names, shapes and dtypes, in order), total values, chunk count
            (+ n_updates for a sum)
    chunks: list[bytes]

In a Flower message it travels as one ``ConfigRecord`` (:func:`to_record`) whose values are
``int``, ``str`` and ``list[bytes]``. Everything read from a record is checked here, and anything
malformed raises :class:`CiphertextRejectedError` with a :class:`RejectReason`, never another error.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord

from common.errors import FedrecError
from common.he.params import HEParams
from common.protocol import DECRYPT_MESSAGE_TYPE as DECRYPT_MESSAGE_TYPE  # common.he exports it
from common.protocol import HE_FINGERPRINT, HE_RECORD, HE_SUM_RECORD

__all__ = [
    "FORMAT_VERSION",
    "CiphertextRejectedError",
    "EncryptedSum",
    "EncryptedUpdate",
    "Layout",
    "PayloadKind",
    "RejectReason",
    "TensorSpec",
    "UpdateHeader",
    "check_header",
    "from_record",
    "layout_of",
    "sum_from_record",
    "to_record",
]

FORMAT_VERSION = 1
"""Bump when the header or chunk encoding changes; older and newer versions are rejected."""

_T = TypeVar("_T")

_FLOAT_DTYPES = ("float16", "float32", "float64")
_MAX_TOTAL_VALUES = 1 << 31
"""A layout larger than this (2 G values, 32 GB of ciphertext) is rejected as malformed."""


class RejectReason(enum.StrEnum):
    """Why a ciphertext payload was refused (logged by the server, one per dropped client)."""

    MALFORMED = "malformed"
    """The record or header is missing a field or has the wrong types."""
    VERSION = "version"
    """Another wire-format version."""
    KIND = "kind"
    """An update where a sum was expected, or the reverse."""
    FINGERPRINT = "fingerprint"
    """Encrypted under another key pair."""
    PARAMS = "params"
    """Another CKKS parameter set."""
    LAYOUT = "layout"
    """Tensor names, shapes, dtypes or the total value count differ from the model's."""
    CHUNK_COUNT = "chunk-count"
    """The number of chunks does not match the values and the values per ciphertext."""
    OVERSIZED = "oversized"
    """A chunk is larger than any ciphertext of the parameter set can be."""
    CIPHERTEXT = "ciphertext"
    """A chunk does not deserialize to a fresh ciphertext of the expected level and scale."""
    OVERFLOW = "overflow"
    """The decrypted sum left the range the parameter set represents (an update was too large)."""


class CiphertextRejectedError(FedrecError):
    """An encrypted payload failed a check; ``reason`` says which, ``str(err)`` says how."""

    def __init__(self, reason: RejectReason, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"ciphertext rejected ({reason.value}): {detail}")


class PayloadKind(enum.StrEnum):
    """What a payload holds."""

    UPDATE = "update"
    """One client's encrypted update (seeded ciphertexts)."""
    SUM = "sum"
    """The server's homomorphic sum of several updates (full ciphertexts)."""


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the flattened update."""

    name: str
    """Key of the tensor in the update dict (e.g. a ``state_dict`` key)."""
    shape: tuple[int, ...]
    """Its shape."""
    dtype: str
    """Its NumPy float dtype name (``float32``...), restored on decryption."""

    @property
    def size(self) -> int:
        """Number of values."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """How the update's tensors are laid end to end in the ciphertexts, in order."""

    tensors: tuple[TensorSpec, ...]
    """The tensors, in the order their values are concatenated."""

    @property
    def total(self) -> int:
        """Total number of values."""
        return sum(t.size for t in self.tensors)

    def to_json(self) -> str:
        """Compact JSON: ``[[name, [dims...], dtype], ...]``."""
        return json.dumps(
            [[t.name, list(t.shape), t.dtype] for t in self.tensors], separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        """Parse :meth:`to_json`; raises :class:`CiphertextRejectedError` (``MALFORMED``) if bad."""
        try:
            raw = json.loads(text)
        except ValueError as err:
            raise CiphertextRejectedError(
                RejectReason.MALFORMED, f"layout is not JSON ({err})"
            ) from None
        if not isinstance(raw, list) or not raw:
            raise CiphertextRejectedError(RejectReason.MALFORMED, "layout must be a non-empty list")
        tensors = []
        for item in raw:
            ok = (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in item[1])
                and item[2] in _FLOAT_DTYPES
            )
            if not ok:
                raise CiphertextRejectedError(
                    RejectReason.MALFORMED,
                    f"layout entry {str(item)[:80]} is not [name, shape, dtype]",
                )
            tensors.append(TensorSpec(name=item[0], shape=tuple(item[1]), dtype=item[2]))
        layout = cls(tensors=tuple(tensors))
        if len({t.name for t in tensors}) != len(tensors):
            raise CiphertextRejectedError(RejectReason.MALFORMED, "layout repeats a tensor name")
        if not 0 < layout.total <= _MAX_TOTAL_VALUES:
            raise CiphertextRejectedError(
                RejectReason.MALFORMED, f"layout holds {layout.total} values, out of range"
            )
        return layout


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout of a dict of float arrays, in the dict's order.

    Raises ``ValueError`` naming ``arrays`` when it is empty, holds no values or a non-float array.
    """
    if not arrays:
        raise ValueError("arrays must hold at least one tensor")
    specs = []
    for name, array in arrays.items():
        dtype = np.asarray(array).dtype
        if dtype.name not in _FLOAT_DTYPES:
            raise ValueError(f"arrays[{name!r}] must be float16/32/64, got {dtype}")
        specs.append(TensorSpec(name=name, shape=tuple(np.shape(array)), dtype=dtype.name))
    layout = Layout(tensors=tuple(specs))
    if layout.total == 0:
        raise ValueError("arrays must hold at least one value")
    return layout


@dataclass(frozen=True)
class UpdateHeader:
    """What the server checks before it touches a chunk."""

    version: int
    """:data:`FORMAT_VERSION` of the writer."""
    kind: PayloadKind
    """Update or sum."""
    fingerprint: str
    """Key fingerprint (``fedrec keys init``) the chunks are encrypted under."""
    params_name: str
    """Name of the CKKS parameter set."""
    layout: Layout
    """Tensors laid out in the ciphertexts."""
    total_values: int
    """``layout.total``, repeated so a truncated layout is caught."""
    chunk_count: int
    """``ceil(total_values / n)``."""


@dataclass(frozen=True)
class EncryptedUpdate:
    """One client's encrypted update: header and seeded CKKS ciphertexts."""

    header: UpdateHeader
    """Format, key, parameter set and layout."""
    chunks: tuple[bytes, ...]
    """Serialized seeded SEAL ciphertexts, ``n`` values each (the last padded with zeros)."""

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext on the wire."""
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedSum:
    """The homomorphic sum of ``n_updates`` updates, for the decryption committee."""

    header: UpdateHeader
    """As the updates' header, with kind ``SUM``."""
    chunks: tuple[bytes, ...]
    """Serialized SEAL ciphertexts (not seeded: a sum has no seed)."""
    n_updates: int
    """How many updates were added."""

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext on the wire."""
        return sum(len(c) for c in self.chunks)


def check_header(
    header: UpdateHeader,
    chunks: Sequence[bytes],
    *,
    fingerprint: str,
    params: HEParams,
    layout: Layout,
    kind: PayloadKind,
    max_chunk_bytes: int | None = None,
) -> None:
    """Check a header and its chunks' count and sizes (not their contents) against expectations.

    Order: version, kind, fingerprint, parameter set, layout, total, chunk count, chunk sizes
    (``max_chunk_bytes`` defaults to ``params.max_chunk_bytes``). Raises
    :class:`CiphertextRejectedError` with the reason of the first failed check.
    """
    if header.version != FORMAT_VERSION:
        raise CiphertextRejectedError(
            RejectReason.VERSION,
            f"format version {header.version}, this fedrec reads {FORMAT_VERSION}",
        )
    if header.kind is not kind:
        raise CiphertextRejectedError(
            RejectReason.KIND, f"expected a {kind.value}, got {header.kind}"
        )
    if header.fingerprint != fingerprint:
        raise CiphertextRejectedError(
            RejectReason.FINGERPRINT,
            f"encrypted under key {header.fingerprint[:16]}..., expected {fingerprint[:16]}...",
        )
    if header.params_name != params.name:
        raise CiphertextRejectedError(
            RejectReason.PARAMS, f"parameter set {header.params_name!r}, expected {params.name!r}"
        )
    if header.layout != layout:
        raise CiphertextRejectedError(
            RejectReason.LAYOUT, _layout_difference(header.layout, layout)
        )
    if header.total_values != layout.total:
        raise CiphertextRejectedError(
            RejectReason.LAYOUT,
            f"header says {header.total_values} values, the layout holds {layout.total}",
        )
    expected_chunks = math.ceil(layout.total / params.values_per_chunk)
    if header.chunk_count != expected_chunks or len(chunks) != expected_chunks:
        raise CiphertextRejectedError(
            RejectReason.CHUNK_COUNT,
            f"{len(chunks)} chunks (header: {header.chunk_count}), expected {expected_chunks} "
            f"for {layout.total} values at {params.values_per_chunk} per ciphertext",
        )
    limit = params.max_chunk_bytes if max_chunk_bytes is None else max_chunk_bytes
    for i, chunk in enumerate(chunks):
        if len(chunk) > limit:
            raise CiphertextRejectedError(
                RejectReason.OVERSIZED, f"chunk {i} has {len(chunk)} bytes > {limit}"
            )


def _layout_difference(got: Layout, expected: Layout) -> str:
    for i, (g, e) in enumerate(zip(got.tensors, expected.tensors, strict=False)):
        if g != e:
            return (
                f"tensor {i} is {g.name!r} {list(g.shape)} {g.dtype}, "
                f"expected {e.name!r} {list(e.shape)} {e.dtype}"
            )
    return f"{len(got.tensors)} tensors, expected {len(expected.tensors)}"


def to_record(payload: EncryptedUpdate | EncryptedSum) -> ConfigRecord:
    """Pack an update or a sum into a Flower ``ConfigRecord`` (int, str and list[bytes] values)."""
    h = payload.header
    record = ConfigRecord(
        {
            "version": h.version,
            "kind": h.kind.value,
            "fingerprint": h.fingerprint,
            "params": h.params_name,
            "layout": h.layout.to_json(),
            "total_values": h.total_values,
            "chunk_count": h.chunk_count,
            "chunks": list(payload.chunks),
        }
    )
    if isinstance(payload, EncryptedSum):
        record["n_updates"] = payload.n_updates
    return record


def from_record(record: Mapping[str, object]) -> EncryptedUpdate:
    """Unpack a client's update; raises :class:`CiphertextRejectedError` for anything malformed.

    Only the structure is checked here; :func:`common.he.codec.check_update` checks the contents.
    """
    header, chunks = _unpack(record, PayloadKind.UPDATE)
    return EncryptedUpdate(header=header, chunks=chunks)


def sum_from_record(record: Mapping[str, object]) -> EncryptedSum:
    """Unpack the server's sum; raises :class:`CiphertextRejectedError` for anything malformed."""
    header, chunks = _unpack(record, PayloadKind.SUM)
    n_updates = _field(record, "n_updates", int)
    if n_updates < 1:
        raise CiphertextRejectedError(
            RejectReason.MALFORMED, f"n_updates must be >= 1, got {n_updates}"
        )
    return EncryptedSum(header=header, chunks=chunks, n_updates=n_updates)


def _unpack(
    record: Mapping[str, object], kind: PayloadKind
) -> tuple[UpdateHeader, tuple[bytes, ...]]:
    version = _field(record, "version", int)
    if version != FORMAT_VERSION:
        raise CiphertextRejectedError(
            RejectReason.VERSION, f"format version {version}, this fedrec reads {FORMAT_VERSION}"
        )
    kind_text = _field(record, "kind", str)
    if kind_text != kind.value:
        raise CiphertextRejectedError(
            RejectReason.KIND, f"expected a {kind.value}, got {kind_text!r}"
        )
    chunks = record.get("chunks")
    if not isinstance(chunks, Sequence) or not all(isinstance(c, bytes) for c in chunks):
        raise CiphertextRejectedError(RejectReason.MALFORMED, "'chunks' must be a list of bytes")
    header = UpdateHeader(
        version=version,
        kind=kind,
        fingerprint=_field(record, "fingerprint", str),
        params_name=_field(record, "params", str),
        layout=Layout.from_json(_field(record, "layout", str)),
        total_values=_field(record, "total_values", int),
        chunk_count=_field(record, "chunk_count", int),
    )
    return header, tuple(chunks)


def _field(record: Mapping[str, object], key: str, kind: type[_T]) -> _T:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CiphertextRejectedError(
            RejectReason.MALFORMED, f"{key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


# Names the Flower messages of an encrypted round use: defined once in common.protocol, kept
# here under their common.he names
HE_RECORD_KEY = HE_RECORD
"""Config record of a client's reply that carries its encrypted update."""
HE_SUM_KEY = HE_SUM_RECORD
"""Config record of a committee request that carries the encrypted sum."""
HE_FINGERPRINT_KEY = HE_FINGERPRINT
"""Train-config key announcing the key pair the server expects."""

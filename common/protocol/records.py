"""Typed readers of Flower records: a missing key or a wrong-typed value is a
:class:`ProtocolError` that names the key and the record (:mod:`common.protocol`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from flwr.app import ConfigRecord, MetricRecord

from common.protocol.keys import SECONDS_SUFFIX

__all__ = [
    "ProtocolError",
    "is_number",
    "keys_absent",
    "read_float",
    "read_int",
    "read_optional_float",
    "read_optional_int",
    "read_seconds",
    "read_str",
]

Record: TypeAlias = ConfigRecord | MetricRecord | Mapping[str, object]
"""What the readers accept: a Flower config or metric record (or any string-keyed mapping,
such as a record of ``context.state``)."""


# ------------------------------------------------------------------------------------ errors


class ProtocolError(ValueError):
    """A message breaks the protocol: a key is missing or its value has the wrong type.

    Parameters
    ----------
    problem:
        What is wrong, e.g. ``"is missing"`` or ``"must be a number, got str"``.
    key:
        The offending key, if the problem is about one.
    record:
        The name of the record holding it (``"config"``, ``"metrics"``...), if known.
    """

    def __init__(self, problem: str, *, key: str | None = None, record: str | None = None):
        self.problem = problem
        self.key = key
        self.record = record
        where = []
        if record is not None:
            where.append(f"record {record!r}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


# ----------------------------------------------------------------------------------- readers


def _describe(record: Record, record_name: str | None) -> str:
    if record_name is not None:
        return record_name
    return type(record).__name__


def _get(record: Record, key: str, record_name: str | None) -> object:
    if key not in record:
        raise ProtocolError("is missing", key=key, record=_describe(record, record_name))
    return record[key]


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_float(value: object, key: str, record: Record, record_name: str | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(
            f"must be a number (int or float), got {type(value).__name__}",
            key=key,
            record=_describe(record, record_name),
        )
    return float(value)


def _check_int(value: object, key: str, record: Record, record_name: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(
            f"must be an int, got {type(value).__name__}",
            key=key,
            record=_describe(record, record_name),
        )
    return value


def read_float(record: Record, key: str, *, record_name: str | None = None) -> float:
    """The number under ``key``, as a float (an ``int`` is accepted, a ``bool`` is not).

    Parameters
    ----------
    record:
        A config or metric record.
    key:
        The key to read.
    record_name:
        The record's name in its message (``"config"``...), for the error message; default: its
        type.

    Returns
    -------
    float
        The value.

    Raises
    ------
    ProtocolError
        If ``key`` is missing or its value is not an int or a float.
    """
    return _check_float(_get(record, key, record_name), key, record, record_name)


def read_int(record: Record, key: str, *, record_name: str | None = None) -> int:
    """The integer under ``key`` (a ``float`` or a ``bool`` is rejected).

    Parameters
    ----------
    record:
        A config or metric record.
    key:
        The key to read.
    record_name:
        The record's name in its message, for the error message; default: its type.

    Returns
    -------
    int
        The value.

    Raises
    ------
    ProtocolError
        If ``key`` is missing or its value is not an int.
    """
    return _check_int(_get(record, key, record_name), key, record, record_name)


def read_str(record: Record, key: str, *, record_name: str | None = None) -> str:
    """The string under ``key``.

    Raises
    ------
    ProtocolError
        If ``key`` is missing or its value is not a str.
    """
    value = _get(record, key, record_name)
    if not isinstance(value, str):
        raise ProtocolError(
            f"must be a str, got {type(value).__name__}",
            key=key,
            record=_describe(record, record_name),
        )
    return value


def read_optional_float(
    record: Record, key: str, *, record_name: str | None = None
) -> float | None:
    """Like :func:`read_float`, but ``None`` when ``key`` is missing.

    Raises
    ------
    ProtocolError
        If the value is there but not an int or a float.
    """
    if key not in record:
        return None
    return read_float(record, key, record_name=record_name)


def read_optional_int(record: Record, key: str, *, record_name: str | None = None) -> int | None:
    """Like :func:`read_int`, but ``None`` when ``key`` is missing.

    Raises
    ------
    ProtocolError
        If the value is there but not an int.
    """
    if key not in record:
        return None
    return read_int(record, key, record_name=record_name)


def read_seconds(record: Record, *, record_name: str | None = None) -> dict[str, float]:
    """Every ``*-seconds`` entry of a reply's metrics, in record order.

    Raises
    ------
    ProtocolError
        If one of them is not a number.
    """
    return {
        key: read_float(record, key, record_name=record_name)
        for key in record
        if key.endswith(SECONDS_SUFFIX)
    }


def keys_absent(config: Record, keys: tuple[str, ...]) -> bool:
    """True when none of ``keys`` is in ``config`` (the mode is off)."""
    return not any(key in config for key in keys)

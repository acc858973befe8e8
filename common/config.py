"""Configuration: frozen dataclasses parsed once at the edge from TOML and ``--set`` overrides.

A config is a tree of frozen dataclasses. :func:`parse` builds one from a nested mapping (a TOML
document), checking every key and value against the field types; :func:`apply_overrides` applies
``--set dotted.key=value`` strings to such a mapping first. Every mistake is a one-line
:class:`~common.errors.ConfigError` that names the key (and the file and line for TOML syntax).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from common.errors import ConfigError

__all__ = [
    "apply_overrides",
    "load_toml",
    "parse",
    "to_dict",
    "to_toml",
]

T = TypeVar("T")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes ``ConfigError("path:line: ...")``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # Python 3.11 puts the position only in the message: "... (at line 2, column 8)"
        found = re.search(r"\(at line (\d+), column \d+\)$", str(err))
        where = f"{path}:{found.group(1)}" if found else f"{path}"
        msg = str(err)[: found.start()].strip() if found else str(err)
        raise ConfigError(f"{where}: invalid TOML: {msg}") from None


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: Mapping[str, Any], sets: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` of ``sets`` applied.

    Values are read as TOML (``3``, ``0.5``, ``true``, ``[600, 200]``, ``"text"``); anything that
    is not valid TOML is taken as a plain string, so ``--set server.optimizer=fedadam`` works.
    Whether the key exists is checked later by :func:`parse`, against the dataclass.
    """
    out: dict[str, Any] = _deep_copy(raw)
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value.strip())
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def parse(cls: type[T], raw: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from a nested mapping, checking keys and types.

    Parameters
    ----------
    cls:
        A dataclass type whose fields are scalars, enums, tuples, optional values or nested
        dataclasses.
    raw:
        The mapping (e.g. a parsed TOML document). Missing keys take the field default.
    prefix:
        Dotted path of ``raw`` inside the whole config, used in error messages.

    Raises
    ------
    ConfigError
        For an unknown key, a value of the wrong type, or a ``__post_init__`` check that fails.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known here: {known})")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (table), got {value!r}")
        return parse(tp, value, prefix=f"{key}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def to_dict(obj: Any) -> Any:
    """The plain-data (TOML/JSON-able) form of a config dataclass; ``None`` fields are left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is not None:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_toml(obj: Any) -> str:
    """Serialize a config dataclass as TOML (scalars first, then sections)."""
    data = to_dict(obj)
    return tomli_w.dumps(data)

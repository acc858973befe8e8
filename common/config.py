"""Configuration: frozen dataclasses parsed once at the edge from TOML and ``--set`` overrides.

A config is a tree of frozen dataclasses. :func:`parse` builds one from a nested mapping (a TOML
document), checking every key and value against the field types; :func:`apply_overrides` applies
``--set dotted.key=value`` strings to such a mapping first; :func:`load_config` does both for a
file. Every mistake is a one-line :class:`~common.errors.ConfigError` that names the key and
where it came from (``FILE:LINE:`` or ``--set KEY=VALUE:``), and suggests the nearest key for an
unknown one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from common.errors import ConfigError

__all__ = [
    "apply_overrides",
    "load_config",
    "load_toml",
    "locate_error",
    "parse",
    "to_dict",
    "to_toml",
]

T = TypeVar("T")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes ``ConfigError("path:line: ...")``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 BOM (Windows editors) is dropped
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


def load_config(
    cls: type[T],
    path: Path | None,
    sets: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> T:
    """Parse ``cls`` from the TOML file ``path`` (if any) with the ``--set`` overrides ``sets``.

    Parameters
    ----------
    cls:
        The config dataclass.
    path:
        A TOML file, or ``None`` for the defaults.
    sets:
        ``dotted.key=value`` overrides, applied after the file.
    base:
        Values under the file (e.g. from command-line options); the file and ``sets`` win.
    aliases:
        Dotted keys a ``--set`` may use for a field of ``cls`` under another name, e.g.
        ``{"model.dims": "dims"}`` for a flat dataclass; errors name the key as given.

    Raises
    ------
    ConfigError
        One line that says where the bad key came from: ``FILE:LINE: ...`` (the line when the
        key can be found in the file) or ``--set KEY=VALUE: ...``, with the nearest known key
        for an unknown one.
    """
    raw: dict[str, Any] = _deep_copy(base or {})
    if path is not None:
        raw.update(load_toml(path))
    aliases = dict(aliases or {})
    given = {item: _alias(item, aliases) for item in sets}
    merged = apply_overrides(raw, list(given.values()))
    try:
        return parse(cls, merged)
    except ConfigError as err:
        raise _located(err, path, given) from None


def locate_error(err: ConfigError, path: Path | None, sets: Sequence[str] = ()) -> ConfigError:
    """``err`` prefixed with the ``--set`` item or the file (and line) that gave its ``key``, as
    :func:`load_config` does; for a value found wrong after loading (e.g. against the data)."""
    return _located(err, path, {item: item for item in sets})


def _alias(item: str, aliases: Mapping[str, str]) -> str:
    """``--set`` item ``item`` with an aliased key replaced by the field it stands for."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if key in aliases:
        return f"{aliases[key]}{sep}{value}"
    section = key.rpartition(".")[0]
    known = [a for a in aliases if a.rpartition(".")[0] == section] if section else []
    if known:  # model.dimz when model.* are aliases: the real section does not exist
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known here: {', '.join(sorted(known))}"
        raise ConfigError(f"--set {item}: unknown config key '{key}' ({hint})", key=key)
    return item


def _located(err: ConfigError, path: Path | None, given: Mapping[str, str]) -> ConfigError:
    """``err`` prefixed with the ``--set`` item or the file (and line) its key came from."""
    key = err.key
    if key is not None:
        for original, applied in reversed(list(given.items())):
            set_key = applied.partition("=")[0].strip()
            if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")):
                user_key = original.partition("=")[0].strip()
                message = err.message
                if user_key != set_key and message.startswith(set_key):
                    message = user_key + message[len(set_key) :]  # the key as the user wrote it
                return ConfigError(f"--set {original}: {message}", key=key)
    if path is None:
        return err
    line = _key_line(Path(path), key) if key is not None else None
    where = f"{path}:{line}" if line is not None else f"{path}"
    return ConfigError(f"{where}: {err.message}", key=key)


_TABLE = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?$")
_ASSIGN = re.compile(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _key_line(path: Path, key: str) -> int | None:
    """The 1-based line of ``path`` that sets ``key`` (or its section), if a simple scan finds
    it; TOML parsers report lines only for syntax errors."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    target = key.split("[", 1)[0]
    table = ""
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        found = _TABLE.match(text)
        if found:
            table = _dotted(found.group(1))
            if target == table:
                return lineno
            continue
        found = _ASSIGN.match(text)
        if found:
            full = ".".join(p for p in (table, _dotted(found.group(1))) if p)
            if target == full or target.startswith(f"{full}."):
                return lineno
    return None


def _dotted(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


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
        name = unknown[0]
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = (
            f"did you mean '{prefix}{close[0]}'?"
            if close
            else f"known here: {', '.join(sorted(fields))}"
        )
        raise ConfigError(f"unknown config key '{prefix}{name}' ({hint})", key=f"{prefix}{name}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        section = prefix.rstrip(".")
        raise ConfigError(
            f"{section or cls.__name__}: {err}",
            key=_field_named(str(err), fields, prefix) or section or None,
        ) from None


def _field_named(message: str, fields: Mapping[str, Any], prefix: str) -> str | None:
    """The dotted key of the field a ``__post_init__`` message starts with (``"lr must be > 0"``,
    ``"privacy.clip must be ..."``), so that the error points at the line or ``--set`` that set
    it; ``None`` for a message about several fields."""
    first = message.split(" ", 1)[0]
    name = first.rsplit(".", 1)[-1]
    if name in fields and (first == name or first.endswith("." + name)):
        return f"{prefix}{name}"
    return None


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
                errors.append(err)
        if errors:
            raise errors[0]
        raise ConfigError(f"{key}: invalid value {value!r}", key=key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (table), got {value!r}", key=key)
        return parse(tp, value, prefix=f"{key}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        for member in tp:
            if value == member.value or value == member.name:
                return member
        raise ConfigError(f"{key}: {value!r} is not one of {choices}", key=key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        item_tp = args[0] if args else Any
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {value!r}", key=key)
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

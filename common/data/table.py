"""Fast, strict reading of delimited text tables, with errors that name the file and line.

Files are read in blocks of whole lines. Each block is checked for NUL bytes and decoding
errors, then the field count of every line is checked with NumPy on the raw bytes, so a file of
tens of millions of rows is split with one ``str.split`` per block rather than one per line.
Comma-separated blocks that contain a double quote fall back to the :mod:`csv` module.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError

__all__ = [
    "Chunk",
    "concat_ids",
    "iter_chunks",
    "read_first_line",
    "read_lines",
    "to_float",
    "to_ids",
]

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 1 << 25  # 32 MiB of text per block
_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)  # (18,) 10, 100, ..., 1e18
_SEP_NAMES = {"\t": "tab", ",": "comma", "|": "pipe", "::": "'::'", ";": "semicolon"}


def sep_name(sep: str) -> str:
    """Human name of a field separator, for error messages."""
    return _SEP_NAMES.get(sep, repr(sep))


@dataclass
class Chunk:
    """Some data rows of a table: selected columns as token lists, and their line numbers."""

    columns: list[list[str]]
    """One token list per requested column, all of the same length n."""
    lines: np.ndarray
    """``(n,)`` int64 1-based line number of each row."""


def _decode(buf: bytes, path: Path, first_line: int, encoding: str) -> str:
    """Decode one block of whole lines, refusing binary data with the offending line."""
    nul = buf.find(b"\0")
    if nul >= 0:
        line = first_line + buf.count(b"\n", 0, nul)
        raise DataError("binary data (NUL byte): not a text table", path=path, line=line)
    try:
        text = buf.decode(encoding)
    except UnicodeDecodeError as err:
        line = first_line + buf.count(b"\n", 0, err.start)
        bad = buf[err.start]
        raise DataError(
            f"not {encoding} text (byte 0x{bad:02x}); is this a binary file?", path=path, line=line
        ) from None
    if first_line == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r", "") if "\r" in text else text


def _iter_blocks(path: Path, encoding: str) -> Iterator[tuple[int, bytes, str]]:
    """Yield ``(first line number, raw bytes, text)`` for blocks of whole lines."""
    if path.stat().st_size == 0:
        raise DataError("empty file", path=path)
    line = 1
    carry = b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:
                    carry = data
                    continue
                buf, carry = data[: cut + 1], data[cut + 1 :]
            else:
                buf, carry = data, b""
            if buf:
                yield line, buf, _decode(buf, path, line, encoding)
                line += buf.count(b"\n")
            if not block:
                return


def read_first_line(path: Path, *, encoding: str = "utf-8") -> str:
    """The first non-blank line of a text file (without its newline).

    Raises
    ------
    DataError
        If the file is empty, binary, not decodable, or holds only blank lines.
    """
    for _, _, text in _iter_blocks(path, encoding):
        for line in text.split("\n"):
            if line.strip():
                return line
    raise DataError("empty file (only blank lines)", path=path)


def read_lines(path: Path, *, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """All non-blank lines of a (small) text file as ``(line number, line)`` pairs."""
    out: list[tuple[int, str]] = []
    for first, _, text in _iter_blocks(path, encoding):
        out.extend((first + k, line) for k, line in enumerate(text.split("\n")) if line.strip())
    return out


def _field_error(path: Path, line: int, sep: str, n_fields: int, found: int) -> DataError:
    hint = ""
    if found == 1 and sep != ",":
        hint = " (wrong delimiter?)"
    return DataError(
        f"expected {n_fields} {sep_name(sep)}-separated fields, found {found}{hint}",
        path=path,
        line=line,
    )


def iter_chunks(
    path: Path,
    *,
    sep: str,
    n_fields: int,
    usecols: Sequence[int],
    skip_lines: int = 0,
    encoding: str = "utf-8",
    quoting: bool = False,
) -> Iterator[Chunk]:
    """Read a table with exactly ``n_fields`` fields per line, yielding blocks of rows.

    Parameters
    ----------
    path:
        The text file.
    sep:
        Field separator (``"\\t"``, ``","``, ``"|"``, ``"::"``...).
    n_fields:
        Fields every non-blank line must have.
    usecols:
        Indices of the columns to return, in this order.
    skip_lines:
        Leading lines to skip (a header).
    encoding:
        Text encoding; undecodable bytes are an error.
    quoting:
        Honour CSV double quotes in blocks that contain them (for comma-separated files).

    Raises
    ------
    DataError
        Naming the first line with a different number of fields, or binary content.
    """
    sep_byte = ord(sep[0])
    expected_seps = n_fields - 1
    for first, buf, text in _iter_blocks(path, encoding):
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        numbers = np.arange(first, first + len(lines), dtype=np.int64)  # (n,)
        raw = np.frombuffer(buf, dtype=np.uint8)
        ends = np.flatnonzero(raw == 10)  # positions of '\n'
        if ends.size < len(lines):  # last line without a newline
            ends = np.append(ends, raw.size)
        keep = numbers > skip_lines
        for k in np.flatnonzero(np.diff(ends, prepend=-1) <= 3).tolist():  # short lines only
            keep[k] &= bool(lines[k].strip())
        if not keep.any():
            continue
        if quoting and '"' in text:
            yield _quoted_chunk(path, lines, numbers, keep, n_fields, usecols)
            continue
        if len(sep) == 1:
            seps = np.flatnonzero(raw == sep_byte)
            counts = np.diff(np.searchsorted(seps, ends), prepend=0)  # (n,) separators per line
        else:
            counts = np.array([s.count(sep) for s in lines], dtype=np.int64)
        bad = np.flatnonzero(keep & (counts != expected_seps))
        if bad.size:
            k = int(bad[0])
            found = len(lines[k].split(sep))
            raise _field_error(path, int(numbers[k]), sep, n_fields, found)
        if not keep.all():
            lines = [s for s, k in zip(lines, keep.tolist(), strict=True) if k]
            numbers = numbers[keep]
        tokens = sep.join(lines).split(sep)
        yield Chunk([tokens[c::n_fields] for c in usecols], numbers)


def _quoted_chunk(
    path: Path,
    lines: list[str],
    numbers: np.ndarray,
    keep: np.ndarray,
    n_fields: int,
    usecols: Sequence[int],
) -> Chunk:
    """Parse one block with the csv module (fields may be quoted)."""
    kept = [s for s, k in zip(lines, keep.tolist(), strict=True) if k]
    kept_numbers = numbers[keep]
    rows = list(csv.reader(kept))
    for row, n in zip(rows, kept_numbers.tolist(), strict=True):
        if len(row) != n_fields:
            raise _field_error(path, n, ",", n_fields, len(row))
    return Chunk([[row[c] for row in rows] for c in usecols], kept_numbers)


def to_float(tokens: list[str]) -> np.ndarray:
    """``(n,)`` float64 of the tokens; NaN where a token is missing, not a number or infinite."""
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        values = np.array([_float_or_nan(t) for t in tokens], dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def _float_or_nan(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def to_ids(tokens: list[str], lines: np.ndarray, *, path: Path, what: str) -> np.ndarray:
    """Ids as ``(n,)`` int64 when every token is a canonical non-negative integer, else str.

    "Canonical" (no sign, no leading zero, no spaces) keeps distinct strings distinct: ``"07"``
    and ``"7"`` are different ids, so a file holding either stays a str column.

    Raises
    ------
    DataError
        If an id is empty, naming its line.
    """
    ids = _canonical_ints(tokens)
    if ids is not None:
        return ids
    stripped = [t.strip() for t in tokens]
    if stripped != tokens:
        ids = _canonical_ints(stripped)
        if ids is not None:
            return ids
    if "" in stripped:
        raise DataError(f"empty {what} id", path=path, line=int(lines[stripped.index("")]))
    return np.array(stripped, dtype=str)


def _canonical_ints(tokens: list[str]) -> np.ndarray | None:
    """``(n,)`` int64 if every token is a canonical non-negative integer, else None."""
    if not tokens:
        return None
    try:
        ids = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return None
    if ids.min() < 0:
        return None
    # A non-canonical spelling of a number ("07", "+7", " 7") is longer than the canonical one.
    canonical_chars = int((np.searchsorted(_POW10, ids, side="right") + 1).sum())
    return ids if canonical_chars == sum(map(len, tokens)) else None


def concat_ids(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate id blocks; int64 if every block is, else all as str."""
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if all(p.dtype == np.int64 for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p if p.dtype.kind == "U" else p.astype(str) for p in parts])

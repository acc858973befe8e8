"""Fast reading of delimited text tables, with errors that name the file and line.

(Over 400 lines: the typed interaction table and its id handling are one data structure.)

Files are read in blocks of whole lines. Each block is checked for NUL bytes and decoding
errors, then the field count of every line is checked with NumPy on the raw bytes, so a file of
tens of millions of rows is split with one ``str.split`` per block rather than one per line.
Comma-separated blocks that contain a double quote fall back to the :mod:`csv` module. For an
interaction file, lines that do not decode or have another field count are recorded in a
:class:`~common.data.types.BadRowLog` and left out (the policy is in
:mod:`common.data.cleaning`); for side files they are errors.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.types import BadRowLog
from common.errors import DataError

__all__ = [
    "INTEGER_ID_SHARE",
    "Chunk",
    "IdBlock",
    "concat_id_blocks",
    "iter_chunks",
    "natural_order",
    "parse_ids",
    "read_first_line",
    "read_head",
    "read_lines",
    "to_float",
    "type_ids",
]

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 1 << 25  # 32 MiB of text per block
_HEAD_BYTES = 1 << 20  # what read_head looks at
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


def _decode(
    buf: bytes, path: Path, first_line: int, encoding: str, *, lenient: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Decode one block of whole lines, refusing binary data with the offending line.

    Returns the text and, when ``lenient``, the ``(line, byte)`` of each line that does not
    decode (its undecodable bytes become lone surrogates in the text, so that the block still
    has one text line per line); else such a line is an error.
    """
    nul = buf.find(b"\0")
    if nul >= 0:
        line = first_line + buf.count(b"\n", 0, nul)
        raise DataError("binary data (NUL byte): not a text table", path=path, line=line)
    undecodable: list[tuple[int, int]] = []
    try:
        text = buf.decode(encoding)
    except UnicodeDecodeError as err:
        line = first_line + buf.count(b"\n", 0, err.start)
        if not lenient:
            bad = buf[err.start]
            raise DataError(
                f"not {encoding} text (byte 0x{bad:02x}); is this a binary file?",
                path=path,
                line=line,
            ) from None
        text = buf.decode(encoding, errors="surrogateescape")
        undecodable = _undecodable_lines(text, first_line)
    if first_line == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return (text.replace("\r", "") if "\r" in text else text), undecodable


_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecodable_lines(text: str, first_line: int) -> list[tuple[int, int]]:
    """``(line, first bad byte)`` of the lines holding a surrogate-escaped byte."""
    out: list[tuple[int, int]] = []
    line, pos = first_line, 0
    for match in _SURROGATE.finditer(text):
        line += text.count("\n", pos, match.start())
        pos = match.start()
        if not out or out[-1][0] != line:
            out.append((line, ord(match.group()) - 0xDC00))
    return out


def _iter_blocks(
    path: Path, encoding: str, *, lenient: bool = False
) -> Iterator[tuple[int, bytes, str, list[tuple[int, int]]]]:
    """Yield ``(first line number, raw bytes, text, undecodable lines)`` for blocks of whole
    lines (undecodable lines only when ``lenient``, else they are an error)."""
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
                text, undecodable = _decode(buf, path, line, encoding, lenient=lenient)
                yield line, buf, text, undecodable
                line += buf.count(b"\n")
            if not block:
                return


def read_first_line(path: Path, *, encoding: str = "utf-8") -> str:
    """The first non-blank line of a text file (without its newline).

    Raises
    ------
    DataError
        If the file is empty, binary, holds only blank lines, or its first line does not
        decode (later lines may: they are the reader's to drop or refuse).
    """
    for first, _, text, undecodable in _iter_blocks(path, encoding, lenient=True):
        for k, line in enumerate(text.split("\n")):
            if line.strip():
                bad = dict(undecodable).get(first + k)
                if bad is not None:
                    raise DataError(
                        f"not {encoding} text (byte 0x{bad:02x}); is this a binary file?",
                        path=path,
                        line=first + k,
                    )
                return line
    raise DataError("empty file (only blank lines)", path=path)


def read_head(path: Path, n: int, *, encoding: str = "utf-8") -> list[str]:
    """Up to ``n`` non-blank, decodable lines from the first MiB of a text file."""
    with open(path, "rb") as fh:
        data = fh.read(_HEAD_BYTES)
        if len(data) == _HEAD_BYTES and b"\n" in data:
            data = data[: data.rfind(b"\n") + 1]
    text = data.decode(encoding, errors="surrogateescape").replace("\r", "")
    lines = [s for s in text.split("\n") if s.strip() and not _SURROGATE.search(s)]
    return lines[:n]


def read_lines(path: Path, *, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """All non-blank lines of a (small) text file as ``(line number, line)`` pairs."""
    out: list[tuple[int, str]] = []
    for first, _, text, _ in _iter_blocks(path, encoding):
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
    bad: BadRowLog | None = None,
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
        Text encoding.
    quoting:
        Honour CSV double quotes in blocks that contain them (for comma-separated files).
    bad:
        Where to record lines that do not decode (``non_utf8``) or have another number of
        fields (``field_count``): they are left out. Without it, such a line is an error.

    Raises
    ------
    DataError
        Binary content (a NUL byte); without ``bad``, also naming the first line with a
        different number of fields or undecodable bytes.
    """
    sep_byte = ord(sep[0])
    expected_seps = n_fields - 1
    file_index = 0 if bad is None else bad.file(path)
    for first, buf, text, undecodable in _iter_blocks(path, encoding, lenient=bad is not None):
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
        if undecodable and bad is not None:
            undecodable = [(n, b) for n, b in undecodable if keep[n - first]]
            at = np.array([n for n, _ in undecodable], dtype=np.int64)
            if at.size:
                keep[at - first] = False
                bad.add(
                    "non_utf8",
                    at,
                    f"not {encoding} text (byte 0x{undecodable[0][1]:02x})",
                    file_index=file_index,
                )
        if not keep.any():
            continue
        if quoting and '"' in text:
            chunk = _quoted_chunk(path, lines, numbers, keep, n_fields, usecols, bad, file_index)
            if chunk.lines.size:
                yield chunk
            continue
        if len(sep) == 1:
            seps = np.flatnonzero(raw == sep_byte)
            counts = np.diff(np.searchsorted(seps, ends), prepend=0)  # (n,) separators per line
        else:
            counts = np.array([s.count(sep) for s in lines], dtype=np.int64)
        wrong = np.flatnonzero(keep & (counts != expected_seps))
        if wrong.size:
            k = int(wrong[0])
            if bad is None:
                found = len(lines[k].split(sep))
                raise _field_error(path, int(numbers[k]), sep, n_fields, found)
            bad.add(
                "field_count",
                numbers[wrong],
                _field_error(path, 0, sep, n_fields, len(lines[k].split(sep))).message,
                file_index=file_index,
            )
            keep[wrong] = False
            if not keep.any():
                continue
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
    bad: BadRowLog | None,
    file_index: int,
) -> Chunk:
    """Parse one block with the csv module (fields may be quoted)."""
    kept = [s for s, k in zip(lines, keep.tolist(), strict=True) if k]
    kept_numbers = numbers[keep]
    rows = list(csv.reader(kept))
    sizes = np.array([len(row) for row in rows], dtype=np.int64)
    wrong = np.flatnonzero(sizes != n_fields)
    if wrong.size:
        if bad is None:
            k = int(wrong[0])
            raise _field_error(path, int(kept_numbers[k]), ",", n_fields, int(sizes[k]))
        bad.add(
            "field_count",
            kept_numbers[wrong],
            _field_error(path, 0, ",", n_fields, int(sizes[wrong[0]])).message,
            file_index=file_index,
        )
        good = sizes == n_fields
        rows = [row for row, ok in zip(rows, good.tolist(), strict=True) if ok]
        kept_numbers = kept_numbers[good]
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


@dataclass
class IdBlock:
    """The ids of some rows, parsed but not yet typed (see :func:`type_ids`)."""

    values: np.ndarray
    """``(n,)`` int64: the id where it is a canonical integer, else 0."""
    is_int: np.ndarray
    """``(n,)`` bool: the (stripped) token is a canonical non-negative integer within int64."""
    text: np.ndarray | None
    """``(n,)`` str of the stripped tokens; ``None`` when every token is a canonical integer."""

    def __len__(self) -> int:
        return int(self.values.size)

    def token(self, k: int) -> str:
        """The k-th (stripped) token."""
        return str(self.values[k]) if self.text is None else str(self.text[k])

    def take(self, keep: np.ndarray) -> IdBlock:
        """The rows where ``keep`` (``(n,)`` bool) is true."""
        text = None if self.text is None else self.text[keep]
        return IdBlock(self.values[keep], self.is_int[keep], text)


_INT64_MAX = str(np.iinfo(np.int64).max)


def parse_ids(tokens: list[str]) -> IdBlock:
    """Parse id tokens: which are canonical non-negative integers, and their values.

    "Canonical" (digits only, no sign, no leading zero, at most int64's maximum) keeps distinct
    strings distinct: ``"07"`` and ``"7"`` are different ids, and ``"7"`` only is an integer.
    Tokens are stripped of surrounding whitespace first.
    """
    ids = _canonical_ints(tokens)
    if ids is not None:
        return IdBlock(ids, np.ones(ids.size, dtype=bool), None)
    text = np.strings.strip(np.array(tokens, dtype=str))  # (n,)
    length = np.strings.str_len(text)
    digits = np.strings.isdigit(text) & (length <= len(_INT64_MAX))
    digits &= ~((length == len(_INT64_MAX)) & (text > _INT64_MAX))
    values = np.zeros(text.size, dtype=np.int64)
    is_int = np.zeros(text.size, dtype=bool)
    if digits.any():
        some = text[digits]
        parsed = some.astype(np.int64)
        # canonical: ASCII digits without a leading zero, which is what str() gives back
        canonical = parsed.astype(str) == some
        values[np.flatnonzero(digits)[canonical]] = parsed[canonical]
        is_int[digits] = canonical
    return IdBlock(values, is_int, None if is_int.all() else text)


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


def concat_id_blocks(blocks: list[IdBlock]) -> IdBlock:
    """One block of several, in order."""
    if not blocks:
        return IdBlock(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), None)
    if len(blocks) == 1:
        return blocks[0]
    text = None
    if any(b.text is not None for b in blocks):
        text = np.concatenate([b.values.astype(str) if b.text is None else b.text for b in blocks])
    return IdBlock(
        np.concatenate([b.values for b in blocks]),
        np.concatenate([b.is_int for b in blocks]),
        text,
    )


INTEGER_ID_SHARE = 0.9
"""An id column of a file whose format does not say (RecBole, plain CSV) is typed integer when
at least this share of its ids are canonical integers."""


def type_ids(block: IdBlock, *, integer: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Type an id column once, for the whole file: ``(ids, bad)``.

    Parameters
    ----------
    block:
        Every id of the column (empty ids already removed).
    integer:
        ``True`` when the format's ids are integers; ``None`` to decide from the column
        (integer when at least :data:`INTEGER_ID_SHARE` of the ids are canonical integers).

    Returns
    -------
    ids:
        ``(n,)`` int64 for an integer column (0 at bad rows), else str.
    bad:
        ``(n,)`` bool: ids that are not canonical integers in an integer column (none in a
        string column).
    """
    n = len(block)
    if integer is None:
        integer = n > 0 and int(block.is_int.sum()) >= INTEGER_ID_SHARE * n
    if integer:
        return block.values, ~block.is_int
    text = block.values.astype(str) if block.text is None else block.text
    return text, np.zeros(n, dtype=bool)


def natural_order(ids: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 order of str ids: canonical integers by value, then the rest as text.

    So integer ids keep their number order whatever other ids a string column holds.
    """
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    parsed = parse_ids(ids.tolist())
    ints = np.flatnonzero(parsed.is_int)
    others = np.flatnonzero(~parsed.is_int)
    ints = ints[np.argsort(parsed.values[ints], kind="stable")]
    others = others[np.argsort(ids[others], kind="stable")]
    return np.concatenate([ints, others]).astype(np.int64)

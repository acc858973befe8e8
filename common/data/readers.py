"""Interaction-file formats: detect which one a path holds and read its rows.

(Over 400 lines: one reader per supported file format, behind one detection function.)

Supported (see docs/design.md, "Data protocol"):

========================  ====================================  ===========================
format                    interaction file                      side files (optional)
========================  ====================================  ===========================
RecBole atomic files      ``<name>.inter`` (typed tab header)   ``<name>.user``, ``.item``
GroupLens ml-100k         ``u.data`` (tab, no header)           ``u.user``, ``u.item``, ``u.genre``
GroupLens ml-1m           ``ratings.dat`` (``::``)              ``users.dat``, ``movies.dat``
GroupLens ml-20m/latest   ``ratings.csv`` (``userId,movieId``)  ``movies.csv``
NCF (He et al. 2017)      ``<name>.train.rating`` and           none
                          ``<name>.test.rating`` (tab, no
                          header)
plain CSV                 ``user,item[,rating][,timestamp]``    ``users.csv``, ``items.csv``
========================  ====================================  ===========================

NCF files (``user item [rating [timestamp]]``, as in NCF's ``pinterest-20``) are implicit
feedback: NCF treats every row as an observed interaction, and Pinterest's rating column is
all ``1``. The reader therefore marks them implicit (no rating column, see
:class:`~common.data.types.RawInteractions`): every row is a positive and ``min_rating`` does not
apply. ``<name>.train.rating`` and ``<name>.test.rating`` are read together as one set of
interactions (NCF's split is not fedrec's protocol; fedrec splits the users itself).
"""

from __future__ import annotations

import csv
import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import sideinfo
from common.data.table import (
    IdBlock,
    concat_id_blocks,
    iter_chunks,
    parse_ids,
    read_first_line,
    read_head,
    sep_name,
    to_float,
    type_ids,
)
from common.data.types import BadRowLog, RawInteractions, SideInfo
from common.errors import DataError

__all__ = ["Format", "Source", "detect_source", "read_rows", "read_source"]

logger = logging.getLogger(__name__)

_USER_NAMES = ("user", "user_id", "userid", "uid", "user id")
_ITEM_NAMES = ("item", "item_id", "itemid", "iid", "movie", "movie_id", "movieid", "item id")
_RATING_NAMES = ("rating", "ratings", "score", "value", "label")
_TIME_NAMES = ("timestamp", "time", "ts", "date", "datetime")
_PLAIN_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_NCF_TRAIN = ".train.rating"
_NCF_TEST = ".test.rating"


class Format(enum.Enum):
    """Layout of an interaction source."""

    RECBOLE = "recbole"
    GROUPLENS_100K = "ml-100k"
    GROUPLENS_1M = "ml-1m"
    MOVIELENS_CSV = "ml-20m"
    NCF = "ncf"
    PLAIN_CSV = "csv"


@dataclass(frozen=True)
class Source:
    """A detected interaction source."""

    format: Format
    interactions: Path
    """The interaction file."""
    name: str
    """Dataset name: the folder's name for fixed file names, else the file's stem."""
    more: tuple[Path, ...] = ()
    """Further interaction files, read after ``interactions`` (NCF's test file)."""

    @property
    def files(self) -> tuple[Path, ...]:
        """All interaction files, in reading order."""
        return (self.interactions, *self.more)


def detect_source(path: Path) -> Source:
    """Work out the format of a file or folder from the names of the files it holds.

    Raises
    ------
    DataError
        If the path does not exist or holds no supported interaction file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", path=path)
    if path.is_dir():
        return _detect_folder(path)
    name, suffix = path.name, path.suffix.lower()
    if suffix == ".inter":
        return Source(Format.RECBOLE, path, path.stem)
    if name == "u.data":
        return Source(Format.GROUPLENS_100K, path, path.resolve().parent.name)
    if name == "ratings.dat":
        return Source(Format.GROUPLENS_1M, path, path.resolve().parent.name)
    if suffix == ".rating":
        return _ncf_source(path)
    if suffix in _PLAIN_SUFFIXES:
        if name == "ratings.csv" and _is_movielens_header(path):
            return Source(Format.MOVIELENS_CSV, path, path.resolve().parent.name)
        return Source(Format.PLAIN_CSV, path, path.stem)
    raise DataError(
        "unsupported file type; expected .inter, u.data, ratings.dat, ratings.csv, .rating or "
        "a .csv/.tsv",
        path=path,
    )


def _detect_folder(folder: Path) -> Source:
    inters = sorted(folder.glob("*.inter"))
    if len(inters) > 1:
        named = folder / f"{folder.name}.inter"
        if not named.exists():
            listed = ", ".join(p.name for p in inters)
            raise DataError(f"several .inter files ({listed}); name one", path=folder)
        inters = [named]
    if inters:
        return Source(Format.RECBOLE, inters[0], inters[0].stem)
    for fixed in ("u.data", "ratings.dat", "ratings.csv", "interactions.csv"):
        if (folder / fixed).is_file():
            source = detect_source(folder / fixed)
            return Source(source.format, source.interactions, folder.name)
    ncf = sorted(folder.glob(f"*{_NCF_TRAIN}"))
    if len(ncf) > 1:
        named = folder / f"{folder.name}{_NCF_TRAIN}"
        if not named.exists():
            listed = ", ".join(p.name for p in ncf)
            raise DataError(f"several {_NCF_TRAIN} files ({listed}); name one", path=folder)
        ncf = [named]
    if ncf:
        return _ncf_source(ncf[0])
    tables = sorted(p for p in folder.iterdir() if p.suffix.lower() in _PLAIN_SUFFIXES)
    tables = [p for p in tables if p.name not in ("users.csv", "items.csv")]
    if len(tables) == 1:
        return Source(Format.PLAIN_CSV, tables[0], folder.name)
    raise DataError(
        "no interaction file found (looked for *.inter, u.data, ratings.dat, ratings.csv, "
        "interactions.csv, *.train.rating or a single .csv)",
        path=folder,
    )


def _ncf_source(path: Path) -> Source:
    """``<name>.train.rating`` (with its ``<name>.test.rating`` if present) or one file."""
    if path.name.endswith(_NCF_TRAIN):
        name = path.name[: -len(_NCF_TRAIN)]
        test = path.with_name(name + _NCF_TEST)
        return Source(Format.NCF, path, name, (test,) if test.is_file() else ())
    return Source(Format.NCF, path, path.name.removesuffix(_NCF_TEST).removesuffix(".rating"))


def _is_movielens_header(path: Path) -> bool:
    header = read_first_line(path).replace(" ", "").lower()
    return header.startswith("userid,movieid")


_INTEGER_IDS = {
    Format.GROUPLENS_100K: True,
    Format.GROUPLENS_1M: True,
    Format.MOVIELENS_CSV: True,
    Format.NCF: True,
    Format.RECBOLE: None,
    Format.PLAIN_CSV: None,
}
"""Whether a format's ids are integers (``None``: decided from each id column)."""


def read_source(source: Source) -> tuple[RawInteractions, SideInfo]:
    """Read the interaction rows and whatever side information sits next to them.

    Bad rows (see :mod:`common.data.cleaning`) found while reading are left out and recorded in
    ``RawInteractions.bad``; the id columns are typed once, over all the source's files.

    Raises
    ------
    DataError
        For a file that cannot be read as its format (missing header column, binary content,
        no data rows).
    """
    readers = {
        Format.RECBOLE: _read_recbole,
        Format.GROUPLENS_100K: _read_grouplens_100k,
        Format.GROUPLENS_1M: _read_grouplens_1m,
        Format.MOVIELENS_CSV: _read_movielens_csv,
        Format.PLAIN_CSV: _read_plain,
    }
    bad = BadRowLog()
    if source.format is Format.NCF:
        tables, side = [_read_ncf(path, bad) for path in source.files], SideInfo()
    else:
        table, side = readers[source.format](source.interactions, bad)
        tables = [table]
    raw = _finish(tables, bad, integer=_INTEGER_IDS[source.format])
    if source.format is Format.NCF:
        _check_ncf_ratings(raw)
    logger.info(
        "read %d rows from %s (%s), %d bad",
        raw.n_rows + bad.total,
        source.interactions,
        source.format.value,
        bad.total,
    )
    return raw, side


@dataclass
class _Table:
    """The rows of one interaction file that passed the line checks, ids not yet typed."""

    path: Path
    users: IdBlock
    items: IdBlock
    ratings: np.ndarray | None
    timestamps: np.ndarray | None
    lines: np.ndarray
    file_index: int


def read_rows(
    path: Path,
    *,
    sep: str,
    n_fields: int,
    user_col: int,
    item_col: int,
    rating_col: int | None,
    time_col: int | None,
    skip_lines: int = 0,
    quoting: bool = False,
    integer_ids: bool | None = None,
) -> RawInteractions:
    """Read interaction rows from a delimited table, vectorized per block of lines.

    Bad rows are left out and recorded in ``RawInteractions.bad``; ``integer_ids`` as in
    :func:`~common.data.table.type_ids`.

    Raises
    ------
    DataError
        On binary content, or when the file has no data rows at all.
    """
    bad = BadRowLog()
    table = _read_table(
        path,
        bad,
        sep=sep,
        n_fields=n_fields,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        time_col=time_col,
        skip_lines=skip_lines,
        quoting=quoting,
    )
    return _finish([table], bad, integer=integer_ids)


def _read_table(
    path: Path,
    bad: BadRowLog,
    *,
    sep: str,
    n_fields: int,
    user_col: int,
    item_col: int,
    rating_col: int | None,
    time_col: int | None,
    skip_lines: int = 0,
    quoting: bool = False,
) -> _Table:
    """One file's rows: lines that do not decode, have another field count or an empty id are
    recorded in ``bad`` and left out."""
    cols = [c for c in (user_col, item_col, rating_col, time_col) if c is not None]
    users: list[IdBlock] = []
    items: list[IdBlock] = []
    ratings: list[np.ndarray] = []
    times: list[np.ndarray] = []
    lines: list[np.ndarray] = []
    index = bad.file(path)
    for chunk in iter_chunks(
        path,
        sep=sep,
        n_fields=n_fields,
        usecols=cols,
        skip_lines=skip_lines,
        quoting=quoting,
        bad=bad,
    ):
        user, item = parse_ids(chunk.columns[0]), parse_ids(chunk.columns[1])
        empty = _empty(user) | _empty(item)
        keep: np.ndarray | None = None
        if empty.any():
            at = np.flatnonzero(empty)
            message = f"empty {'user' if _empty(user)[at[0]] else 'item'} id"
            bad.add("empty_id", chunk.lines[at], message, file_index=index)
            keep = ~empty
            user, item = user.take(keep), item.take(keep)
        users.append(user)
        items.append(item)
        lines.append(chunk.lines if keep is None else chunk.lines[keep])
        k = 2
        for col, out in ((rating_col, ratings), (time_col, times)):
            if col is not None:
                values = to_float(chunk.columns[k])
                out.append(values if keep is None else values[keep])
                k += 1
    return _Table(
        path=path,
        users=concat_id_blocks(users),
        items=concat_id_blocks(items),
        ratings=None if rating_col is None else _concat(ratings),
        timestamps=None if time_col is None else _concat(times),
        lines=_concat(lines, np.int64),
        file_index=index,
    )


def _empty(block: IdBlock) -> np.ndarray:
    """``(n,)`` bool: the empty ids of a block."""
    if block.text is None:
        return np.zeros(len(block), dtype=bool)
    return ~block.is_int & (block.text == "")


def _finish(tables: list[_Table], bad: BadRowLog, *, integer: bool | None) -> RawInteractions:
    """The rows of a source's files as one set: ids typed once, bad ids left out."""
    first = tables[0]
    if sum(len(t.users) for t in tables) == 0 and bad.total == 0:
        raise DataError("no data rows", path=first.path)
    ratings = [t.ratings for t in tables if t.ratings is not None]
    times = [t.timestamps for t in tables if t.timestamps is not None]
    user_block = concat_id_blocks([t.users for t in tables])
    item_block = concat_id_blocks([t.items for t in tables])
    users, bad_user = type_ids(user_block, integer=integer)
    items, bad_item = type_ids(item_block, integer=integer)
    lines = np.concatenate([t.lines for t in tables])
    file_index = np.concatenate([np.full(t.lines.size, t.file_index) for t in tables])
    raw = RawInteractions(
        path=first.path,
        users=users,
        items=items,
        ratings=np.concatenate(ratings) if len(ratings) == len(tables) else None,
        timestamps=np.concatenate(times) if len(times) == len(tables) else None,
        lines=lines,
        file_index=file_index if len(tables) > 1 else None,
        bad=bad,
    )
    wrong = bad_user | bad_item
    if wrong.any():
        at = np.flatnonzero(wrong)

        def describe(k: int) -> str:
            row = int(at[k])
            what, block = ("user", user_block) if bad_user[row] else ("item", item_block)
            return f"bad {what} id {block.token(row)!r} (ids here are integers >= 0, below 2**63)"

        bad.add("bad_id", lines[at], describe, file_index=file_index[at])
        raw = _take(raw, ~wrong)
    return raw


def _take(raw: RawInteractions, keep: np.ndarray) -> RawInteractions:
    """The rows of ``raw`` where ``keep`` is true."""
    return RawInteractions(
        path=raw.path,
        users=raw.users[keep],
        items=raw.items[keep],
        ratings=None if raw.ratings is None else raw.ratings[keep],
        timestamps=None if raw.timestamps is None else raw.timestamps[keep],
        lines=None if raw.lines is None else raw.lines[keep],
        file_index=None if raw.file_index is None else raw.file_index[keep],
        bad=raw.bad,
        implicit=raw.implicit,
    )


def _concat(parts: list[np.ndarray], dtype: type = np.float64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _field_count(path: Path, sep: str, *, quoting: bool = False) -> int:
    """The most common number of fields among the first lines (the first line's on a tie)."""
    counts: dict[int, int] = {}
    for line in read_head(path, 1000):
        n = len(next(csv.reader([line]))) if quoting and '"' in line else len(line.split(sep))
        counts[n] = counts.get(n, 0) + 1
    return max(counts, key=lambda n: counts[n]) if counts else 1


def _find(names: list[str], wanted: tuple[str, ...]) -> int | None:
    for i, name in enumerate(names):
        if name in wanted:
            return i
    return None


def _read_recbole(path: Path, bad: BadRowLog) -> tuple[_Table, SideInfo]:
    header = read_first_line(path)
    fields = header.split("\t")
    if len(fields) == 1:
        guess = max(len(header.split(d)) for d in (",", ";", "|", " "))
        raise DataError(
            f"expected {guess} tab-separated fields, found 1 (wrong delimiter?)", path=path, line=1
        )
    names = [f.split(":")[0].strip().lower() for f in fields]
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DataError(
                f"missing column '{required}:token' in the typed header "
                f"(found {', '.join(fields)})",
                path=path,
                line=1,
            )
    raw = _read_table(
        path,
        bad,
        sep="\t",
        n_fields=len(fields),
        user_col=names.index("user_id"),
        item_col=names.index("item_id"),
        rating_col=_find(names, ("rating",)),
        time_col=_find(names, ("timestamp",)),
        skip_lines=1,
    )
    return raw, sideinfo.read_recbole(path.with_suffix(".user"), path.with_suffix(".item"))


def _read_grouplens_100k(path: Path, bad: BadRowLog) -> tuple[_Table, SideInfo]:
    raw = _read_table(
        path, bad, sep="\t", n_fields=4, user_col=0, item_col=1, rating_col=2, time_col=3
    )
    folder = path.parent
    return raw, sideinfo.read_grouplens_100k(
        folder / "u.user", folder / "u.item", folder / "u.genre"
    )


def _read_grouplens_1m(path: Path, bad: BadRowLog) -> tuple[_Table, SideInfo]:
    raw = _read_table(
        path, bad, sep="::", n_fields=4, user_col=0, item_col=1, rating_col=2, time_col=3
    )
    return raw, sideinfo.read_grouplens_1m(path.parent / "users.dat", path.parent / "movies.dat")


def _read_ncf(path: Path, bad: BadRowLog) -> _Table:
    """An NCF ``.rating`` file (its ratings are checked, then ignored: see
    :func:`_check_ncf_ratings`)."""
    n_fields = _field_count(path, "\t")
    if n_fields < 2:
        raise DataError(
            "expected 2 to 4 tab-separated fields (user item [rating [timestamp]]), found 1",
            path=path,
            line=1,
        )
    return _read_table(
        path,
        bad,
        sep="\t",
        n_fields=n_fields,
        user_col=0,
        item_col=1,
        rating_col=2 if n_fields > 2 else None,
        time_col=3 if n_fields > 3 else None,
    )


def _check_ncf_ratings(raw: RawInteractions) -> None:
    """NCF rows are all positives: mark ``raw`` implicit, warning about ratings other than 1."""
    if raw.ratings is None:
        return
    r = raw.ratings
    other = int(np.count_nonzero(np.isfinite(r) & (r >= 0) & (r != 1.0)))
    if other:
        logger.warning(
            "%s: %d rows have a rating other than 1; NCF rows are all positives, so the "
            "ratings are ignored (convert the file to CSV to binarize by rating)",
            raw.path,
            other,
        )
    raw.implicit = True


def _read_movielens_csv(path: Path, bad: BadRowLog) -> tuple[_Table, SideInfo]:
    names = [f.strip().lower() for f in read_first_line(path).split(",")]
    raw = _read_table(
        path,
        bad,
        sep=",",
        n_fields=len(names),
        user_col=names.index("userid"),
        item_col=names.index("movieid"),
        rating_col=_find(names, ("rating",)),
        time_col=_find(names, ("timestamp",)),
        skip_lines=1,
        quoting=True,
    )
    return raw, sideinfo.read_plain(None, path.parent / "movies.csv")


def _read_plain(path: Path, bad: BadRowLog) -> tuple[_Table, SideInfo]:
    first = read_first_line(path)
    sep = _PLAIN_SUFFIXES.get(path.suffix.lower(), ",")
    if sep == "," and "," not in first:
        sep = next((d for d in ("\t", ";") if d in first), sep)
    fields = [f.strip().strip('"') for f in first.split(sep)]
    if len(fields) < 2:
        raise DataError(
            f"expected at least 2 {sep_name(sep)}-separated fields (user,item), found 1",
            path=path,
            line=1,
        )
    names = [f.lower() for f in fields]
    has_header = _looks_like_header(names)
    if has_header:
        user_col = _find_like(names, _USER_NAMES, "user")
        item_col = _find_like(names, _ITEM_NAMES, "item", "movie")
        for col, what in ((user_col, "user"), (item_col, "item")):
            if col is None:
                raise DataError(
                    f"missing column '{what}' in the header (found {', '.join(fields)})",
                    path=path,
                    line=1,
                )
        rating_col = _find_like(names, _RATING_NAMES, "rating")
        time_col = _find_like(names, _TIME_NAMES, "time")
        n_fields = len(fields)
    else:  # no header: the field count of most lines (the first line may be a bad row)
        n_fields = max(2, _field_count(path, sep, quoting=sep == ","))
        user_col, item_col = 0, 1
        rating_col = 2 if n_fields > 2 else None
        time_col = 3 if n_fields > 3 else None
    assert user_col is not None and item_col is not None
    raw = _read_table(
        path,
        bad,
        sep=sep,
        n_fields=n_fields,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        time_col=time_col,
        skip_lines=1 if has_header else 0,
        quoting=sep == ",",
    )
    return raw, sideinfo.read_plain(path.parent / "users.csv", path.parent / "items.csv")


def _looks_like_header(names: list[str]) -> bool:
    """A first row is a header if it names a column or its rating field is not a number."""
    if any(n in _USER_NAMES + _ITEM_NAMES or "user" in n or "item" in n for n in names):
        return True
    if len(names) > 2:
        return bool(np.isnan(to_float([names[2]])[0]))
    return False


def _find_like(names: list[str], exact: tuple[str, ...], *parts: str) -> int | None:
    found = _find(names, exact)
    if found is not None:
        return found
    return next((i for i, n in enumerate(names) if any(p in n for p in parts)), None)

"""Interaction-file formats: detect which one a path holds and read its rows.

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

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import sideinfo
from common.data.table import (
    concat_ids,
    iter_chunks,
    read_first_line,
    sep_name,
    to_float,
    to_ids,
)
from common.data.types import RawInteractions, SideInfo
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


def read_source(source: Source) -> tuple[RawInteractions, SideInfo]:
    """Read the interaction rows and whatever side information sits next to them."""
    readers = {
        Format.RECBOLE: _read_recbole,
        Format.GROUPLENS_100K: _read_grouplens_100k,
        Format.GROUPLENS_1M: _read_grouplens_1m,
        Format.MOVIELENS_CSV: _read_movielens_csv,
        Format.PLAIN_CSV: _read_plain,
    }
    if source.format is Format.NCF:
        raw, side = _concat_raw([_read_ncf(path) for path in source.files]), SideInfo()
    else:
        raw, side = readers[source.format](source.interactions)
    logger.info("read %d rows from %s (%s)", raw.n_rows, source.interactions, source.format.value)
    return raw, side


def _concat_raw(parts: list[RawInteractions]) -> RawInteractions:
    """Rows of several files of one format, in order (the first file names the whole)."""
    if len(parts) == 1:
        return parts[0]
    ratings = [p.ratings for p in parts if p.ratings is not None]
    times = [p.timestamps for p in parts if p.timestamps is not None]
    return RawInteractions(
        path=parts[0].path,
        users=concat_ids([p.users for p in parts]),
        items=concat_ids([p.items for p in parts]),
        ratings=_concat(ratings) if len(ratings) == len(parts) else None,
        timestamps=_concat(times) if len(times) == len(parts) else None,
    )


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
) -> RawInteractions:
    """Read interaction rows from a delimited table, vectorized per block of lines.

    Raises
    ------
    DataError
        On a malformed line (named), binary content, or when there are no data rows.
    """
    cols = [c for c in (user_col, item_col, rating_col, time_col) if c is not None]
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    ratings: list[np.ndarray] = []
    times: list[np.ndarray] = []
    for chunk in iter_chunks(
        path, sep=sep, n_fields=n_fields, usecols=cols, skip_lines=skip_lines, quoting=quoting
    ):
        users.append(to_ids(chunk.columns[0], chunk.lines, path=path, what="user"))
        items.append(to_ids(chunk.columns[1], chunk.lines, path=path, what="item"))
        k = 2
        if rating_col is not None:
            ratings.append(to_float(chunk.columns[k]))
            k += 1
        if time_col is not None:
            times.append(to_float(chunk.columns[k]))
    raw = RawInteractions(
        path=path,
        users=concat_ids(users),
        items=concat_ids(items),
        ratings=None if rating_col is None else _concat(ratings),
        timestamps=None if time_col is None else _concat(times),
    )
    if raw.n_rows == 0:
        raise DataError("no data rows", path=path)
    return raw


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def _find(names: list[str], wanted: tuple[str, ...]) -> int | None:
    for i, name in enumerate(names):
        if name in wanted:
            return i
    return None


def _read_recbole(path: Path) -> tuple[RawInteractions, SideInfo]:
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
    raw = read_rows(
        path,
        sep="\t",
        n_fields=len(fields),
        user_col=names.index("user_id"),
        item_col=names.index("item_id"),
        rating_col=_find(names, ("rating",)),
        time_col=_find(names, ("timestamp",)),
        skip_lines=1,
    )
    return raw, sideinfo.read_recbole(path.with_suffix(".user"), path.with_suffix(".item"))


def _read_grouplens_100k(path: Path) -> tuple[RawInteractions, SideInfo]:
    raw = read_rows(path, sep="\t", n_fields=4, user_col=0, item_col=1, rating_col=2, time_col=3)
    folder = path.parent
    return raw, sideinfo.read_grouplens_100k(
        folder / "u.user", folder / "u.item", folder / "u.genre"
    )


def _read_grouplens_1m(path: Path) -> tuple[RawInteractions, SideInfo]:
    raw = read_rows(path, sep="::", n_fields=4, user_col=0, item_col=1, rating_col=2, time_col=3)
    return raw, sideinfo.read_grouplens_1m(path.parent / "users.dat", path.parent / "movies.dat")


def _read_ncf(path: Path) -> RawInteractions:
    """An NCF ``.rating`` file: every row is a positive, so the result has no ratings."""
    n_fields = len(read_first_line(path).split("\t"))
    if n_fields < 2:
        raise DataError(
            "expected 2 to 4 tab-separated fields (user item [rating [timestamp]]), found 1",
            path=path,
            line=1,
        )
    raw = read_rows(
        path,
        sep="\t",
        n_fields=n_fields,
        user_col=0,
        item_col=1,
        rating_col=2 if n_fields > 2 else None,
        time_col=3 if n_fields > 3 else None,
    )
    if raw.ratings is not None:
        other = int(np.count_nonzero(raw.ratings != 1.0))
        if other:
            logger.warning(
                "%s: %d rows have a rating other than 1; NCF rows are all positives, so the "
                "ratings are ignored (convert the file to CSV to binarize by rating)",
                path,
                other,
            )
        raw.ratings = None
    return raw


def _read_movielens_csv(path: Path) -> tuple[RawInteractions, SideInfo]:
    names = [f.strip().lower() for f in read_first_line(path).split(",")]
    raw = read_rows(
        path,
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


def _read_plain(path: Path) -> tuple[RawInteractions, SideInfo]:
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
    else:
        user_col, item_col = 0, 1
        rating_col = 2 if len(fields) > 2 else None
        time_col = 3 if len(fields) > 3 else None
    assert user_col is not None and item_col is not None
    raw = read_rows(
        path,
        sep=sep,
        n_fields=len(fields),
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

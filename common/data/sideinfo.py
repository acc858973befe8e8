"""User attributes and item titles/genres from the side files of each supported format.

Side files are optional: a missing one gives empty side information. A side file that exists
but is malformed is a :class:`~common.errors.DataError` naming its line, like any other input.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from common.data.table import iter_chunks, read_first_line, read_lines
from common.data.types import SideInfo
from common.errors import DataError

__all__ = ["read_grouplens_1m", "read_grouplens_100k", "read_plain", "read_recbole"]

logger = logging.getLogger(__name__)

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
"""The 19 genre flags of GroupLens ``u.item``, in column order (used when ``u.genre`` is absent)."""

_NO_GENRES = "(no genres listed)"


def _table(
    path: Path, *, sep: str, n_fields: int, skip_lines: int = 0, encoding: str = "utf-8"
) -> list[list[str]]:
    """All columns of a small strict table, as token lists."""
    columns: list[list[str]] = [[] for _ in range(n_fields)]
    for chunk in iter_chunks(
        path,
        sep=sep,
        n_fields=n_fields,
        usecols=range(n_fields),
        skip_lines=skip_lines,
        encoding=encoding,
    ):
        for col, tokens in zip(columns, chunk.columns, strict=True):
            col.extend(t.strip() for t in tokens)
    return columns


def read_recbole(user_path: Path, item_path: Path) -> SideInfo:
    """RecBole ``.user`` (``user_id:token`` + attributes), ``.item`` (title, class or genre)."""
    side = SideInfo()
    if user_path.is_file():
        fields = read_first_line(user_path).split("\t")
        names = [f.split(":")[0].strip() for f in fields]
        if "user_id" not in names:
            raise DataError("missing column 'user_id:token'", path=user_path, line=1)
        columns = _table(user_path, sep="\t", n_fields=len(names), skip_lines=1)
        ids = columns[names.index("user_id")]
        for name, values in zip(names, columns, strict=True):
            if name != "user_id":
                side.user_features[name] = dict(zip(ids, values, strict=True))
    if item_path.is_file():
        fields = read_first_line(item_path).split("\t")
        names = [f.split(":")[0].strip() for f in fields]
        if "item_id" not in names:
            raise DataError("missing column 'item_id:token'", path=item_path, line=1)
        columns = _table(item_path, sep="\t", n_fields=len(names), skip_lines=1)
        ids = columns[names.index("item_id")]
        title = next((n for n in ("movie_title", "title", "name") if n in names), None)
        if title is not None:
            side.item_titles = dict(zip(ids, columns[names.index(title)], strict=True))
        genre = next((n for n in ("class", "genre", "genres") if n in names), None)
        if genre is not None:
            values = columns[names.index(genre)]
            side.item_genres = {i: tuple(g.split()) for i, g in zip(ids, values, strict=True)}
    return side


def read_grouplens_100k(user_path: Path, item_path: Path, genre_path: Path) -> SideInfo:
    """GroupLens ``u.user`` (``id|age|gender|occupation|zip``) and latin-1 ``u.item``."""
    side = SideInfo()
    if user_path.is_file():
        ids, age, gender, occupation, zip_code = _table(user_path, sep="|", n_fields=5)
        side.user_features = {
            "age": dict(zip(ids, age, strict=True)),
            "gender": dict(zip(ids, gender, strict=True)),
            "occupation": dict(zip(ids, occupation, strict=True)),
            "zip_code": dict(zip(ids, zip_code, strict=True)),
        }
    if item_path.is_file():
        genres: tuple[str, ...] = ML100K_GENRES
        if genre_path.is_file():
            genres = tuple(
                line.split("|")[0] for _, line in read_lines(genre_path, encoding="latin-1")
            )
        columns = _table(item_path, sep="|", n_fields=5 + len(genres), encoding="latin-1")
        ids = columns[0]
        side.item_titles = dict(zip(ids, columns[1], strict=True))
        flags = columns[5:]
        side.item_genres = {
            item: tuple(g for g, col in zip(genres, flags, strict=True) if col[k] == "1")
            for k, item in enumerate(ids)
        }
    return side


def read_grouplens_1m(user_path: Path, item_path: Path) -> SideInfo:
    """GroupLens ml-1m ``users.dat`` (``id::gender::age::occupation::zip``), ``movies.dat``."""
    side = SideInfo()
    if user_path.is_file():
        ids, gender, age, occupation, zip_code = _table(
            user_path, sep="::", n_fields=5, encoding="latin-1"
        )
        side.user_features = {
            "gender": dict(zip(ids, gender, strict=True)),
            "age": dict(zip(ids, age, strict=True)),
            "occupation": dict(zip(ids, occupation, strict=True)),
            "zip_code": dict(zip(ids, zip_code, strict=True)),
        }
    if item_path.is_file():
        for number, line in read_lines(item_path, encoding="latin-1"):
            # Titles may hold "::"-free colons; the id is first and the genres last.
            item, _, rest = line.partition("::")
            title, sep, genres = rest.rpartition("::")
            if not sep:
                raise DataError(
                    "expected 3 '::'-separated fields (id::title::genres)",
                    path=item_path,
                    line=number,
                )
            side.item_titles[item.strip()] = title.strip()
            side.item_genres[item.strip()] = _split_genres(genres)
    return side


def read_plain(user_path: Path | None, item_path: Path | None) -> SideInfo:
    """CSV side files with a header: users (``user`` + attributes), items (title, genres).

    ``items.csv`` may be written by :func:`common.data.split.export_split`
    (``item_id,title,genres``) or be a MovieLens ``movies.csv`` (``movieId,title,genres``).
    """
    side = SideInfo()
    if user_path is not None and user_path.is_file():
        header, rows = _csv(user_path)
        user = _column(header, user_path, "user", "user_id", "userid")
        for k, name in enumerate(header):
            if k != user:
                side.user_features[name] = {r[user]: r[k] for r in rows}
    if item_path is not None and item_path.is_file():
        header, rows = _csv(item_path)
        item = _column(header, item_path, "item", "item_id", "itemid", "movieid")
        if "title" in header:
            k = header.index("title")
            side.item_titles = {r[item]: r[k] for r in rows}
        if "genres" in header:
            k = header.index("genres")
            side.item_genres = {r[item]: _split_genres(r[k]) for r in rows}
    return side


def _split_genres(value: str) -> tuple[str, ...]:
    value = value.strip()
    if not value or value == _NO_GENRES:
        return ()
    return tuple(g.strip() for g in value.split("|") if g.strip())


def _csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header (lower-cased) and rows of a small quoted CSV, each row the header's length."""
    lines = read_lines(path)
    numbers = [n for n, _ in lines]
    rows = list(csv.reader(line for _, line in lines))
    header = [h.strip().lower() for h in rows[0]]
    for number, row in zip(numbers[1:], rows[1:], strict=True):
        if len(row) != len(header):
            raise DataError(
                f"expected {len(header)} comma-separated fields, found {len(row)}",
                path=path,
                line=number,
            )
    return header, [[v.strip() for v in row] for row in rows[1:]]


def _column(header: list[str], path: Path, *names: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DataError(f"missing column '{names[0]}' in the header", path=path, line=1)

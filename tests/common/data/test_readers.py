"""Every supported format reads into the same Dataset; bad input is one DataError line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import load_dataset
from common.errors import DataError


def write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def rows(users: int = 2, items: int = 5, rating: int = 5, sep: str = ",") -> str:
    """``users`` users who each rate items 1..items."""
    return "".join(
        f"{u}{sep}{i}{sep}{rating}{sep}{100 + i}\n"
        for u in range(1, users + 1)
        for i in range(1, items + 1)
    )


def dense(ds: object) -> np.ndarray:
    return ds.matrix.toarray()  # type: ignore[attr-defined]


def test_recbole_atomic_files_with_side_info(tmp_path: Path) -> None:
    # Prepare
    inter = write(
        tmp_path,
        "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + rows(2, 5, sep="\t")
        + "3\t1\t2\t1\n",
    )
    write(
        tmp_path,
        "toy.user",
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n",
    )
    write(
        tmp_path,
        "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction\n",
    )
    # Execute
    ds = load_dataset(inter)
    # Assert
    assert ds.name == "toy"
    assert ds.user_ids.tolist() == ["1", "2"]
    assert ds.item_ids.tolist() == ["1", "2", "3", "4", "5"]
    assert dense(ds).sum() == 10 and ds.matrix.dtype == np.float32
    assert ds.user_features["gender"].tolist() == ["M", ""]
    assert ds.user_features["occupation"].tolist() == ["technician", ""]
    assert ds.item_titles.tolist()[:3] == ["Toy Story", "GoldenEye", ""]
    assert ds.item_genres[:3] == (("Animation", "Children's", "Comedy"), ("Action",), ())
    assert ds.report.users_dropped == 1 and ds.report.below_threshold_dropped == 1
    assert ds.min_rating == 4.0
    assert load_dataset(tmp_path).matrix.nnz == 10  # the folder works too


def test_grouplens_100k_folder(tmp_path: Path) -> None:
    write(tmp_path, "u.data", rows(2, 5, sep="\t"))
    write(tmp_path, "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy
    write(
        tmp_path,
        "u.item",
        "1|Café (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n",
        encoding="latin-1",
    )
    ds = load_dataset(tmp_path)
    assert ds.name == tmp_path.name
    assert ds.matrix.shape == (2, 5)
    assert ds.user_features["gender"].tolist() == ["M", "F"]
    assert ds.item_titles[0] == "Café (1995)"
    assert ds.item_genres[0] == ("Action", "Comedy")


def test_grouplens_1m_folder(tmp_path: Path) -> None:
    write(tmp_path, "ratings.dat", rows(2, 5, sep="::"))
    write(tmp_path, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    write(
        tmp_path,
        "movies.dat",
        "1::Star Wars: Episode IV (1977)::Action|Sci-Fi\n2::Amélie (2001)::Comedy\n",
        encoding="latin-1",
    )
    ds = load_dataset(tmp_path / "ratings.dat")
    assert ds.matrix.nnz == 10
    assert ds.user_features["age"].tolist() == ["1", "56"]
    assert ds.item_titles[:2].tolist() == ["Star Wars: Episode IV (1977)", "Amélie (2001)"]
    assert ds.item_genres[0] == ("Action", "Sci-Fi")


def test_movielens_csv_with_quoted_titles(tmp_path: Path) -> None:
    write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n" + rows(2, 5))
    write(
        tmp_path,
        "movies.csv",
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Nothing (2003),(no genres listed)\n",
    )
    ds = load_dataset(tmp_path)
    assert ds.matrix.nnz == 10
    assert ds.item_titles[0] == "American President, The (1995)"
    assert ds.item_genres[:2] == (("Comedy", "Drama", "Romance"), ())


@pytest.mark.parametrize("header", ["", "user,item,rating,timestamp\n", "uid,iid,score,ts\n"])
def test_plain_csv_header_optional(tmp_path: Path, header: str) -> None:
    path = write(tmp_path, "mine.csv", header + rows(2, 5) + "1,6,1,9\n")
    ds = load_dataset(path)
    assert ds.name == "mine"
    assert ds.matrix.shape == (2, 5)
    assert ds.report.rows_read == 11 and ds.report.below_threshold_dropped == 1


def test_plain_csv_without_ratings_is_implicit(tmp_path: Path) -> None:
    text = "".join(f"alice,{i}\n" for i in "abcde") + "bob,a\n"
    ds = load_dataset(write(tmp_path, "clicks.csv", text))
    assert ds.min_rating is None
    assert ds.user_ids.tolist() == ["alice"] and ds.item_ids.tolist() == list("abcde")
    assert ds.report.users_dropped == 1 and ds.report.rows_of_dropped_users == 1


def test_plain_tsv_with_side_files_and_spaces(tmp_path: Path) -> None:
    write(tmp_path, "data.tsv", "user\titem\n" + "".join(f"u1\t {i}\n" for i in range(5)))
    write(tmp_path, "users.csv", "user,group\nu1,g3\n")
    write(tmp_path, "items.csv", "item_id,title,genres\n0,Zero,A|B\n")
    ds = load_dataset(tmp_path)
    assert ds.item_ids.tolist() == ["0", "1", "2", "3", "4"]
    assert ds.user_features == {"group": np.array(["g3"])}
    assert ds.item_titles[0] == "Zero" and ds.item_genres[0] == ("A", "B")


def test_ids_sort_numerically_and_keep_leading_zeros(tmp_path: Path) -> None:
    numeric = write(
        tmp_path / "a", "x.csv", "".join(f"{u},{i},5\n" for u in (10, 9) for i in range(5))
    )
    assert load_dataset(numeric).user_ids.tolist() == ["9", "10"]
    padded = write(
        tmp_path / "b", "x.csv", "".join(f"{u},{i},5\n" for u in ("07", "7") for i in range(5))
    )
    # "07" is not an integer, so the column is a string column: integers first, in number order
    assert load_dataset(padded).user_ids.tolist() == ["7", "07"]


def test_blank_lines_and_crlf_are_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", rows(1, 3).replace("\n", "\r\n") + "\n\n" + rows(1, 2))
    assert load_dataset(path, min_user_positives=1).report.rows_read == 5


@pytest.mark.parametrize(
    ("name", "text", "message", "line"),
    [
        ("x.inter", "user_id:token,item_id:token,rating:float,timestamp:float\n1,2,5,1\n",
         "expected 4 tab-separated fields, found 1", 1),
        ("x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t5\n1,2,5\n",
         "expected 3 tab-separated fields, found 1", 3),
        ("x.inter", "user_id:token\trating:float\n1\t5\n", "missing column 'item_id:token'", 1),
        ("u.data", "1\t2\t5\t1\n1 2 5 1\n", "expected 4 tab-separated fields, found 1", 2),
        ("ratings.dat", "1::2::5::1\n1::2::5\n", "expected 4 '::'-separated fields, found 3", 2),
        ("x.csv", "user,item,rating\n1,2,5\n1,2\n", "expected 3 comma-separated fields", 3),
        ("x.csv", "user,rating\n1,5\n", "missing column 'item'", 1),
        ("x.csv", "1;2;5\n", None, None),
        ("x.csv", "user,item\n1,\n", "empty item id", 2),
    ],
)  # fmt: skip
def test_malformed_files_name_file_and_line(
    tmp_path: Path, name: str, text: str, message: str | None, line: int | None
) -> None:
    path = write(tmp_path, name, text)
    if message is None:  # ';' is accepted as a CSV delimiter
        assert load_dataset(path, min_user_positives=1).matrix.nnz == 1
        return
    with pytest.raises(DataError) as caught:
        load_dataset(path, strict=True)
    text_of_error = str(caught.value)
    assert message in text_of_error
    assert text_of_error.startswith(f"{path}:{line}: ")
    assert "\n" not in text_of_error
    if line == 1:  # a bad header is a bad file: refused whether strict or not
        with pytest.raises(DataError, match=message):
            load_dataset(path)
        return
    try:  # a bad data row is dropped and counted
        ds = load_dataset(path, min_user_positives=1)
    except DataError as err:
        assert "no good row" in str(err)
    else:
        assert ds.report.bad_rows_dropped == 1 and ds.matrix.nnz == 1


@pytest.mark.parametrize(
    ("data", "message", "line"),
    [
        (b"", "empty file", None),
        (b"\n\n", "empty file", None),
        (b"user,item,rating\n", "no data rows", None),
        (b"1,2,5\n1,3\x00,5\n", "binary data", 2),
        (b"\x89PNG\xff\xfe,1,5\n1,2,5\n", "not utf-8 text", 1),  # the line that says the format
        (b"1,2,1\n1,3,2\n", "no interactions left after cleaning", None),
    ],
)
def test_unreadable_files(tmp_path: Path, data: bytes, message: str, line: int | None) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(path, min_user_positives=1)
    assert caught.value.line == line and caught.value.path == path


def test_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(write(tmp_path, "x.parquet", "PAR1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no interaction file found"):
        load_dataset(tmp_path / "empty")


def test_ncf_rating_files_are_implicit_and_read_train_then_test(tmp_path: Path) -> None:
    # Prepare: NCF layout, CRLF, a duplicate across the two files
    train = "".join(f"{u}\t{i}\t1\t0\r\n" for u in (0, 1) for i in range(5))
    write(tmp_path / "pins", "pins.train.rating", train)
    write(tmp_path / "pins", "pins.test.rating", "0\t5\t1\t0\r\n1\t4\t1\t0\r\n")
    write(tmp_path / "pins", "pins.test.negative", "(0,5)\t9\t8\r\n")

    # Execute
    ds = load_dataset(tmp_path / "pins", min_rating=4.0)
    one = load_dataset(tmp_path / "pins" / "pins.test.rating", min_user_positives=1)

    # Assert
    assert ds.name == "pins" and ds.min_rating is None
    assert ds.report.rows_read == 12 and ds.report.duplicates_collapsed == 1
    assert dense(ds).sum(axis=1).tolist() == [6, 5]
    assert one.name == "pins" and one.report.rows_read == 2


def test_ncf_ratings_other_than_one_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "ml.train.rating", rows(2, 5, rating=2, sep="\t"))
    with caplog.at_level("WARNING"):
        ds = load_dataset(path)
    assert ds.matrix.nnz == 10 and ds.min_rating is None
    assert "10 rows have a rating other than 1" in caplog.text
    pairs = write(tmp_path, "pairs.rating", "1\t2\n1\t3\n1\t4\n1\t5\n1\t6\n")
    assert load_dataset(pairs).matrix.nnz == 5
    bad = write(tmp_path, "bad.rating", "1 2 1 0\n")
    with pytest.raises(DataError, match="expected 2 to 4 tab-separated fields"):
        load_dataset(bad)

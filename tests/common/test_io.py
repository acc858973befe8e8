"""Atomic writes leave the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.io import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "key"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["key"]


def test_failed_atomic_dir_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "ml-100k"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "part").write_text("half")
        raise RuntimeError("download broke")
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_atomic_dir_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]


def test_sha256_and_json(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    # sha256 of the 14 bytes above, computed independently with hashlib
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "report.html", b"x")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "report.html").st_mode & 0o777) == 0o644

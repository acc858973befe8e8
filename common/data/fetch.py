"""Fetch the embedded default dataset, ML-100K, from the ``recbole==1.2.1`` wheel on PyPI.

The wheel is downloaded with ``pip download --no-deps`` (pip's own configuration decides the
index) and opened as a zip; only ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``
are read, each checked against a pinned SHA-256. RecBole is never installed or imported (it pins
``ray<=2.6.3``). The files land in ``<cache>/ml-100k`` through :func:`common.io.atomic_dir`, so
a failed fetch leaves no partial cache entry; later calls check the hashes and use the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from common.errors import DataError
from common.io import atomic_dir, sha256_file

__all__ = ["ML100K_SHA256", "RECBOLE_REQUIREMENT", "default_cache_dir", "fetch_ml100k"]

logger = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
"""The PyPI distribution that carries the ML-100K atomic files."""

ML100K_SHA256: dict[str, str] = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
"""Expected SHA-256 of each extracted file."""

_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
_PIP_TIMEOUT_S = 600

Downloader = Callable[[Path], Path]
"""Puts the recbole wheel into the given folder and returns its path."""


def default_cache_dir() -> Path:
    """``$FEDREC_DATA`` if set, else ``~/.cache/fedrec``."""
    env = os.environ.get("FEDREC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedrec"


def _pip_download(dest: Path) -> Path:
    """Download the recbole wheel (no dependencies) into ``dest`` with this Python's pip."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        RECBOLE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    logger.info("downloading %s with pip", RECBOLE_REQUIREMENT)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"could not run pip to download {RECBOLE_REQUIREMENT}: {err}") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise DataError(f"pip could not download {RECBOLE_REQUIREMENT}: {last}")
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise DataError(f"pip downloaded no wheel for {RECBOLE_REQUIREMENT}", path=dest)
    return wheels[0]


def _cache_is_valid(folder: Path) -> bool:
    for name, expected in ML100K_SHA256.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            return False
    return True


def _extract(wheel: Path, dest: Path) -> None:
    """Copy the ML-100K members of the wheel into ``dest``, checking each file's SHA-256."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"not a readable wheel (zip): {err}", path=wheel) from None
    with archive:
        for name, expected in ML100K_SHA256.items():
            member = _MEMBER_DIR + name
            try:
                data = archive.read(member)
            except KeyError:
                raise DataError(f"wheel has no member {member}", path=wheel) from None
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise DataError(
                    f"SHA-256 mismatch for {member}: expected {expected}, got {actual}",
                    path=wheel,
                )
            (dest / name).write_bytes(data)


def fetch_ml100k(
    cache_dir: Path | None = None,
    *,
    wheel_path: Path | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Return a folder holding ``ml-100k.inter``, ``.user`` and ``.item``, fetching if needed.

    Parameters
    ----------
    cache_dir:
        Cache root; default :func:`default_cache_dir`. The files go to ``cache_dir/ml-100k``.
    wheel_path:
        Use this local recbole wheel instead of downloading (offline installs, tests).
    downloader:
        Called with a temporary folder to obtain the wheel; default runs
        ``python -m pip download --no-deps recbole==1.2.1``.

    Returns
    -------
    Path
        The ``ml-100k`` folder. A cached folder whose hashes all match is returned without any
        network access; one that does not match is fetched again.

    Raises
    ------
    DataError
        If the download fails or a file's SHA-256 does not match; the cache is left as it was.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "ml-100k"
    if folder.is_dir():
        if _cache_is_valid(folder):
            logger.debug("ml-100k: using cache %s", folder)
            return folder
        logger.warning("ml-100k: cached files in %s fail the SHA-256 check; refetching", folder)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=root) as tmp:
        wheel = wheel_path if wheel_path is not None else (downloader or _pip_download)(Path(tmp))
        with atomic_dir(folder) as staging:
            _extract(Path(wheel), staging)
    logger.info("ml-100k: fetched into %s", folder)
    return folder

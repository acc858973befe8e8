"""Load a dataset by name or path: detect the format, read, clean, attach side information."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import numpy as np

from common.data.cleaning import clean
from common.data.fetch import EMBEDDED_DATASETS, fetch_dataset
from common.data.readers import detect_source, read_source
from common.data.types import Dataset, SideInfo
from common.io import sha256_file

__all__ = ["EMBEDDED", "load_dataset"]

logger = logging.getLogger(__name__)

EMBEDDED: tuple[str, ...] = tuple(EMBEDDED_DATASETS)
"""Dataset names that are fetched rather than read from a path: ml-100k, ml-1m, pinterest-20."""


def load_dataset(
    spec: str | Path,
    *,
    cache_dir: Path | None = None,
    min_rating: float = 4.0,
    min_user_positives: int = 5,
    strict: bool = False,
) -> Dataset:
    """Read and clean an interaction dataset (Liang et al. 2018 preprocessing).

    Parameters
    ----------
    spec:
        A name of :data:`EMBEDDED` (``"ml-100k"``, ``"ml-1m"``, ``"pinterest-20"``: fetched
        into the cache, see :func:`~common.data.fetch.fetch_dataset`), or a path to a file or
        folder in any supported format (see :mod:`common.data.readers`), detected from the file
        names.
    cache_dir:
        Cache root for fetched datasets; default ``$FEDREC_DATA`` or ``~/.cache/fedrec``.
    min_rating:
        Ratings ``>= min_rating`` are positives (default 4.0, on a 1-5 scale). Implicit data
        (files without a rating column, and NCF ``.rating`` files such as ``pinterest-20``,
        whose reader marks every row a positive) ignores it and records ``min_rating=None``.
    min_user_positives:
        Users with fewer positives are dropped (default 5).
    strict:
        Refuse the first bad row instead of dropping bad rows (the policy is in
        :mod:`common.data.cleaning`); what was dropped is in ``Dataset.report`` either way.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        One line naming the file (and line) for any problem with the input: a file that
        cannot be read, no good row, no positive left, or (``strict``) the first bad row.
    ValueError
        If ``min_rating`` is not finite or ``min_user_positives`` < 1.
    """
    start = time.perf_counter()
    if isinstance(spec, str) and spec in EMBEDDED:
        source = dataclasses.replace(detect_source(fetch_dataset(spec, cache_dir)), name=spec)
    else:
        source = detect_source(Path(spec).expanduser())
    raw, side = read_source(source)
    implicit = raw.ratings is None or raw.implicit
    if implicit:
        logger.info("%s: implicit feedback, every row is a positive (no min_rating)", source.name)
    cleaned = clean(
        raw,
        min_rating=None if implicit else min_rating,
        min_user_positives=min_user_positives,
        strict=strict,
    )
    dataset = Dataset(
        name=source.name,
        sha256=_sha256(source.files),
        source=source.interactions,
        user_ids=cleaned.user_ids,
        item_ids=cleaned.item_ids,
        matrix=cleaned.matrix,
        user_features=_user_features(side, cleaned.user_ids),
        item_titles=np.array(
            [side.item_titles.get(i, "") for i in cleaned.item_ids.tolist()], dtype=str
        ),
        item_genres=tuple(side.item_genres.get(i, ()) for i in cleaned.item_ids.tolist()),
        report=cleaned.report,
        min_rating=None if implicit else float(min_rating),
    )
    logger.info(
        "loaded %s: %d users x %d items, %d interactions in %.2f s",
        dataset.name,
        dataset.n_users,
        dataset.n_items,
        dataset.matrix.nnz,
        time.perf_counter() - start,
    )
    return dataset


def _sha256(paths: tuple[Path, ...]) -> str:
    """SHA-256 of one file, or of several files' bytes concatenated in order."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _user_features(side: SideInfo, user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each feature as a ``(U,)`` str array aligned with ``user_ids``; ``''`` when unknown."""
    return {
        name: np.array([values.get(u, "") for u in user_ids.tolist()], dtype=str)
        for name, values in side.user_features.items()
    }

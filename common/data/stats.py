"""Summary statistics of a cleaned dataset, as a JSON-able dict."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.data.types import Dataset

__all__ = ["QUANTILES", "cleaning_record", "count_quantiles", "dataset_stats"]

QUANTILES = (("min", 0.0), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("90%", 0.9),
             ("99%", 0.99), ("max", 1.0))  # fmt: skip
"""Reported quantiles: (label, q)."""


def count_quantiles(counts: np.ndarray) -> dict[str, float]:
    """Quantiles of a count vector (linear interpolation), keyed by :data:`QUANTILES` labels."""
    if counts.size == 0:
        return {label: 0.0 for label, _ in QUANTILES}
    values = np.quantile(counts.astype(np.float64), [q for _, q in QUANTILES])
    return {label: float(v) for (label, _), v in zip(QUANTILES, values, strict=True)}


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """Size, density, per-user and per-item interaction quantiles, and the cleaning report.

    Returns
    -------
    dict
        Keys ``name``, ``sha256``, ``source``, ``min_rating``, ``users``, ``items``,
        ``interactions``, ``density`` (interactions / (users * items)), ``per_user`` and
        ``per_item`` (quantiles of interactions per user / per item), ``cleaning``. Only
        str, int, float and None values: ``json.dumps`` takes it as is.
    """
    n_users, n_items = ds.matrix.shape
    nnz = int(ds.matrix.nnz)
    return {
        "name": ds.name,
        "sha256": ds.sha256,
        "source": str(ds.source),
        "min_rating": ds.min_rating,
        "users": int(n_users),
        "items": int(n_items),
        "interactions": nnz,
        "density": nnz / (n_users * n_items) if n_users and n_items else 0.0,
        "per_user": count_quantiles(np.diff(ds.matrix.indptr)),
        "per_item": count_quantiles(ds.matrix.getnnz(axis=0)),
        "cleaning": ds.report.as_dict(),
    }


def cleaning_record(ds: Dataset) -> dict[str, Any]:
    """The cleaning report of ``ds`` as written into a run folder (``data/cleaning.json``).

    Returns
    -------
    dict
        ``dataset`` (name, sha256, source file name), ``min_rating``, then the fields of
        :meth:`~common.data.types.CleaningReport.as_dict`: ``rows_read``, ``bad_rows_dropped``,
        ``bad_rows`` (per reason ``count`` and ``first`` ``file:line``), and the protocol's own
        drops. JSON-able as is.
    """
    return {
        "dataset": {"name": ds.name, "sha256": ds.sha256, "source": ds.source.name},
        "min_rating": ds.min_rating,
        **ds.report.as_dict(),
    }

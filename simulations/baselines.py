"""Non-neural baselines: EASE (Steck 2019) and item popularity.

Both fit on a training matrix of users x items and score fold-in rows, so they plug into
:func:`common.metrics.evaluate` as ``score_fn=baseline.score``. They are centralised (they see
every user's data) and serve as reference points for the federated Mult-VAE.
"""

from __future__ import annotations

import logging
import math
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse as sp

__all__ = ["EASE", "Popularity"]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Sparse: TypeAlias = sp.spmatrix | sp.sparray


def _check_matrix(name: str, m: Sparse, n_items: int | None = None) -> sp.csr_matrix:
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D sparse matrix, got {m.ndim} dimensions")
    if n_items is not None and m.shape[1] != n_items:
        raise ValueError(f"{name} has {m.shape[1]} items, the model was fitted on {n_items}")
    return sp.csr_matrix(m, dtype=np.float64)


class EASE:
    """Embarrassingly Shallow Autoencoder, Steck 2019 (WWW), closed form of eq. 8.

    ``G = X^T X + lambda I``, ``P = G^{-1}``, ``B_ij = -P_ij / P_jj`` for ``i != j`` and
    ``B_jj = 0``; a user's scores are ``x B``. Memory and time are O(n_items^2) and
    O(n_items^3): fine for ML-100K / ML-1M (1.7k / 3.7k items), ~3 GiB for ML-20M.

    Parameters
    ----------
    lam:
        L2 regularisation ``lambda`` > 0. Steck uses 500 on ML-20M; 500 is also a reasonable
        start for ML-100K-sized data (tune it on the validation users).
    """

    def __init__(self, *, lam: float = 500.0) -> None:
        if not (math.isfinite(lam) and lam > 0.0):
            raise ValueError(f"lam must be finite and > 0, got {lam!r}")
        self.lam = float(lam)
        self.weights: FloatArray | None = None  # (I, I), B of Steck 2019

    def fit(self, train: Sparse) -> EASE:
        """Compute ``B`` from the binary training matrix ``(n_users, n_items)``."""
        X = _check_matrix("train", train)
        n_items = X.shape[1]
        G = np.asarray((X.T @ X).toarray(), dtype=np.float64)  # (I, I) Gram matrix
        G[np.diag_indices(n_items)] += self.lam
        # G is symmetric positive definite (lam > 0): invert through its Cholesky factor.
        P = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G), np.eye(n_items))  # (I, I)
        B = -P / np.diag(P)[None, :]  # (I, I), column j divided by P_jj
        B[np.diag_indices(n_items)] = 0.0
        self.weights = B
        logger.info("EASE fitted: %d users, %d items, lambda=%s", X.shape[0], n_items, self.lam)
        return self

    def score(self, foldin: Sparse) -> FloatArray:
        """Scores ``x B`` for each fold-in row, ``(B, n_items)``."""
        if self.weights is None:
            raise ValueError("EASE.score called before fit")
        X = _check_matrix("foldin", foldin, self.weights.shape[0])
        return np.asarray(X @ self.weights, dtype=np.float64)  # (B, I)

    def state_dict(self) -> dict[str, Any]:
        """``{"lam": float, "weights": (I, I) array}`` for saving (e.g. ``np.savez``)."""
        if self.weights is None:
            raise ValueError("EASE.state_dict called before fit")
        return {"lam": self.lam, "weights": self.weights}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EASE:
        """Rebuild a fitted model from :meth:`state_dict`."""
        weights = np.asarray(state["weights"], dtype=np.float64)
        if weights.ndim != 2 or weights.shape[0] != weights.shape[1]:
            raise ValueError(f"weights must be square, got shape {weights.shape}")
        model = cls(lam=float(state["lam"]))
        model.weights = weights
        return model


class Popularity:
    """Most-popular baseline: every user gets the item training counts as scores."""

    def __init__(self) -> None:
        self.counts: FloatArray | None = None  # (I,)

    def fit(self, train: Sparse) -> Popularity:
        """Count the users who interacted with each item in ``train`` ``(n_users, n_items)``."""
        X = _check_matrix("train", train)
        self.counts = np.asarray((X != 0).sum(axis=0), dtype=np.float64).ravel()  # (I,)
        return self

    def score(self, foldin: Sparse) -> FloatArray:
        """The counts repeated for each fold-in row, ``(B, n_items)`` (a fresh, writable array)."""
        if self.counts is None:
            raise ValueError("Popularity.score called before fit")
        X = _check_matrix("foldin", foldin, self.counts.shape[0])
        return np.tile(self.counts, (X.shape[0], 1))  # (B, I)

    def state_dict(self) -> dict[str, Any]:
        """``{"counts": (I,) array}``."""
        if self.counts is None:
            raise ValueError("Popularity.state_dict called before fit")
        return {"counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Popularity:
        """Rebuild a fitted model from :meth:`state_dict`."""
        counts = np.asarray(state["counts"], dtype=np.float64)
        if counts.ndim != 1:
            raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
        model = cls()
        model.counts = counts
        return model

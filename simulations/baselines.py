"""Non-neural baselines: EASE (Steck 2019) and item popularity.

Both fit on a training matrix of users x items and score fold-in rows, so they plug into
:func:`common.metrics.evaluate` as ``score_fn=baseline.score``. They are centralised (they see
every user's data) and serve as reference points for the federated Mult-VAE.
:func:`baselines_on_split` fits both on a prepared run folder's training rows and scores them on
the run's own held-out test users, the users the federated model is scored on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse as sp

from common.metrics import evaluate
from common.rounds import TEST_METRICS
from common.run.folder import load_eval_data
from simulations.cohort_batch import population_rows

__all__ = [
    "EASE",
    "EASE_LAMBDAS",
    "FittedBaselines",
    "Popularity",
    "baselines_on_split",
    "fit_baselines",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Sparse: TypeAlias = sp.spmatrix | sp.sparray


def _check_matrix(name: str, m: Sparse, n_items: int | None = None) -> sp.csr_matrix:
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D sparse matrix, got {m.ndim} dimensions")
    if n_items is not None and m.shape[1] != n_items:
        raise ValueError(f"{name} has {m.shape[1]} items, the model was fitted on {n_items}")
    return sp.csr_matrix(m, dtype=np.float64)


def _gram(x: sp.csr_matrix) -> FloatArray:
    """``X^T X`` as a dense ``(n_items, n_items)`` array."""
    return np.asarray((x.T @ x).toarray(), dtype=np.float64)


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
        self.fit_gram(_gram(X))
        logger.info("EASE fitted: %d users, %d items, lambda=%s", X.shape[0], X.shape[1], self.lam)
        return self

    def fit_gram(self, gram: FloatArray) -> EASE:
        """Compute ``B`` from the Gram matrix ``X^T X`` ``(n_items, n_items)`` (not modified), so
        one Gram matrix serves several ``lambda``."""
        n_items = gram.shape[0]
        G = gram + self.lam * np.eye(n_items)  # (I, I)
        # G is symmetric positive definite (lam > 0): invert through its Cholesky factor.
        P = scipy.linalg.cho_solve(scipy.linalg.cho_factor(G), np.eye(n_items))  # (I, I)
        B = -P / np.diag(P)[None, :]  # (I, I), column j divided by P_jj
        B[np.diag_indices(n_items)] = 0.0
        self.weights = B
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


EASE_LAMBDAS: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
"""The grid :func:`baselines_on_split` picks EASE's ``lambda`` from, on the validation users."""


def _test_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in TEST_METRICS}


@dataclass(frozen=True)
class FittedBaselines:
    """Popularity and EASE fitted on a run's training rows (:func:`fit_baselines`)."""

    train: sp.csr_matrix
    """``(n_train_users, n_items)``: the rows every client holds, in client order."""
    popularity: Popularity
    ease: EASE
    lam: float
    """EASE's ``lambda``, the best of the grid by validation NDCG@100."""
    validation: dict[str, float]
    """Validation NDCG@100 of EASE by ``lambda`` (``f"{lam:g}"``)."""


def fit_baselines(
    run_dir: Path, *, lambdas: Sequence[float] = EASE_LAMBDAS
) -> FittedBaselines | None:
    """Fit popularity and EASE on a prepared run's training rows (``RUN_DIR/data/clients.npz``).

    EASE's ``lambda`` is the best of ``lambdas`` by NDCG@100 on the run's validation users.
    ``None`` when the folder holds no training rows (a deployment's server keeps only the
    partition's sizes).

    Raises
    ------
    ValueError
        If ``lambdas`` is empty.
    """
    if not lambdas:
        raise ValueError("lambdas must name at least one EASE lambda")
    run_dir = Path(run_dir)
    train = _check_matrix("train", population_rows(run_dir))
    if train.nnz == 0:
        logger.warning("%s: no training rows in the run folder; baselines skipped", run_dir)
        return None
    data = load_eval_data(run_dir)
    gram = _gram(train)
    validation: dict[str, float] = {}
    best: tuple[float, float] | None = None  # (validation NDCG@100, lambda)
    for lam in lambdas:
        model = EASE(lam=lam).fit_gram(gram)
        ndcg = float(
            evaluate(model.score, data.validation_foldin, data.validation_holdout)["ndcg@100"]
        )
        validation[f"{lam:g}"] = ndcg
        if best is None or ndcg > best[0]:
            best = (ndcg, lam)
    assert best is not None
    lam = best[1]
    return FittedBaselines(
        train=train,
        popularity=Popularity().fit(train),
        ease=EASE(lam=lam).fit_gram(gram),
        lam=lam,
        validation=validation,
    )


def baselines_on_split(
    run_dir: Path,
    *,
    lambdas: Sequence[float] = EASE_LAMBDAS,
    fitted: FittedBaselines | None = None,
) -> dict[str, Any] | None:
    """Popularity and EASE on a prepared run's split, scored like the federated model.

    Both fit on the training rows the run's clients hold (:func:`fit_baselines`, unless
    ``fitted`` is given) and are scored with :func:`common.metrics.evaluate` on the run's held-out
    test users (``RUN_DIR/data/eval.npz``), the users the federated model's ``final.test`` is
    scored on.

    Returns
    -------
    dict or None
        ``{"split": {...user and item counts}, "popularity": {"label", "test"},
        "ease": {"label", "lambda", "validation_ndcg@100", "test"}}``, each ``test`` holding
        :data:`common.rounds.TEST_METRICS`; ``None`` when the folder holds no training rows.

    Raises
    ------
    ValueError
        If ``lambdas`` is empty.
    """
    run_dir = Path(run_dir)
    if fitted is None:
        fitted = fit_baselines(run_dir, lambdas=lambdas)
    if fitted is None:
        return None
    data = load_eval_data(run_dir)
    train, lam, validation = fitted.train, fitted.lam, fitted.validation
    pop_test = evaluate(fitted.popularity.score, data.test_foldin, data.test_holdout)
    ease_test = evaluate(fitted.ease.score, data.test_foldin, data.test_holdout)
    logger.info(
        "baselines on the run's test users: popularity NDCG@100 %.4f, EASE (lambda %g) %.4f",
        pop_test["ndcg@100"],
        lam,
        ease_test["ndcg@100"],
    )
    return {
        "split": {
            "train_users": int(train.shape[0]),
            "validation_users": int(data.validation_foldin.shape[0]),
            "test_users": int(data.test_foldin.shape[0]),
            "test_users_scored": int(pop_test["n_users"]),
            "items": int(train.shape[1]),
        },
        "popularity": {"label": "popularity", "test": _test_metrics(pop_test)},
        "ease": {
            "label": f"EASE (λ={lam:g})",
            "lambda": lam,
            "validation_ndcg@100": validation,
            "test": _test_metrics(ease_test),
        },
    }

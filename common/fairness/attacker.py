"""How well a protected attribute can be read from the latent code: an attacker's AUC.

The test of Adv-MultVAE (Ganhor et al., "Unlearning Protected User Attributes in
Recommendations with Adversarial Training", SIGIR 2022): after training, an attacker who sees
held-out users' latent codes ``z = mu`` (:func:`common.training.latent_codes`) and their
attribute trains a classifier on some of them and predicts the others. Its ROC AUC is 0.5 when
the code carries nothing of the attribute, 1 when the attribute can be read off it.

Here the attacker is an L2-regularised logistic regression (multinomial for more than two
classes) on standardised codes, scored by stratified k-fold cross-validation: every user is
predicted by the model fitted on the other folds, and the AUC is computed once over all the
out-of-fold scores (Mann-Whitney U with average ranks for ties; macro one-vs-rest for more than
two classes, Hand and Till 2001 without the pairwise refinement). Numpy and torch only.

:func:`latent_codes` (from :mod:`common.training`, next to ``score_users``) gives the codes.
The same module maps raw attribute values to the adversary head's classes
(:func:`attribute_labels`), with the public vocabularies of
:data:`common.run.config.ADVERSARY_CLASSES`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from common.fairness.groups import age_bucket
from common.run.config import ADVERSARY_CLASSES
from common.training import latent_codes

__all__ = [
    "attacker_auc",
    "attribute_classes",
    "attribute_labels",
    "latent_codes",
    "mann_whitney_auc",
]

logger = logging.getLogger(__name__)


def attribute_classes(attribute: str, values: npt.ArrayLike) -> np.ndarray:
    """The class name of each raw value, ``''`` when unknown or outside the vocabulary.

    Ages are bucketed first (:func:`common.fairness.groups.age_bucket`: ML-100K years and ML-1M
    codes to the seven ML-1M groups); other attributes are taken as given.

    Parameters
    ----------
    attribute:
        A key of :data:`common.run.config.ADVERSARY_CLASSES`.
    values:
        ``(n,)`` str raw values, ``''`` unknown.
    """
    if attribute not in ADVERSARY_CLASSES:
        raise ValueError(f"attribute must be one of {sorted(ADVERSARY_CLASSES)}, got {attribute!r}")
    vocabulary = set(ADVERSARY_CLASSES[attribute])
    raw = [str(v).strip() for v in np.asarray(values, dtype=str).tolist()]
    if attribute == "age":
        raw = [age_bucket(v) for v in raw]
    return np.asarray([v if v in vocabulary else "" for v in raw], dtype=str)


def attribute_labels(attribute: str, values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``(n,)`` int64 indices into ``ADVERSARY_CLASSES[attribute]``, ``-1`` when unknown.

    The adversary head's targets (:func:`common.model.adversary_loss`); see
    :func:`attribute_classes` for how raw values are mapped.
    """
    index = {c: i for i, c in enumerate(ADVERSARY_CLASSES[attribute])} if attribute else {}
    classes = attribute_classes(attribute, values)
    return np.asarray([index.get(c, -1) for c in classes.tolist()], dtype=np.int64)


def mann_whitney_auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """ROC AUC of ``scores`` for the ``positive`` rows, by the Mann-Whitney U statistic.

    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum of the
    positives' ranks among all scores, tied scores sharing their average rank (Mann and Whitney
    1947; Hanley and McNeil 1982): the probability that a random positive scores above a random
    negative, ties counting one half.

    Parameters
    ----------
    scores:
        ``(n,)`` finite floats.
    positive:
        ``(n,)`` bool; needs at least one positive and one negative.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"scores and positive must be (n,) alike, got {s.shape}, {pos.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(pos.sum())
    n_neg = len(s) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s))
    # runs of equal scores share the mean of their 1-based ranks
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _stratified_folds(y: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` fold of each row: each class's rows shuffled and dealt round-robin."""
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        # continue the deal where the previous class stopped: fold sizes stay within one
        fold[rows] = (offset + np.arange(len(rows))) % folds
        offset += len(rows)
    return fold


def _fit_predict(
    z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, n_classes: int, *, l2: float
) -> np.ndarray:
    """Class probabilities ``(n_test, n_classes)`` of a multinomial logistic regression.

    Minimises ``mean CE + l2 / 2 * |W|^2`` (bias not penalised) with L-BFGS on features
    standardised with the training rows' mean and std. Two classes make the same model as a
    binary logistic regression with its weight split over two rows.
    """
    mean = z_train.mean(axis=0)
    std = z_train.std(axis=0)
    std[std < 1e-12] = 1.0  # a constant feature carries nothing: leave it at 0
    a = torch.from_numpy((z_train - mean) / std)  # (n, d) float64
    b = torch.from_numpy((z_test - mean) / std)  # (m, d)
    y = torch.from_numpy(y_train)
    w = torch.zeros(a.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, bias], lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return torch.softmax(b @ w + bias, dim=1).numpy()  # (m, n_classes)


def attacker_auc(
    z: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    folds: int = 5,
    seed: int = 0,
    l2: float = 0.1,
    permutations: int = 0,
) -> dict[str, Any]:
    """Cross-validated AUC of a logistic-regression attacker reading ``labels`` from ``z``.

    Parameters
    ----------
    z:
        ``(n, d)`` latent codes of held-out users (:func:`common.training.latent_codes`).
    labels:
        ``(n,)`` str class of each user, ``''`` unknown (those rows are left out, as are the
        users of a class with fewer than ``folds`` users: a fold's model would never see it).
    folds:
        k of the stratified k-fold cross-validation, >= 2; each class's users are spread
        evenly over the folds.
    seed:
        Seed of the fold assignment.
    l2:
        Weight of the L2 penalty on the standardised features' coefficients, > 0.
    permutations:
        How many times to rerun the attack with the labels shuffled (seeded by ``seed``): the
        AUC's spread at chance for this many users and dimensions, to read the AUC against
        (0, default: not run). With a few hundred users and a 64-dimensional code it is wide:
        a standard deviation of about 0.06 for 200 users.

    Returns
    -------
    dict
        ``{"auc": float, "n": users scored, "classes": [class names, sorted], "counts": [users
        per class], "folds": k}``. ``auc`` is the binary Mann-Whitney AUC of the second class's
        probability for two classes, else the macro mean of the one-vs-rest AUCs. With
        ``permutations``, also ``"chance": {"mean", "std", "p95", "permutations"}`` of the
        shuffled-label AUCs and ``"p_value"``, the share of them (counting the real one) at or
        above ``auc``.

    Raises
    ------
    ValueError
        With fewer than two classes of at least ``folds`` users each.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be finite and > 0, got {l2!r}")
    codes = np.asarray(z, dtype=np.float64)
    names = np.asarray(labels, dtype=str)
    if codes.ndim != 2 or names.shape != (codes.shape[0],):
        raise ValueError(f"z must be (n, d) and labels (n,), got {codes.shape}, {names.shape}")
    if not np.isfinite(codes).all():
        raise ValueError("z must be finite")
    present, counts = np.unique(names[names != ""], return_counts=True)
    rare = present[counts < folds]
    if len(rare):
        logger.info("attacker: leaving out classes with fewer than %d users: %s", folds, rare)
    keep = (names != "") & ~np.isin(names, rare)
    codes, names = codes[keep], names[keep]
    classes, y = np.unique(names, return_inverse=True)
    counts = np.bincount(y, minlength=len(classes))
    if len(classes) < 2:
        raise ValueError(
            f"need at least two classes of at least {folds} labelled users, got {len(classes)}"
        )
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    rng = np.random.default_rng(seed)
    auc = _cross_validated_auc(codes, y, len(classes), folds=folds, l2=l2, rng=rng)
    logger.debug("attacker AUC %.4f on %d users, classes %s", auc, len(y), classes.tolist())
    result: dict[str, Any] = {
        "auc": auc,
        "n": len(y),
        "classes": classes.tolist(),
        "counts": counts.tolist(),
        "folds": folds,
    }
    if permutations:
        null = np.array(
            [
                _cross_validated_auc(
                    codes, rng.permutation(y), len(classes), folds=folds, l2=l2, rng=rng
                )
                for _ in range(permutations)
            ]
        )
        result["chance"] = {
            "mean": float(null.mean()),
            "std": float(null.std()),
            "p95": float(np.quantile(null, 0.95)),
            "permutations": permutations,
        }
        result["p_value"] = float((1 + (null >= auc).sum()) / (1 + permutations))
    return result


def _cross_validated_auc(
    codes: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    folds: int,
    l2: float,
    rng: np.random.Generator,
) -> float:
    """AUC of the out-of-fold probabilities over all rows (binary, or macro one-vs-rest)."""
    fold = _stratified_folds(y, folds, rng)
    proba = np.empty((len(y), n_classes))  # (n, K) out-of-fold probabilities
    for k in range(folds):
        test = fold == k
        proba[test] = _fit_predict(codes[~test], y[~test], codes[test], n_classes, l2=l2)
    if n_classes == 2:
        return mann_whitney_auc(proba[:, 1], y == 1)
    return float(np.mean([mann_whitney_auc(proba[:, c], y == c) for c in range(n_classes)]))

"""What a run's models do per user group and to the catalogue, on the held-out test users.

:func:`fairness_of_run` scores the run's federated model, the popularity and EASE baselines and
the centralized reference (when the run trained one) on the same held-out test users, and for
each gives (:func:`common.fairness.metrics.assess`):

- NDCG@100 and Recall@20 per user group (gender, age bucket, occupation where the data set has
  them, activity quartile always), each with a bootstrap 95% interval, and the largest gap
  between two groups with its own interval;
- the item side: coverage@k, the Gini coefficient of exposure, the average popularity of what is
  recommended and the long-tail share;
- genres, where the data set has them: intra-list diversity and miscalibration (Steck 2018), the
  filter bubble, measured;
- for the Mult-VAE models, an attacker's AUC for recovering each attribute from the latent code
  of held-out users (:func:`common.fairness.attacker.attacker_auc`);
- for the federated model, the re-ranking trade-off curves (calibrated and diversity):
  NDCG@100 against miscalibration and diversity as the re-ranking weight grows.

The result is ``results.json``'s ``fairness`` (written by
:func:`simulations.runner.finish_results`), shown by ``fedrec report fairness RUN`` and the
report's "Fairness" section.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from common.checkpoint import load_checkpoint
from common.fairness.attacker import attacker_auc, latent_codes
from common.fairness.genres import genre_matrix
from common.fairness.groups import (
    GAP_MIN_USERS,
    age_bucket,
    group_order,
    group_table,
    user_groups,
)
from common.fairness.metrics import assess
from common.fairness.rerank import tradeoff_curve
from common.metrics import mask_foldin_inplace, ndcg_at_k
from common.model import ModelConfig, build_model
from common.run.folder import EvalData, load_eval_data
from common.training import score_users
from simulations.baselines import FittedBaselines

__all__ = ["ANCHORS", "RERANK_LAMBDAS", "fairness_of_run", "group_gaps"]

logger = logging.getLogger(__name__)

RERANK_LAMBDAS: dict[str, tuple[float, ...]] = {
    "calibrated": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99),
    "diversity": (1.0, 0.9, 0.8, 0.7, 0.5, 0.3),
}
"""Re-ranking weights of the trade-off curves (the first of each is the plain ranking)."""

ANCHORS = {
    "gender_ndcg@10_gap_ml1m": [0.016, 0.038],
    "gender_ndcg@10_gap_source": "Boratto et al., ECIR 2022: males above females for every model",
    "multvae_coverage@50": 0.117,
    "multvae_coverage@50_source": "Melchiorre et al. 2021",
}
"""Published figures the report shows beside the run's own (not measured here)."""

_MIN_ATTACKER_USERS = 20


def _model_scorer(path: Path) -> tuple[Callable[[sp.csr_matrix], np.ndarray], torch.nn.Module]:
    ckpt = load_checkpoint(path)
    model = build_model(ModelConfig.from_dict(ckpt.model_config))
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    return (lambda x: score_users(model, x)), model


def _scores(score: Callable[[sp.csr_matrix], np.ndarray], foldin: sp.csr_matrix) -> np.ndarray:
    out = np.array(score(foldin), dtype=np.float64)  # (B, I), a writable copy
    mask_foldin_inplace(out, foldin)
    return out


def _attacker(model: torch.nn.Module, data: EvalData, *, seed: int) -> dict[str, Any]:
    """Attacker AUC per attribute from the latent codes of the validation and test users."""
    foldin = sp.vstack([data.validation_foldin, data.test_foldin]).tocsr()
    z = latent_codes(model, foldin)  # (U_va + U_te, d)
    out: dict[str, Any] = {}
    for name, test_values in data.test_attributes.items():
        labels = np.concatenate([data.validation_attributes.get(name, []), test_values])
        if name == "age":
            labels = np.asarray([age_bucket(v) for v in labels.tolist()], dtype=str)
        if (labels != "").sum() < _MIN_ATTACKER_USERS or len(set(labels.tolist()) - {""}) < 2:
            continue
        try:
            out[name] = attacker_auc(z, labels, seed=seed)
        except ValueError as err:  # a class too small for the folds
            logger.info("attacker AUC for %s skipped: %s", name, err)
    return out


def fairness_of_run(
    run_dir: Path,
    *,
    baselines: FittedBaselines | None,
    labels: Mapping[str, str] | None = None,
    adversary: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Fairness, exposure and calibration of every model of a finished run (module docstring).

    Parameters
    ----------
    run_dir:
        A finished run folder: ``data/`` and ``model.pt`` (``reference/model.pt`` when the run
        trained the centralized reference).
    baselines:
        Popularity and EASE fitted on the run's training rows; ``None`` without training rows
        (a deployment), which also leaves out the popularity of what is recommended.
    labels:
        Display names by model key (``federated``, ``popularity``, ``ease``, ``centralized``).
    adversary:
        The run's ``[fairness]`` section when it trained an on-device adversary (recorded
        beside the attacker's AUC); ``None`` or an empty ``adversary`` otherwise.
    n_boot, seed:
        Bootstrap resamples of every interval, and the seed of the resampling and the attacker.

    Returns
    -------
    dict or None
        ``{"test_users", "groups": {attribute: {group: users}}, "models": {key: {"label", ...
        assess(...), "attacker"?}}, "rerank": {kind: curve}, "anchors"}``; ``None`` when the run
        saved no model.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        return None
    data = load_eval_data(run_dir)
    labels = dict(labels or {})
    foldin, heldout = data.test_foldin, data.test_holdout
    n_interactions = np.asarray(foldin.getnnz(axis=1) + heldout.getnnz(axis=1))  # (U_te,)
    groups = user_groups(data.test_attributes, n_interactions)
    has_genres = bool(data.item_genres) and any(data.item_genres)
    genre_mat = genre_matrix(data.item_genres)[0] if has_genres else None
    if baselines is not None:
        item_counts = np.asarray(baselines.train.getnnz(axis=0), dtype=np.float64)  # (I,)
        n_train = int(baselines.train.shape[0])
    else:
        item_counts, n_train = None, 0

    def one(key: str, scores: np.ndarray) -> dict[str, Any]:
        out = assess(
            scores,
            heldout,
            foldin,
            groups=groups,
            item_counts=item_counts,
            n_train_users=n_train,
            genre_mat=genre_mat,
            n_boot=n_boot,
            seed=seed,
        )
        return {"label": labels.get(key, key), **out}

    models: dict[str, Any] = {}
    rerank: dict[str, Any] = {}
    federated, model = _model_scorer(run_dir / "model.pt")
    fed_scores = _scores(federated, foldin)
    models["federated"] = one("federated", fed_scores)
    models["federated"]["attacker"] = _attacker(model, data, seed=seed)
    if genre_mat is not None:
        for kind, lams in RERANK_LAMBDAS.items():
            rerank[kind] = tradeoff_curve(kind, fed_scores, heldout, foldin, genre_mat, lams=lams)
    del fed_scores
    if baselines is not None:
        models["popularity"] = one("popularity", _scores(baselines.popularity.score, foldin))
        models["ease"] = one("ease", _scores(baselines.ease.score, foldin))
    reference = run_dir / "reference" / "model.pt"
    if reference.is_file():
        central, ref_model = _model_scorer(reference)
        models["centralized"] = one("centralized", _scores(central, foldin))
        models["centralized"]["attacker"] = _attacker(ref_model, data, seed=seed)
    group_sizes = {
        name: {g: int((values == g).sum()) for g in group_order(values)}
        for name, values in groups.items()
    }
    return {
        "test_users": int(foldin.shape[0]),
        "groups": group_sizes,
        "models": models,
        "rerank": rerank,
        "adversary": dict(adversary) if adversary and adversary.get("adversary") else None,
        "anchors": ANCHORS,
    }


def group_gaps(
    checkpoint: Path, data: EvalData, *, n_boot: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Test NDCG@100 per user group of one saved model, and the largest gap of each attribute.

    What a sweep point reports (cheaper than :func:`fairness_of_run`: one metric, fewer
    resamples): ``{attribute: {"groups": {group: mean}, "counted", "gap", "high", "low",
    "gap_ci"}}``, the gap taken over the ``counted`` groups (at least
    :data:`~common.fairness.groups.GAP_MIN_USERS` test users).
    """
    score, _ = _model_scorer(checkpoint)
    foldin, heldout = data.test_foldin, data.test_holdout
    ndcg = ndcg_at_k(_scores(score, foldin), heldout, 100)  # (U_te,), NaN without held-out
    n_interactions = np.asarray(foldin.getnnz(axis=1) + heldout.getnnz(axis=1))
    out: dict[str, Any] = {}
    for name, labels in user_groups(data.test_attributes, n_interactions).items():
        table = group_table(ndcg, labels, n_boot=n_boot, seed=seed, gap_min_users=GAP_MIN_USERS)
        gap = table.get("gap")
        if not gap:
            continue
        out[name] = {
            "groups": {g: e["mean"] for g, e in table["groups"].items()},
            "counted": [g for g, e in table["groups"].items() if e["n"] >= GAP_MIN_USERS],
            "gap": gap["value"],
            "high": gap["high"],
            "low": gap["low"],
            "gap_ci": gap["ci"],
        }
    return out

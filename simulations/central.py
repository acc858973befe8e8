"""Centralized training: the reference that federated runs are compared with.

Trains Mult-VAE / Mult-DAE with early stopping on validation NDCG@100, or fits EASE / popularity,
on the strong-generalization split of Liang et al. (2018), and writes ``metrics.json`` and (for
neural models) ``model.pt``.
"""

from __future__ import annotations

import copy
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoint import Checkpoint, model_provenance, save_checkpoint
from common.data import Dataset, Split, load_dataset, split_strong_generalization
from common.data.stats import cleaning_record
from common.io import atomic_write_json
from common.metrics import evaluate
from common.model import ModelConfig, ModelKind, anneal_beta, build_model
from common.seeding import seed_everything
from common.training import score_users, train_epochs
from simulations.baselines import EASE, Popularity

__all__ = ["CentralConfig", "CentralResult", "RecommenderKind", "run_central", "split_columns"]

logger = logging.getLogger(__name__)

REPORTED_METRICS = ("ndcg@100", "recall@20", "recall@50", "coverage@20")


class RecommenderKind(enum.StrEnum):
    """What ``train-central`` trains."""

    MULTVAE = "multvae"
    MULTDAE = "multdae"
    EASE = "ease"
    POPULARITY = "popularity"


@dataclass(frozen=True)
class CentralConfig:
    """Settings of a centralized run (``fedrec train-central``)."""

    dataset: str = "ml-100k"
    """Data set name (``ml-100k``, ``ml-1m``, ``pinterest-20``) or path to a file or folder."""
    model: RecommenderKind = RecommenderKind.MULTVAE
    """Which recommender to train."""
    dims: tuple[int, ...] = (600, 200)
    """Hidden and latent sizes of the encoder; the decoder mirrors them (I-600-200-600-I)."""
    epochs: int = 200
    """Maximum training epochs (neural models)."""
    patience: int = 30
    """Stop after this many epochs without a better validation NDCG@100."""
    batch_size: int = 100
    """Users per mini-batch."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam L2 penalty (Mult-DAE uses it in place of the KL term)."""
    dropout: float = 0.5
    """Dropout on the normalized input."""
    anneal_steps: int = 2000
    """KL annealing: ``beta = min(beta_cap, step / anneal_steps)``, so the cap is reached after
    ``beta_cap * anneal_steps`` updates (600, about 75 epochs of ML-100K at batch 100; chosen by
    validation NDCG@100 on ML-100K)."""
    beta_cap: float = 0.3
    """KL weight cap (Liang et al. 2018, Sec. 2.2.2, use 0.2; 0.3 chosen by validation on
    ML-100K)."""
    ease_lambda: float = 500.0
    """L2 regularization of EASE (Steck 2019)."""
    seed: int = 0
    """Seed of the split, the initialization and the batches."""
    min_rating: float = 4.0
    """Ratings at or above this are positives."""
    n_heldout_users: int | None = None
    """Validation and test users each (default: 100 for small sets, else 10%)."""
    strict: bool = False
    """Refuse the data file at its first bad row instead of dropping bad rows."""
    cache_dir: Path | None = None
    """Where fetched data sets are cached (default ``$FEDREC_DATA`` or ``~/.cache/fedrec``)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class CentralResult:
    """What a centralized run measured."""

    validation: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[int, int, dict[str, float]], None]
"""Called after each epoch with (epoch, max_epochs, {"loss", "ndcg@100", "best"})."""


def split_columns(ds: Dataset, split: Split) -> tuple[list[str], list[str]]:
    """Item ids and titles of the split's columns (the model's output order)."""
    title_of = dict(zip(ds.item_ids.tolist(), ds.item_titles.tolist(), strict=True))
    ids = [str(i) for i in split.item_ids.tolist()]
    return ids, [title_of.get(i, "") for i in ids]


def _model_config(cfg: CentralConfig, n_items: int) -> ModelConfig:
    kind = ModelKind.MULTDAE if cfg.model is RecommenderKind.MULTDAE else ModelKind.MULTVAE
    return ModelConfig(
        kind=kind,
        n_items=n_items,
        dims=cfg.dims,
        dropout=cfg.dropout,
        beta_cap=cfg.beta_cap,
        anneal_steps=cfg.anneal_steps,
    )


def _train_neural(
    cfg: CentralConfig, split: Split, on_epoch: EpochCallback | None
) -> tuple[torch.nn.Module, ModelConfig, CentralResult]:
    model_cfg = _model_config(cfg, split.train.shape[1])
    model = build_model(model_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)

    def beta(step: int) -> float:
        return anneal_beta(step, cap=model_cfg.beta_cap, total_steps=model_cfg.anneal_steps)

    schedule = beta if model_cfg.kind is ModelKind.MULTVAE else None
    best_ndcg, best_epoch, best_state = -np.inf, 0, copy.deepcopy(model.state_dict())
    step = 0
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        stats = train_epochs(
            model,
            split.train,
            epochs=1,
            batch_size=cfg.batch_size,
            optimizer=optimizer,
            beta_schedule=schedule,
            start_step=step,
            generator=generator,
        )
        step += stats.steps
        val = evaluate(
            lambda x: score_users(model, x),
            split.validation_foldin,
            split.validation_holdout,
        )
        history.append({"epoch": epoch, "loss": stats.mean_loss, "ndcg@100": val["ndcg@100"]})
        if val["ndcg@100"] > best_ndcg:
            best_ndcg, best_epoch = val["ndcg@100"], epoch
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(
                epoch,
                cfg.epochs,
                {"loss": stats.mean_loss, "ndcg@100": val["ndcg@100"], "best": best_ndcg},
            )
        if epoch - best_epoch >= cfg.patience:
            logger.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    model.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    result = CentralResult(
        validation=_pick(
            evaluate(
                lambda x: score_users(model, x), split.validation_foldin, split.validation_holdout
            )
        ),
        test=_pick(
            evaluate(lambda x: score_users(model, x), split.test_foldin, split.test_holdout)
        ),
        best_epoch=best_epoch,
        seconds=seconds,
        history=history,
    )
    return model, model_cfg, result


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in REPORTED_METRICS if k in metrics}


def _fit_baseline(cfg: CentralConfig, split: Split) -> CentralResult:
    start = time.perf_counter()
    recommender: EASE | Popularity
    if cfg.model is RecommenderKind.EASE:
        recommender = EASE(lam=cfg.ease_lambda).fit(split.train)
    else:
        recommender = Popularity().fit(split.train)
    return CentralResult(
        validation=_pick(
            evaluate(recommender.score, split.validation_foldin, split.validation_holdout)
        ),
        test=_pick(evaluate(recommender.score, split.test_foldin, split.test_holdout)),
        best_epoch=0,
        seconds=time.perf_counter() - start,
    )


def run_central(
    cfg: CentralConfig, out_dir: Path, *, on_epoch: EpochCallback | None = None
) -> CentralResult:
    """Train ``cfg.model`` centrally and write ``out_dir/metrics.json`` (and ``model.pt``).

    Returns
    -------
    CentralResult
        Validation and test metrics of the best epoch (by validation NDCG@100).
    """
    seed_everything(cfg.seed)
    ds = load_dataset(
        cfg.dataset, cache_dir=cfg.cache_dir, min_rating=cfg.min_rating, strict=cfg.strict
    )
    split = split_strong_generalization(ds, seed=cfg.seed, n_heldout_users=cfg.n_heldout_users)
    logger.info(
        "split: %d train, %d validation, %d test users; %d items",
        split.train.shape[0],
        split.validation_foldin.shape[0],
        split.test_foldin.shape[0],
        split.train.shape[1],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "cleaning.json", cleaning_record(ds))
    metrics: dict[str, Any]
    if cfg.model in (RecommenderKind.MULTVAE, RecommenderKind.MULTDAE):
        model, model_cfg, result = _train_neural(cfg, split, on_epoch)
        item_ids, titles = split_columns(ds, split)
        save_checkpoint(
            out_dir / "model.pt",
            Checkpoint(
                model_config=model_cfg.to_dict(),
                state_dict=model.state_dict(),
                item_ids=item_ids,
                item_titles=titles,
                item_genres=[list(ds.item_genres[c]) for c in split.item_index.tolist()],
                dataset={"name": ds.name, "sha256": ds.sha256},
                metadata={
                    "trainer": "central",
                    "seed": cfg.seed,
                    "best_epoch": result.best_epoch,
                    "test": result.test,
                    # trained centrally: no rounds, no privacy ledger
                    **model_provenance(run_id=out_dir.name, last_round=None, ledger=None),
                },
            ),
        )
    else:
        result = _fit_baseline(cfg, split)
    metrics = {
        "validation": result.validation,
        "test": result.test,
        "model": cfg.model.value,
        "dims": list(cfg.dims)
        if cfg.model in (RecommenderKind.MULTVAE, RecommenderKind.MULTDAE)
        else None,
        "seed": cfg.seed,
        "dataset": {"name": ds.name, "sha256": ds.sha256},
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 3),
        "history": result.history,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    return result

"""The warm start's two releases in the in-process engine (:mod:`simulations.fastsim`).

The same mechanism as a Flower run's (:mod:`server.warmstart`, :mod:`client.app`): every client
computes its statistic (:func:`common.warmstart.statistic`) on the rows it trains on, clips it
to norm 1, adds its share ``N(0, z^2 / N)`` and divides by ``N``; the server multiplies the sum
back by ``N``. Where every client holds one user a statistic has norm at most 1, clipping does
nothing, and the sum is computed for all clients at once, with the shares added as one draw of
``N(0, z^2)`` (the same distribution). Clients that hold several users are privatized one by one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from client.local import split_local
from common.model import ModelConfig
from common.privacy import AggregatorView, PrivacyAccountant, privatize_update
from common.privacy.ledger import LedgerWriter
from common.privacy.plan import DPPlan
from common.privacy.rounds import (
    charge_aggregator,
    charge_release,
    check_release_participation,
    release_noise_multipliers,
    release_plan,
)
from common.rounds import split_seed
from common.run.config import RunConfig
from common.run.folder import EvalData, client_sizes, load_client_shard, n_clients_of
from common.warmstart import (
    COOCCURRENCE,
    POPULARITY,
    release_vocabulary,
    statistic,
    warm_start_from_sums,
)
from simulations.cohort_batch import client_train_rows

__all__ = ["WarmStartResult", "warm_start_inprocess"]

logger = logging.getLogger(__name__)


@dataclass
class WarmStartResult:
    """The warm-started weights and what the run's results record about the warm start."""

    weights: dict[str, np.ndarray]
    summary: dict[str, Any]


def _train_rows(cfg: RunConfig, run_dir: Path, clients: list[int]) -> list[sp.csr_matrix] | None:
    """The training rows of each of ``clients``, or ``None`` when every client holds one user."""
    if all(size == 1 for size in client_sizes(run_dir)):
        return None
    fraction = cfg.data.client_holdout_fraction
    return [
        split_local(
            load_client_shard(run_dir, c).rows, fraction=fraction, seed=split_seed(cfg.seed, c)
        ).train
        for c in clients
    ]


def _released_sum(
    name: str,
    cfg: RunConfig,
    run_dir: Path,
    plan: DPPlan | None,
    vocab: np.ndarray | None,
    rng: np.random.Generator,
    per_client: list[sp.csr_matrix] | None,
    ids: list[int],
) -> np.ndarray:
    """The (noisy, with DP) sum of the statistic ``name`` of the clients ``ids``, in count
    units (``per_client``: their rows, or ``None`` when each holds one user)."""
    population = n_clients_of(run_dir)
    z = 0.0 if plan is None else release_plan(plan, name).noise_multiplier
    if per_client is None:
        rows = client_train_rows(
            run_dir,
            ids,
            fraction=cfg.data.client_holdout_fraction,
            split_seeds=[split_seed(cfg.seed, c) for c in ids],
        )
        total = statistic(name, rows, vocab).astype(np.float64)  # every row has norm <= 1
        if z > 0:  # the k shares' sum: N(0, k z^2 / N)
            total += rng.normal(0.0, z * np.sqrt(len(ids) / population), size=total.shape)
        return total
    total = np.zeros(0)
    for rows in per_client:
        value = {"s": statistic(name, rows, vocab)}
        if plan is not None:
            value = privatize_update(
                value,
                weight=1.0,
                clip=1.0,
                noise_std=z / np.sqrt(population),
                denominator=1.0,
                rng=rng,
            )
        else:
            norm = float(np.linalg.norm(value["s"]))
            value["s"] = value["s"] / max(norm, 1.0)
        total = value["s"].astype(np.float64) if not total.size else total + value["s"]
    return total


def warm_start_inprocess(
    cfg: RunConfig,
    run_dir: Path,
    *,
    plan: DPPlan | None,
    model_cfg: ModelConfig,
    template: dict[str, np.ndarray],
    data: EvalData,
    accountant: PrivacyAccountant | None,
    ledger: LedgerWriter | None,
    rng: np.random.Generator,
    aggregator: AggregatorView | None = None,
) -> WarmStartResult:
    """Run both releases, charge and record them, and build the warm-started weights."""
    population = n_clients_of(run_dir)
    records: list[dict[str, Any]] = []

    failing = set(cfg.simulation.fail_clients)
    contributors = [c for c in range(population) if c not in failing]
    answered = len(contributors)
    per_client = _train_rows(cfg, run_dir, contributors)

    def charge(name: str) -> None:
        if plan is None or accountant is None:
            return
        check_release_participation(plan, name=name, participated=answered)
        record = charge_release(
            accountant, plan, name=name, invited=population, participated=answered
        )
        if aggregator is not None:  # in process: no encryption, the aggregator sees each share
            record = charge_aggregator(
                aggregator, record, participants=contributors, encrypted=False
            )
        records.append(record.to_record())
        if ledger is not None:
            ledger.append_release(record.to_record())

    popularity = _released_sum(POPULARITY, cfg, run_dir, plan, None, rng, per_client, contributors)
    charge(POPULARITY)
    z = release_noise_multipliers(plan)
    vocab = release_vocabulary(popularity, noise_std=z[COOCCURRENCE], cfg=cfg.warm_start)
    upper = _released_sum(COOCCURRENCE, cfg, run_dir, plan, vocab, rng, per_client, contributors)
    charge(COOCCURRENCE)
    weights, summary = warm_start_from_sums(
        model_cfg,
        template,
        popularity=popularity,
        upper=upper,
        vocab=vocab,
        data=data,
        noise_multipliers=z,
    )
    summary["releases"] = records
    return WarmStartResult(weights, summary)

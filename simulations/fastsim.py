"""In-process engine: the rounds of a Flower run of fedrec, without Flower, for large sweeps.

(Over 400 lines: its two client engines and the round loop they feed are read together.)

A Flower simulation of 100,000 clients with about 1,000 per round costs some 30 s a round on two
cores, nearly all of it per-client messaging. This engine runs the same per-round algorithm as
:func:`server.federation.run_federation` with ``privacy.mode`` ``off`` or ``client``, in one
process, on a folder prepared by :func:`common.run.folder.write_run_folder`:

1. cohort: :func:`server.strategy.sample_cohort` over the clients in partition order with
   ``default_rng([seed, round])`` (the Flower run orders its nodes by partition id, so a seed
   picks the same clients there);
2. round settings: ``beta = anneal_beta(round)`` and the cosine server learning-rate factor,
   as the round loop sends them;
3. each client's update: :func:`client.local.compute_update` on the client's
   :func:`client.local.split_local` training rows with the ClientApp's seeds
   (:func:`common.rounds.train_seed`, :func:`common.rounds.split_seed`); with DP, the update
   goes through :func:`common.privacy.privatize_update` (clip to C, noise share
   N(0, (zC)^2 / m), divide by m), as the client mod does;
4. aggregation: the float64 sum in partition order, then
   :func:`server.aggregation.apply_sum_inplace` (fixed denominator 1 with DP, else the summed
   weight) with the server optimizer :func:`server.optimizer.make_server_optimizer`;
5. accounting: :func:`common.privacy.plan_privacy`, a :class:`common.privacy.PrivacyAccountant`
   and :func:`common.privacy.rounds.charge_round`, as the server's DP layer (effective z with the
   real participant count, incremental RDP, final PRV), writing ``OUT/ledger.jsonl``, which
   ``fedrec audit verify`` checks like a Flower run's;
6. evaluation: the same test metrics (:func:`common.rounds.test_metrics`) on the held-out test
   users every ``eval_every`` rounds and at the end; each round is a
   :class:`common.rounds.RoundRecord`. (The Flower run also asks a cohort to score the model
   on local held-out items; that changes nothing in training and is skipped here.)

Two client engines compute step 3 (:class:`ClientEngine`):

``exact``
    literally calls ``compute_update`` (and ``privatize_update``) once per client, reusing one
    model object: any configuration, about 20 ms a client for a [200, 64] model on 3,000 items.
``batched``
    for the cross-device setting where it is the same mathematics (one user per client, one
    local epoch of plain SGD, so a client's update is one SGD step at the global weights):
    :mod:`simulations.cohort_batch` runs one forward and backward pass for the whole cohort
    with each client's own dropout and reparameterisation draws, and clips with per-client
    norms computed without materializing per-client gradients. The clients' Gaussian shares
    are added as their sum, one draw of N(0, k (zC)^2 / m) for k participants: the same
    distribution as k separate shares. Agrees with ``exact`` to float32 rounding (the tests
    check it), at about a second for a cohort of 1,000 on one core.

Both engines train the Adv-MultVAE adversary head of ``[fairness] adversary`` on each client's
own user's attribute (``exact`` through :func:`client.local.adversary_labels`, ``batched``
through :func:`simulations.cohort_batch.client_labels`): the head is one more set of linear
layers in the batched pass, so the batched engine stays available with it.

With DP off and the same seed the engine reproduces a Flower run's cohorts and metrics (checked
by ``tests/simulations/test_fastsim.py``). With DP on, the noise comes from operating-system
entropy in both, so single runs differ, but the mechanism, its parameters and the accounting are
the same. ``privacy.noise_seed`` (simulations only, not private) makes DP runs repeatable: the
``exact`` engine then draws client c's share in round r from
:func:`client.dp_mod.seeded_noise_rng` ``(noise_seed, r, c)``, as the Flower ClientApp does;
``batched`` draws the cohort's summed share from ``default_rng([noise_seed, r])`` (the same
distribution, other draws).

Usage (tiny run from a flag)::

    python -m simulations.fastsim --config simulations/configs/synthetic-scale.toml \\
        --out runs/fast --set rounds=20 --set server.sample_rate=0.01
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp_mod import seeded_noise_rng
from client.local import (
    LocalData,
    adversary_labels,
    compute_update,
    group_weights,
    split_local,
)
from common.checkpoint import Checkpoint, model_provenance, save_checkpoint
from common.config import to_dict
from common.io import atomic_write_json
from common.model import ModelConfig, anneal_beta, build_model
from common.privacy import (
    AggregatorView,
    DPPlan,
    PrivacyAccountant,
    client_noise_std,
    plan_privacy,
    privatize_update,
)
from common.privacy.ledger import LedgerWriter
from common.privacy.rounds import (
    charge_aggregator,
    charge_round,
    client_round_step,
    ledger_header,
    privacy_summary,
)
from common.privacy.signing import server_signer
from common.rounds import RoundRecord, RoundStats, split_seed, test_metrics, train_seed
from common.run.config import PrivacyMode, RunConfig, load_run_config, run_model_config
from common.run.folder import load_client_shard, load_eval_data, n_clients_of
from server.aggregation import apply_sum_inplace
from server.optimizer import ServerOpt, cosine_lr_scale, make_server_optimizer
from server.strategy import sample_cohort
from simulations.cohort_batch import (
    batched_unsupported,
    client_labels,
    client_train_rows,
    client_user_weights,
    cohort_update_sum,
)
from simulations.warm_inprocess import warm_start_inprocess

__all__ = [
    "ENGINE_NAME",
    "ClientEngine",
    "InProcessResult",
    "run_inprocess",
]

logger = logging.getLogger(__name__)

ENGINE_NAME = "inprocess"
"""What results written by this engine say in their ``"engine"`` field."""


class ClientEngine(enum.StrEnum):
    """How the in-process engine computes the clients' updates (see the module docstring)."""

    AUTO = "auto"
    """``batched`` where it applies, else ``exact``."""
    EXACT = "exact"
    """``compute_update`` per client."""
    BATCHED = "batched"
    """One pass for the whole cohort (one user per client, one epoch of SGD)."""


@dataclass(frozen=True)
class InProcessResult:
    """What :func:`run_inprocess` produced (also written to ``OUT/results.json``)."""

    rounds: list[dict[str, Any]]
    """One record per round, with the fields of a Flower run's ``results.json`` rounds."""
    final: dict[str, Any]
    """``{"test": metrics, "privacy": {...}}`` (privacy only with DP)."""
    client_engine: ClientEngine
    """The client engine that ran (never ``auto``)."""
    wall_seconds: float
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    """The final global weights (float32 by state-dict name), e.g. to read latent codes."""


@lru_cache(maxsize=4096)
def _local_data(run_dir: str, client_id: int, fraction: float, seed: int) -> LocalData:
    shard = load_client_shard(Path(run_dir), client_id)
    return split_local(shard.rows, fraction=fraction, seed=seed)


@lru_cache(maxsize=4096)
def _client_attributes(run_dir: str, client_id: int) -> dict[str, np.ndarray]:
    return load_client_shard(Path(run_dir), client_id).attributes


# ----------------------------------------------------------------------------- the run


class _Round:
    """One round's client work and aggregation, for either client engine."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        model_cfg: ModelConfig,
        plan: DPPlan | None,
        engine: ClientEngine,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.model_cfg = model_cfg
        self.plan = plan
        self.engine = engine
        self.noise_seed = cfg.privacy.noise_seed
        self.noise_rng = np.random.default_rng()  # OS entropy, unless noise_seed is set
        self.noise_std = 0.0
        self.diverged: list[str] = []  # the last updates() call's diverged clients and why
        self.diverged_ids: set[int] = set()
        if plan is not None:
            self.noise_std = client_noise_std(
                noise_multiplier=plan.noise_multiplier,
                clip=plan.clip,
                expected_participants=plan.expected_participants,
            )

    def updates(
        self, weights: dict[str, np.ndarray], cohort: list[int], *, server_round: int, beta: float
    ) -> tuple[dict[str, np.ndarray] | None, float]:
        """The float64 sum of the cohort's (privatized) updates and the summed weight; clients
        whose training diverged are left out and listed in :attr:`diverged`."""
        self.diverged = []
        self.diverged_ids = set()
        if not cohort:
            return None, 0.0
        if self.engine is ClientEngine.BATCHED:
            return self._batched(weights, cohort, server_round=server_round, beta=beta)
        return self._exact(weights, cohort, server_round=server_round, beta=beta)

    def _exact(
        self, weights: dict[str, np.ndarray], cohort: list[int], *, server_round: int, beta: float
    ) -> tuple[dict[str, np.ndarray] | None, float]:
        cfg, plan = self.cfg, self.plan
        state = {k: torch.from_numpy(v) for k, v in weights.items()}
        total: dict[str, np.ndarray] | None = None
        weight = 0.0
        for cid in cohort:
            data = _local_data(
                str(self.run_dir), cid, cfg.data.client_holdout_fraction, split_seed(cfg.seed, cid)
            )
            labels = user_weights = None
            if cfg.fairness.adversary or cfg.fairness.reweight:  # the client's own attribute
                attributes = _client_attributes(str(self.run_dir), cid)
                labels = adversary_labels(cfg.fairness, attributes, data.n_users)
                user_weights = group_weights(cfg.fairness, attributes, data.n_users)
            update = compute_update(
                state,
                data,
                model_config=self.model_cfg,
                client=cfg.client,
                beta=beta,
                seed=train_seed(cfg.seed, server_round, cid),
                labels=labels,
                user_weights=user_weights,
            )
            if update.diverged is not None:  # the ClientApp sends no update either
                self.diverged.append(f"client {cid}: diverged: {update.diverged}")
                self.diverged_ids.add(cid)
                continue
            delta, w = update.delta, update.weight
            if plan is not None:
                delta = privatize_update(
                    delta,
                    weight=w,
                    clip=plan.clip,
                    noise_std=self.noise_std,
                    denominator=plan.expected_participants,
                    rng=self._client_rng(server_round, cid),
                )
                w = 1.0 / plan.expected_participants
            weight += w
            if total is None:
                total = {k: v.astype(np.float64, copy=True) for k, v in delta.items()}
            else:
                for k, v in delta.items():
                    total[k] += v
        return total, weight

    def _batched(
        self, weights: dict[str, np.ndarray], cohort: list[int], *, server_round: int, beta: float
    ) -> tuple[dict[str, np.ndarray] | None, float]:
        cfg, plan = self.cfg, self.plan
        rows = client_train_rows(
            self.run_dir,
            cohort,
            fraction=cfg.data.client_holdout_fraction,
            split_seeds=[split_seed(cfg.seed, cid) for cid in cohort],
        )
        seeds = [train_seed(cfg.seed, server_round, cid) for cid in cohort]
        total, _ = cohort_update_sum(
            weights,
            self.model_cfg,
            rows,
            seeds,
            beta=beta,
            lr=cfg.client.lr,
            clip=None if plan is None else plan.clip,
            labels=client_labels(self.run_dir, cohort, cfg.fairness),
            user_weights=client_user_weights(self.run_dir, cohort, cfg.fairness),
        )
        if plan is None:
            return total, float(len(cohort))  # one user per client: weight 1 each
        # k clients' shares N(0, s^2) summed: N(0, k s^2), drawn once (float64, dict order)
        std = self.noise_std * math.sqrt(len(cohort))
        m = plan.expected_participants
        rng = self.noise_rng
        if self.noise_seed is not None:
            rng = np.random.default_rng([self.noise_seed, server_round])
        for key in total:
            total[key] += rng.normal(0.0, std, size=total[key].shape)
            total[key] /= m
        return total, len(cohort) / m

    def _client_rng(self, server_round: int, client_id: int) -> np.random.Generator:
        """Client ``client_id``'s noise generator in round ``server_round``."""
        if self.noise_seed is None:
            return self.noise_rng
        return seeded_noise_rng(self.noise_seed, server_round=server_round, client_id=client_id)


def _train_round(
    cfg: RunConfig,
    plan: DPPlan | None,
    clients: _Round,
    node_ids: list[int],
    weights: dict[str, np.ndarray],
    optimizer: ServerOpt,
    rnd: int,
    aggregator: AggregatorView,
) -> RoundStats:
    """Sample, refuse over budget, train, sum and apply one round (``weights`` in place)."""
    beta = anneal_beta(rnd, cap=cfg.model.beta_cap, total_steps=cfg.model.anneal_steps)
    lr_scale = cosine_lr_scale(rnd, rounds=cfg.rounds, final_fraction=cfg.server.lr_final_fraction)
    invited = sample_cohort(node_ids, cfg.server, np.random.default_rng([cfg.seed, rnd]))
    stats = RoundStats(invited=len(invited))
    cohort = invited
    budget = cfg.privacy.client_budget
    if plan is not None and budget is not None and cohort:
        # each client's guard: its epsilon against the aggregator (client.dp_mod); in process
        # the sum is plaintext, so the aggregator sees each client's own share z / sqrt(m)
        z_seen = plan.noise_multiplier / math.sqrt(plan.expected_participants)
        kept = [c for c in cohort if aggregator.epsilon_after(c, z_seen) <= budget]
        stats.refused, cohort = len(cohort) - len(kept), kept
    failing = set(cfg.simulation.fail_clients)
    cohort = [c for c in cohort if c not in failing]  # injected failures
    stats.failed = len(invited) - stats.refused - len(cohort)
    total, weight = clients.updates(weights, cohort, server_round=rnd, beta=beta)
    stats.failed += len(clients.diverged)
    stats.reasons.extend(clients.diverged)
    stats.returned = len(cohort) - len(clients.diverged)
    stats.contributors = [c for c in cohort if c not in clients.diverged_ids]
    denominator = 1.0 if plan is not None else weight
    if total is not None and stats.returned >= cfg.server.min_clients and denominator > 0:
        apply_sum_inplace(
            weights, total, denominator=denominator, optimizer=optimizer, lr_scale=lr_scale
        )
        stats.applied = True
    else:
        logger.warning(
            "round %d: %d of %d invited returned (minimum %d); nothing applied",
            rnd,
            stats.returned,
            stats.invited,
            cfg.server.min_clients,
        )
    return stats


def _resolve_engine(engine: ClientEngine, cfg: RunConfig, run_dir: Path) -> ClientEngine:
    why = batched_unsupported(cfg, run_dir)
    if engine is ClientEngine.AUTO:
        return ClientEngine.EXACT if why else ClientEngine.BATCHED
    if engine is ClientEngine.BATCHED and why:
        raise ValueError(f"client engine 'batched' does not apply: {why}")
    return engine


def _check_supported(cfg: RunConfig) -> None:
    if cfg.privacy.mode is PrivacyMode.EXAMPLE:
        raise ValueError("privacy.mode = 'example' (DP-SGD in silos) is not modelled in process")
    if cfg.encryption.enabled:
        raise ValueError(
            "encryption.enabled = true is not modelled in process (it sums in plaintext); "
            "set encryption.enabled=false"
        )


def run_inprocess(
    cfg: RunConfig,
    run_dir: Path,
    *,
    out: Path | None = None,
    engine: ClientEngine = ClientEngine.AUTO,
    noise_seed: int | None = None,
) -> InProcessResult:
    """Run ``cfg``'s rounds in this process on the data prepared in ``run_dir``.

    Parameters
    ----------
    cfg:
        The run; ``privacy.mode`` ``off`` or ``client``.
    run_dir:
        Folder with ``data/`` written by :func:`common.run.folder.write_run_folder` for ``cfg``.
    out:
        Where ``results.json``, ``model.pt`` (and with DP ``ledger.jsonl``) go; default
        ``run_dir``. An
        existing ledger there is replaced (the engine does not resume).
    engine:
        Client engine (see :class:`ClientEngine`).
    noise_seed:
        Seed of the DP noise (not private); ``None`` (default) takes ``privacy.noise_seed`` of
        ``cfg``, and when that is unset too the noise comes from operating-system entropy, as
        on devices. A seed given here is written into the run's recorded config (ledger header,
        ``results.json``) as ``privacy.noise_seed``.

    Raises
    ------
    ValueError
        For ``privacy.mode = 'example'`` or encryption on (not modelled), or ``batched``
        asked for where it does not apply.
    """
    _check_supported(cfg)
    if noise_seed is not None and noise_seed != cfg.privacy.noise_seed:
        cfg = replace(cfg, privacy=replace(cfg.privacy, noise_seed=noise_seed))
    start = time.perf_counter()
    run_dir = Path(run_dir)
    out = run_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = _resolve_engine(engine, cfg, run_dir)
    data = load_eval_data(run_dir)
    model_cfg = run_model_config(cfg, len(data.item_ids))  # with the adversary head, if any
    optimizer: ServerOpt = make_server_optimizer(cfg.server)
    torch.manual_seed(cfg.seed)
    init = build_model(model_cfg, generator=torch.Generator().manual_seed(cfg.seed))
    weights = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
    population = n_clients_of(run_dir)
    plan = plan_privacy(cfg, population)
    accountant, ledger = None, None
    aggregator = AggregatorView(delta=1e-5 if plan is None else plan.delta)
    if plan is not None:
        accountant = PrivacyAccountant(delta=plan.delta)
        (out / "ledger.jsonl").unlink(missing_ok=True)
        header = ledger_header(run_id=out.name, cfg=cfg, plan=plan)
        ledger = LedgerWriter.create(out / "ledger.jsonl", header, signer=server_signer(out))
    else:
        logger.warning("privacy.mode = 'off': updates carry no differential privacy")
    warm: dict[str, Any] | None = None
    if cfg.warm_start.enabled:
        seed = cfg.privacy.noise_seed
        started = warm_start_inprocess(
            cfg,
            run_dir,
            plan=plan,
            model_cfg=model_cfg,
            template=weights,
            data=data,
            accountant=accountant,
            ledger=ledger,
            aggregator=aggregator,
            rng=np.random.default_rng(None if seed is None else [seed, 0]),
        )
        weights, warm = started.weights, started.summary
        warm["test"] = test_metrics(model_cfg, weights, data)
        logger.info("warm start: test NDCG@100 %.4f", warm["test"]["ndcg@100"])
    clients = _Round(cfg, run_dir, model_cfg, plan, engine)
    node_ids = list(range(population))  # partition order, the Flower run's canonical order
    logger.info("in-process run: %d clients, %s client engine", population, engine.value)
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        stats = _train_round(cfg, plan, clients, node_ids, weights, optimizer, rnd, aggregator)
        record = RoundRecord(round=rnd, stats=stats)
        if plan is not None and accountant is not None and ledger is not None:
            record.privacy = charge_round(
                accountant,
                plan,
                server_round=rnd,
                invited=stats.invited,
                participated=stats.returned,
                step=client_round_step(plan, participated=stats.returned),
            )
            record.privacy = charge_aggregator(
                aggregator, record.privacy, participants=stats.contributors, encrypted=False
            )
            ledger.append_round(record.privacy.to_record())
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            record.test = test_metrics(model_cfg, weights, data)
        record.seconds = time.perf_counter() - t0
        logger.info(
            "round %d: sampled %d, returned %d, failed %d, refused %d; %.2f s; NDCG@100 %s%s",
            rnd,
            stats.invited,
            stats.returned,
            stats.failed,
            stats.refused,
            record.seconds,
            None if record.test is None else record.test["ndcg@100"],
            "" if record.privacy is None else f"; epsilon {record.privacy.epsilon:.4g}",
        )
        rounds.append(record.to_dict())
    final: dict[str, Any] = {"test": test_metrics(model_cfg, weights, data)}
    if plan is not None and ledger is not None:
        releases = [] if warm is None else warm["releases"]
        last = rounds[-1]["ledger"] if rounds else (releases[-1] if releases else None)
        final["privacy"] = privacy_summary(plan, last)
        ledger.close(
            epsilon=final["privacy"]["epsilon"],
            epsilon_rdp=final["privacy"]["epsilon_rdp"],
            epsilon_aggregator=final["privacy"]["epsilon_aggregator"],
        )
    applied = [r["round"] for r in rounds if r.get("applied")]
    save_checkpoint(
        out / "model.pt",
        Checkpoint(
            model_config=model_cfg.to_dict(),
            state_dict={k: torch.from_numpy(v) for k, v in weights.items()},
            item_ids=data.item_ids,
            item_titles=data.item_titles,
            item_genres=data.item_genres,
            dataset=data.dataset,
            metadata={
                "trainer": ENGINE_NAME,
                "rounds": cfg.rounds,
                "warm_start": warm is not None,
                "seed": cfg.seed,
                "test": final["test"],
                **model_provenance(
                    run_id=out.name,
                    last_round=max(applied, default=0),
                    ledger=None if ledger is None else out / "ledger.jsonl",
                ),
            },
        ),
    )
    wall = time.perf_counter() - start
    atomic_write_json(
        out / "results.json",
        {
            "engine": ENGINE_NAME,
            "client_engine": engine.value,
            "population": population,
            "config": to_dict(cfg),
            "rounds": rounds,
            "final": final,
            "warm_start": warm,
            "wall_seconds": round(wall, 2),
        },
    )
    return InProcessResult(
        rounds=rounds, final=final, client_engine=engine, wall_seconds=wall, weights=weights
    )


def main() -> None:
    """Prepare the run folder and run it in process."""
    from common.run.folder import write_run_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", type=ClientEngine, default=ClientEngine.AUTO)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config, args.set)
    write_run_folder(cfg, args.out)
    result = run_inprocess(cfg, args.out, engine=args.engine)
    from simulations.runner import finish_results  # baselines and provenance, as a Flower run

    finish_results(args.out, wall_seconds=result.wall_seconds, reference=None)
    summary = {"client_engine": result.client_engine.value, **result.final}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

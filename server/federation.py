"""The server's round loop: wait for nodes, run rounds, evaluate, checkpoint, report.

(Over 400 lines: the round protocol's named steps, warm start, rounds and finish, read together.)

:func:`run_federation` reads top to bottom as the round protocol (docs/design.md, "One training
round"): open the run (fresh or resumed), plan the privacy and open the ledger, wait for the
client nodes, run the warm start's two releases once (``warm_start.enabled``,
:mod:`server.warmstart`), build the strategy (plain, with the encrypted sum and the DP layer
around it), then for every round train (sample, send, aggregate, charge), evaluate every
``eval_every`` rounds on the held-out test users with the centralized run's metric code, and
commit: the server state is checkpointed atomically before the round's (or the releases')
ledger lines, so a killed run resumes from its last complete round with no gap or duplicate in
its results, and never repeats a finished warm start.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.checkpoint import Checkpoint, model_provenance, save_checkpoint
from common.he import ParamSet, load_server_context
from common.he.shares import is_threshold, load_transcript
from common.model import ModelConfig, anneal_beta, build_model
from common.privacy import AggregatorView, DPPlan, plan_privacy
from common.privacy.ledger import LedgerWriter
from common.privacy.rounds import privacy_summary, resume_accountant, resume_aggregator
from common.privacy.signing import (
    DEVICE_REGISTRY_FILE,
    SIGNING_DIR,
    read_device_registry,
    server_signer,
)
from common.protocol import RoundConfig
from common.rounds import RoundRecord, test_metrics
from common.run.config import RunConfig, run_model_config
from common.run.folder import EvalData, client_sizes, load_eval_data, n_clients_of
from common.run.info import run_info_config
from common.run.owner import config_hash
from server.dp import make_dp_strategy
from server.he import CommitteeSum
from server.optimizer import ServerOpt, cosine_lr_scale, make_server_optimizer
from server.state import STATE_FILE, RunOutputs, ServerState, open_ledger
from server.strategy import FedRecStrategy, RoundStrategy
from server.threshold import HolderNode, ThresholdSum, run_ceremony
from server.warmstart import WarmStartOutcome, run_warm_start

__all__ = [
    "NoUpdateAppliedError",
    "build_strategy",
    "canonical_order",
    "make_summer",
    "no_update_reason",
    "run_federation",
    "wait_for_nodes",
]

logger = logging.getLogger(__name__)


class NoUpdateAppliedError(RuntimeError):
    """A run ended without any round applying an update: the model is still the initial one."""


@dataclass
class _Run:
    """A run being served: its folder, data, model shape, optimizer, state and output files."""

    dir: Path
    cfg: RunConfig
    data: EvalData
    model_cfg: ModelConfig
    optimizer: ServerOpt
    state: ServerState
    outputs: RunOutputs

    @classmethod
    def open(cls, run_dir: Path, cfg: RunConfig) -> _Run:
        """Resume from ``RUN_DIR/server_state.pt`` if it exists, else start at the seed's model."""
        data = load_eval_data(run_dir)
        model_cfg = run_model_config(cfg, len(data.item_ids))  # with an adversary head, if any
        optimizer = make_server_optimizer(cfg.server)
        state_path = run_dir / STATE_FILE
        if state_path.exists():
            state = ServerState.load(state_path, expect_config_hash=config_hash(cfg))
            optimizer.load_state_dict(state.optimizer)
            logger.info("resuming after round %d", state.round)
        else:
            torch.manual_seed(cfg.seed)
            init = build_model(model_cfg, generator=torch.Generator().manual_seed(cfg.seed))
            state = ServerState(
                round=0,
                weights={k: v.detach().numpy().copy() for k, v in init.state_dict().items()},
                optimizer=optimizer.state_dict(),
                config_hash=config_hash(cfg),
            )
        outputs = RunOutputs(run_dir, cfg, warm_start=state.warm_start)
        return cls(run_dir, cfg, data, model_cfg, optimizer, state, outputs)

    @property
    def warm_started(self) -> bool:
        """Whether the warm start ran and set the weights."""
        warm = self.state.warm_start
        return warm is not None and "error" not in warm


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: Path, *, expected_nodes: int, simulated: bool = False
) -> None:
    """Run (or resume) the federated rounds of ``cfg`` and write the run's files.

    Parameters
    ----------
    grid:
        Flower's grid: how messages reach the client nodes.
    cfg:
        The resolved run config.
    run_dir:
        The run folder prepared by the runner (``config.toml``, ``data/``).
    expected_nodes:
        How many client nodes to wait for before round 1.
    simulated:
        Launched by ``fedrec simulate``, which records which client each node is.
    """
    run = _Run.open(Path(run_dir), cfg)
    run.outputs.event(
        event="start",
        rounds=cfg.rounds,
        resumed_after=run.state.round,
        expected_nodes=expected_nodes,
    )
    plan = plan_privacy(cfg, n_clients_of(run.dir), silo_sizes=client_sizes(run.dir))
    ledger = None if plan is None else open_ledger(run.dir, cfg, plan, run.state)
    nodes = _register_nodes(grid, cfg, run.dir, expected=expected_nodes, simulated=simulated)
    run.outputs.event(event="nodes", registered=len(nodes))
    summer = make_summer(grid, cfg, run.dir, plan, nodes=nodes, simulated=simulated)
    # Devices cannot read the run folder: messages carry the config and catalogue (public)
    run_info = {} if simulated else run_info_config(cfg, run.data.item_ids)
    if cfg.warm_start.enabled and run.state.warm_start is None:
        accountant = None if plan is None else resume_accountant(plan, run.state.ledger_records())
        warm = run_warm_start(
            grid,
            cfg,
            nodes=nodes,
            plan=plan,
            accountant=accountant,
            summer=summer,
            aggregator=None if plan is None else _aggregator(cfg, plan, run.state),
            model_cfg=run.model_cfg,
            template=run.state.weights,
            data=run.data,
            run_info=run_info,
        )
        _commit_warm_start(run, warm, ledger)
    strategy = build_strategy(
        grid, cfg, run.dir, run.optimizer, nodes, plan, run.state, summer=summer
    )
    strategy.summary()
    reasons: list[str] = []  # why updates were lost, in this process's rounds
    for rnd in range(run.state.round + 1, cfg.rounds + 1):
        record, cosignatures = _run_round(grid, run, strategy, rnd, run_info)
        reasons.extend(record.stats.reasons)
        _commit_round(run, record, ledger, cosignatures)
    _finish(run, plan, ledger, reasons)


def make_summer(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    plan: DPPlan | None,
    *,
    nodes: list[int] | None = None,
    simulated: bool = True,
) -> CommitteeSum | None:
    """The encrypted sum of an encrypted run (``None``: plaintext sums), shared by the warm
    start's releases and the rounds.

    Threshold mode (:class:`server.threshold.ThresholdSum`) runs the key ceremony among
    ``encryption.key_holders`` of ``nodes`` first, unless the key folder holds one already (a
    resumed run). Single-key mode loads the operator's key folder.
    """
    if not cfg.encryption.enabled:
        logger.warning("encryption.enabled = false: the server sees each client's update")
        return None
    # the committee co-signs the rounds of a signed ledger (common.privacy.signing)
    server_key = server_signer(run_dir).public_key if plan is not None else None
    if cfg.encryption.threshold_mode:
        return _threshold_summer(
            grid, cfg, run_dir, server_key, nodes=nodes or [], simulated=simulated
        )
    return CommitteeSum(
        load_server_context(cfg.encryption.keys_dir(run_dir)),
        grid,
        committee_size=cfg.encryption.committee_size,
        timeout=cfg.server.round_timeout,
        seed=cfg.seed,
        run_id=run_dir.name if plan is not None else None,
        server_key=server_key,
    )


def _threshold_summer(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    server_key: str | None,
    *,
    nodes: list[int],
    simulated: bool,
) -> ThresholdSum:
    """Run (or reuse) the key ceremony and make the run's :class:`ThresholdSum`."""
    enc = cfg.encryption
    keydir = enc.keys_dir(run_dir)
    registry = read_device_registry(run_dir / SIGNING_DIR / DEVICE_REGISTRY_FILE)

    def client_of(node: int, position: int) -> int:
        # a simulated client is its partition (the canonical position); a device its node id
        return position if simulated else node % (2**31 - 1)

    if is_threshold(keydir):
        transcript = load_transcript(keydir)
        clients = transcript.clients or {}
        recorded = transcript.nodes or {}
        if recorded and set(recorded.values()) <= set(nodes):  # the same nodes (a deployment)
            holders = [HolderNode(index=j, node=n, client=clients[j]) for j, n in recorded.items()]
        else:  # simulated nodes get new ids each start: find each holder by its client
            position = {client_of(n, i): n for i, n in enumerate(nodes)}
            holders = [
                HolderNode(index=j, node=position[c], client=c)
                for j, c in sorted(clients.items())
                if c in position
            ]
        logger.info("reusing the key of ceremony %s", transcript.ceremony_id[:8])
    else:
        if len(nodes) < enc.key_holders:
            raise RuntimeError(
                f"encryption.key_holders = {enc.key_holders} but only {len(nodes)} nodes"
            )
        rng = np.random.default_rng([cfg.seed, 7])
        picks = sorted(int(i) for i in rng.choice(len(nodes), enc.key_holders, replace=False))
        holders = [
            HolderNode(index=k + 1, node=nodes[p], client=client_of(nodes[p], p))
            for k, p in enumerate(picks)
        ]
        transcript = run_ceremony(
            grid,
            holders,
            params=ParamSet.THRESHOLD.params,
            threshold=enc.decryption_threshold,
            keydir=keydir,
            registry=registry,
            timeout=cfg.server.round_timeout,
            relay_registry=not simulated,
        )
    return ThresholdSum(
        load_server_context(keydir),
        grid,
        holders=holders,
        threshold=transcript.threshold,
        registry=registry,
        min_contributors=enc.min_contributors,
        timeout=cfg.server.round_timeout,
        run_id=run_dir.name,
        server_key=server_key,
        public_context_bytes=None if simulated else (keydir / "server.ctx").read_bytes(),
        ceremony=None if simulated else transcript,
        relay_registry=not simulated,
        seed=cfg.seed,
    )


def build_strategy(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    optimizer: ServerOpt,
    nodes: list[int],
    plan: DPPlan | None,
    state: ServerState,
    *,
    summer: CommitteeSum | None = None,
) -> RoundStrategy:
    """The plain strategy, with the encrypted sum and the DP layer of ``plan`` around it.

    With client-level DP the clients pre-scale their updates by 1/m, so the plain strategy sums
    with the fixed denominator; the DP layer's accountant resumes from the warm start's
    releases and the rounds in ``state``, in that order. ``summer``: the encrypted sum to use
    (default: a new one in an encrypted run, :func:`make_summer`).
    """
    if summer is None and cfg.encryption.enabled:
        summer = make_summer(grid, cfg, run_dir, plan, nodes=nodes)
    plain = FedRecStrategy(
        cfg.server,
        optimizer,
        seed=cfg.seed,
        node_ids=nodes,
        summer=summer,
        fixed_denominator=plan is not None and plan.fixed_denominator,
        lr_scale=lambda rnd: cosine_lr_scale(
            rnd, rounds=cfg.rounds, final_fraction=cfg.server.lr_final_fraction
        ),
    )
    if plan is None:
        logger.warning("privacy.mode = 'off': updates carry no differential privacy")
        return plain
    accountant = resume_accountant(plan, state.ledger_records())
    return make_dp_strategy(
        plain,
        plan,
        accountant,
        aggregator=_aggregator(cfg, plan, state),
        encrypted=cfg.encryption.enabled,
    )


def _aggregator(cfg: RunConfig, plan: DPPlan, state: ServerState) -> AggregatorView:
    """The aggregator view of the lines already in ``state`` (none in a fresh run)."""
    return resume_aggregator(plan.delta, state.ledger_records(), encrypted=cfg.encryption.enabled)


def _register_nodes(
    grid: Grid, cfg: RunConfig, run_dir: Path, *, expected: int, simulated: bool
) -> list[int]:
    """Wait for ``expected`` client nodes, then put them in canonical order."""
    nodes = wait_for_nodes(
        grid,
        expected=expected,
        timeout=cfg.server.registration_timeout,
        minimum=cfg.server.min_clients,
    )
    return canonical_order(nodes, run_dir, wait=30.0 if simulated else 0.0)


def _run_round(
    grid: Grid, run: _Run, strategy: RoundStrategy, rnd: int, run_info: dict[str, Any]
) -> tuple[RoundRecord, list[dict[str, object]]]:
    """Train one round (and evaluate it when due); the weights move only if it was applied.
    Returns the round's record and its committee's co-signatures (for the ledger line)."""
    cfg = run.cfg
    start = time.perf_counter()
    beta = anneal_beta(rnd, cap=cfg.model.beta_cap, total_steps=cfg.model.anneal_steps)
    config = ConfigRecord(run_info)
    RoundConfig(server_round=rnd, beta=beta).write(config)
    result = strategy.train_round(
        grid, rnd, _arrays(run.state.weights), config, timeout=cfg.server.round_timeout
    )
    if result.arrays is not None:
        run.state.weights = {k: v.numpy().copy() for k, v in result.arrays.items()}
    record = RoundRecord(
        round=rnd, stats=result.stats, privacy=result.privacy, encrypted=cfg.encryption.enabled
    )
    if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
        record.test = test_metrics(run.model_cfg, run.state.weights, run.data)
        record.client_ndcg = _client_ndcg(grid, strategy, run, rnd, run_info)
    record.seconds = time.perf_counter() - start
    s = result.stats
    logger.info(
        "round %d: sampled %d, returned %d, failed %d, dropped %d%s; NDCG@100 %s",
        rnd,
        s.invited,
        s.returned,
        s.failed,
        s.dropped,
        f" ({'; '.join(s.reasons[:3])})" if s.reasons else "",
        None if record.test is None else record.test["ndcg@100"],
    )
    return record, result.cosignatures


def _client_ndcg(
    grid: Grid, strategy: RoundStrategy, run: _Run, rnd: int, run_info: dict[str, Any]
) -> float | None:
    """Mean NDCG@100 a sampled cohort measures on its own held-out items."""
    config = ConfigRecord(run_info)
    RoundConfig(server_round=rnd).write(config)
    replies = grid.send_and_receive(
        strategy.configure_evaluate(rnd, _arrays(run.state.weights), config, grid),
        timeout=run.cfg.server.round_timeout,
    )
    client_eval = strategy.aggregate_evaluate(rnd, replies)
    if client_eval is None or "ndcg@100" not in client_eval:
        return None
    value = client_eval["ndcg@100"]
    return float(value) if isinstance(value, int | float) else None


def _commit_round(
    run: _Run,
    record: RoundRecord,
    ledger: LedgerWriter | None,
    cosignatures: list[dict[str, object]] | None = None,
) -> None:
    """Checkpoint the state, then append the round's ledger line (with the committee's
    co-signatures when the ledger is signed), then report the round."""
    row = record.to_dict()
    state = run.state
    state.rounds.append(row)
    state.round = record.round
    state.optimizer = run.optimizer.state_dict()
    state.save(run.dir / STATE_FILE)
    if ledger is not None and record.privacy is not None:
        kept = (cosignatures or []) if ledger.signed else []
        ledger.append_round(record.privacy.to_record(), cosignatures=kept)
    run.outputs.write_rounds(state.rounds, None)
    run.outputs.event(event="round", **row)


def _commit_warm_start(run: _Run, warm: WarmStartOutcome, ledger: LedgerWriter | None) -> None:
    """Save the warm start in the state (its weights, releases and summary, with the
    warm-started model's test metrics), then append its release lines, then report it: the
    order of :func:`_commit_round`."""
    state = run.state
    summary = dict(warm.summary)
    if warm.weights is not None:
        state.weights = warm.weights
        summary["test"] = test_metrics(run.model_cfg, warm.weights, run.data)
        logger.info("warm start: test NDCG@100 %.4f", summary["test"]["ndcg@100"])
    else:
        logger.error("warm start failed, the rounds start from the initial model: %s", summary)
    state.releases = [release.row() for release in warm.releases]
    state.warm_start = summary
    state.save(run.dir / STATE_FILE)
    if ledger is not None:
        for release in warm.releases:
            if release.result.privacy is not None:
                kept = release.result.cosignatures if ledger.signed else []
                ledger.append_release(release.result.privacy.to_record(), cosignatures=kept)
    run.outputs.warm_start = summary
    run.outputs.write_rounds(state.rounds, None)
    run.outputs.event(event="warm_start", **summary, rows=state.releases)


def no_update_reason(rounds: list[dict[str, Any]], reasons: list[str]) -> str | None:
    """Why no round of ``rounds`` (their records) applied an update; ``None`` if one did.

    ``reasons`` are the rounds' lost-update reasons (``node N: ...``); the most frequent three
    are named, without the node ids.
    """
    if any(r.get("applied") for r in rounds):
        return None
    totals = {k: sum(int(r.get(k) or 0) for r in rounds) for k in ("sampled", "returned")}
    lost = {k: sum(int(r.get(k) or 0) for r in rounds) for k in ("failed", "dropped", "refused")}
    counts = ", ".join(f"{v} {k}" for k, v in lost.items() if v)
    text = (
        f"no round applied an update ({len(rounds)} rounds: {totals['sampled']} sampled, "
        f"{totals['returned']} returned{', ' + counts if counts else ''})"
    )
    common = Counter(re.sub(r"^node \d+: ", "", reason) for reason in reasons).most_common(3)
    if common:
        text += ": " + "; ".join(f"{why} (x{n})" if n > 1 else why for why, n in common)
    elif not totals["sampled"]:
        text += ": no client was sampled (server.sample_rate)"
    return text


def _finish(
    run: _Run, plan: DPPlan | None, ledger: LedgerWriter | None, reasons: list[str]
) -> None:
    """Final test metrics, the ledger's final line, ``model.pt`` and the final results.

    Raises
    ------
    NoUpdateAppliedError
        If neither the warm start nor any round applied an update: the results and the
        ledger are still completed (and the ``done`` event carries the ``error``), but no
        ``model.pt`` of the untrained model.
    """
    cfg, weights = run.cfg, run.state.weights
    final: dict[str, Any] = {"test": test_metrics(run.model_cfg, weights, run.data)}
    if plan is not None and ledger is not None:
        records = run.state.ledger_records()  # the last round's, or the last release's
        final["privacy"] = privacy_summary(plan, records[-1] if records else None)
        ledger.close(
            epsilon=final["privacy"]["epsilon"],
            epsilon_rdp=final["privacy"]["epsilon_rdp"],
            epsilon_aggregator=final["privacy"]["epsilon_aggregator"],
        )
    # a warm start that set the weights is an update: the model is not the initial one
    error = None if run.warm_started else no_update_reason(run.state.rounds, reasons)
    if error is not None:
        final["error"] = error
        run.outputs.write_rounds(run.state.rounds, final)
        run.outputs.event(event="done", final=final, error=error)
        logger.error("%s", error)
        raise NoUpdateAppliedError(error)
    save_checkpoint(
        run.dir / "model.pt",
        Checkpoint(
            model_config=run.model_cfg.to_dict(),
            state_dict={k: torch.from_numpy(v) for k, v in weights.items()},
            item_ids=run.data.item_ids,
            item_titles=run.data.item_titles,
            item_genres=run.data.item_genres,
            dataset=run.data.dataset,
            metadata={
                "trainer": "federated",
                "rounds": cfg.rounds,
                "warm_start": run.warm_started,
                "seed": cfg.seed,
                "test": final["test"],
                **model_provenance(
                    run_id=run.dir.name,
                    last_round=max(
                        (int(r["round"]) for r in run.state.rounds if r.get("applied")),
                        default=0,
                    ),
                    ledger=None if ledger is None else ledger.path,
                ),
            },
        ),
    )
    run.outputs.write_rounds(run.state.rounds, final)
    run.outputs.event(event="done", final=final)


def _arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(v) for k, v in weights.items()})


def wait_for_nodes(grid: Grid, *, expected: int, timeout: float, minimum: int) -> list[int]:
    """Poll until ``expected`` nodes registered (Flower otherwise samples the first few only).

    Returns the registered node ids. After ``timeout`` seconds the run goes on with what is
    there if that is at least ``minimum``; otherwise raises ``RuntimeError``.
    """
    start = time.monotonic()
    nodes: list[int] = []
    while time.monotonic() - start < timeout:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            break
        time.sleep(0.1)
    waited = time.monotonic() - start
    if len(nodes) < expected:
        if len(nodes) < minimum:
            raise RuntimeError(
                f"only {len(nodes)} of {expected} client nodes registered in {timeout:.0f} s"
            )
        logger.warning(
            "%d of %d nodes registered after %.0f s; going on", len(nodes), expected, waited
        )
    logger.info("%d nodes registered after %.1f s", len(nodes), waited)
    return nodes


def canonical_order(nodes: list[int], run_dir: Path, *, wait: float = 0.0) -> list[int]:
    """Nodes ordered by their client (partition) id when the simulation recorded it.

    Simulated node ids are random per run; ordering by partition makes a seed pick the same
    clients every time. The simulation writes the mapping while it registers nodes, so this
    waits up to ``wait`` seconds for it to cover ``nodes``. Without a mapping (a real
    deployment) nodes keep id order.
    """
    path = run_dir / "data" / "nodes.json"
    deadline = time.monotonic() + wait
    while True:
        partition: dict[int, int] = {}
        if path.exists():
            partition = {int(n): int(p) for n, p in json.loads(path.read_text()).items()}
        if all(n in partition for n in nodes) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not all(n in partition for n in nodes):
        if wait > 0:
            logger.warning("no node-to-client mapping: sampling follows random node ids")
        return sorted(nodes)
    return sorted(nodes, key=lambda n: (partition[n], n))

"""The plain federated strategy: sample a cohort, send the global model, add up the updates.

Clients send their update already weighted (``weight * (local - global)``) together with the
weight, so the server only adds (:mod:`server.aggregation`): the same protocol works when the
updates are noised for differential privacy or encrypted, which wrap this strategy rather than
change it (:mod:`server.dp`, :class:`server.he.CommitteeSum`).

This follows Flower's Message-API :class:`flwr.serverapp.strategy.Strategy` interface
(``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``);
the round loop that drives it lives in :mod:`server.federation`, because fedrec's loop also
checkpoints, resumes, waits for node registration and reports progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.privacy.rounds import PrivacyRound
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    EVAL_USERS,
    METRICS_RECORD,
    WEIGHT,
    Divergence,
    EvalMetrics,
    ProtocolError,
    is_divergence,
    is_refusal,
    read_float,
    read_seconds,
)
from common.rounds import RoundStats
from common.run.config import Sampling, ServerConfig
from server.aggregation import PlainSum, UpdateSum, apply_sum_inplace, to_numpy, wire_bytes
from server.optimizer import ServerOpt

__all__ = ["FedRecStrategy", "RoundStrategy", "TrainResult", "sample_cohort"]

logger = logging.getLogger(__name__)


def sample_cohort(
    node_ids: Sequence[int], cfg: ServerConfig, rng: np.random.Generator
) -> list[int]:
    """Pick a round's cohort.

    ``poisson``: each node independently with probability ``q`` (``cfg.sample_rate``), so the
    cohort size is Binomial(N, q) and privacy amplification by Poisson subsampling applies
    (Zhu and Wang 2019). ``fixed``: ``clients_per_round`` nodes uniformly without replacement.
    """
    ids = list(node_ids)  # in the caller's canonical order; uint64 ids: index, never cast
    if cfg.sampling is Sampling.POISSON:
        picked = np.flatnonzero(rng.random(len(ids)) < cfg.sample_rate)
    else:
        k = min(cfg.clients_per_round, len(ids))
        picked = np.sort(rng.choice(len(ids), size=k, replace=False))
    return [ids[int(i)] for i in picked]


@dataclass(frozen=True)
class TrainResult:
    """What one round's training exchange gave the round loop."""

    arrays: ArrayRecord | None
    """The new global model, or ``None`` when nothing was applied."""
    stats: RoundStats
    replies: list[Message] = field(default_factory=list)
    """The replies received, in canonical node order."""
    privacy: PrivacyRound | None = None
    """The round's privacy charge (set by a DP layer, :mod:`server.dp`)."""
    cosignatures: list[dict[str, object]] = field(default_factory=list)
    """The decryption committee's co-signatures of the round (for its ledger line)."""


class RoundStrategy(Protocol):
    """What the round loop (:mod:`server.federation`) drives: the plain strategy or a layer
    around it (:class:`server.dp.ClientDPStrategy`, :class:`server.dp.ExampleDPStrategy`)."""

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float,
    ) -> TrainResult:
        """Send the round's training messages, wait for the replies and aggregate them."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's evaluation step: whom to ask."""

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's evaluation step: the clients' mean metrics."""

    def summary(self) -> None:
        """Log the strategy's settings."""


class FedRecStrategy(Strategy):
    """Sampled, pre-weighted federated averaging with a server optimizer.

    Parameters
    ----------
    server:
        Sampling, minimum cohort and optimizer settings.
    optimizer:
        Applies the averaged delta to the global weights (FedAvg or FedAdam).
    seed:
        Seed of the cohort sampling; round ``r`` uses ``default_rng([seed, r])`` so a resumed
        run samples exactly as an uninterrupted one.
    node_ids:
        Registered nodes in canonical order (sampling picks by position in this list); empty:
        the grid's nodes, sorted.
    summer:
        How updates are added: :class:`PlainSum` (default) or ciphertexts
        (:class:`server.he.CommitteeSum`).
    fixed_denominator:
        Clients pre-scale their updates by 1/m (client-level DP): the server sums without
        dividing. Default: divide by the summed weight.
    lr_scale:
        Factor of the server learning rate in each round (default 1).
    """

    def __init__(
        self,
        server: ServerConfig,
        optimizer: ServerOpt,
        *,
        seed: int,
        node_ids: Sequence[int] = (),
        summer: UpdateSum | None = None,
        fixed_denominator: bool = False,
        lr_scale: Callable[[int], float] = lambda server_round: 1.0,
    ) -> None:
        self.server = server
        self.optimizer = optimizer
        self.seed = seed
        self.node_ids = list(node_ids)
        self.fixed_denominator = fixed_denominator
        self.summer: UpdateSum = summer if summer is not None else PlainSum()
        self._lr_scale = lr_scale
        self._stats = RoundStats()
        self._global: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------------------- training

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        *,
        timeout: float,
    ) -> TrainResult:
        """Sample, send the global model, wait up to ``timeout`` s, aggregate (Flower's steps)."""
        replies = list(
            grid.send_and_receive(
                self.configure_train(server_round, arrays, config, grid), timeout=timeout
            )
        )
        new_arrays, _ = self.aggregate_train(server_round, replies)
        return TrainResult(
            new_arrays,
            self._stats,
            self._canonical(replies),
            cosignatures=self.summer.cosignatures(),
        )

    def _canonical(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in canonical node order: they arrive in whatever order the clients finish,
        and floating-point addition is not associative."""
        rank = {node: i for i, node in enumerate(self.node_ids)}
        return sorted(
            replies, key=lambda m: (rank.get(m.metadata.src_node_id, -1), m.metadata.src_node_id)
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the cohort and address the global model to each member."""
        rng = np.random.default_rng([self.seed, server_round])
        cohort = sample_cohort(self.node_ids or sorted(grid.get_node_ids()), self.server, rng)
        self._global = {k: np.array(v, copy=True) for k, v in to_numpy(arrays).items()}
        self.summer.announce(config)
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
        per_message = wire_bytes(content)
        self._stats = RoundStats(invited=len(cohort), bytes_down=per_message * len(cohort))
        ttl = self.server.round_timeout + 60.0
        return [
            Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                ttl=ttl,
                group_id=str(server_round),
            )
            for node in cohort
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the pre-weighted updates, divide by the summed weight, apply the optimizer."""
        stats = self._stats
        replies = self._canonical(replies)  # sum in a fixed order
        rank = {node: i for i, node in enumerate(self.node_ids)}
        stats.dropped = stats.invited - len(replies)
        self.summer.begin(server_round, self._global)
        weight = 0.0
        seconds: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                reason = _error_line(msg.error.reason or "error")
                stats.reasons.append(f"node {msg.metadata.src_node_id}: {reason}")
                continue
            stats.bytes_up += wire_bytes(msg.content)
            metrics = msg.content.metric_records.get(METRICS_RECORD)
            if is_refusal(metrics):  # over its privacy budget: counted, not an error
                stats.refused += 1
                continue
            if is_divergence(metrics):  # local training went non-finite: no update, failed
                stats.failed += 1
                try:
                    why = Divergence.read(msg.content).reason
                except ProtocolError as err:
                    why = f"malformed reason: {err}"
                stats.reasons.append(f"node {msg.metadata.src_node_id}: diverged: {why}")
                continue
            problem = None
            reply_weight, reply_seconds = 0.0, {}
            if metrics is None or WEIGHT not in metrics:
                problem = "reply has no metrics/weight"
            else:
                try:  # read before adding, so a malformed reply leaves the sum unchanged
                    reply_weight = read_float(metrics, WEIGHT, record_name=METRICS_RECORD)
                    reply_seconds = read_seconds(metrics, record_name=METRICS_RECORD)
                except ProtocolError as err:
                    problem = f"malformed reply: {err}"
                else:
                    problem = self.summer.add(msg)
            if problem is not None:
                stats.failed += 1
                stats.reasons.append(f"node {msg.metadata.src_node_id}: {problem}")
                continue
            stats.returned += 1
            position = rank.get(msg.metadata.src_node_id)
            if position is not None:
                stats.contributors.append(position)
            weight += reply_weight
            for key, value in reply_seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
        stats.client_seconds = seconds
        denominator = 1.0 if self.fixed_denominator else weight
        if stats.returned < self.server.min_clients or stats.returned == 0 or denominator <= 0:
            logger.warning(
                "round %d: %d of %d invited returned (minimum %d); nothing applied",
                server_round,
                stats.returned,
                stats.invited,
                self.server.min_clients,
            )
            return None, None
        total = self.summer.total()
        stats.server_seconds = self.summer.timings()
        if total is None:
            stats.discarded = True
            stats.reasons.append(f"sum discarded: {self.summer.why_not()}")
            logger.warning("round %d: %s; nothing applied", server_round, self.summer.why_not())
            return None, None
        apply_sum_inplace(
            self._global,
            total,
            denominator=denominator,
            optimizer=self.optimizer,
            lr_scale=self._lr_scale(server_round),
        )
        stats.applied = True
        return _from_numpy(self._global), MetricRecord({"returned": stats.returned})

    # --------------------------------------------------------------------------- evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sampled cohort to score the global model on its own held-out items."""
        rng = np.random.default_rng([self.seed, server_round, 1])
        cohort = sample_cohort(self.node_ids or list(grid.get_node_ids()), self.server, rng)
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: config})
        ttl = self.server.round_timeout + 60.0
        return [
            Message(
                content,
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                ttl=ttl,
                group_id=f"{server_round}-eval",
            )
            for node in cohort
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the clients' metrics, weighted by the users each evaluated."""
        sums: dict[str, float] = {}
        users = 0.0
        for msg in self._canonical(replies):  # a fixed order: the same seed, the same mean
            if msg.has_error():
                continue
            metrics = msg.content.metric_records.get(METRICS_RECORD)
            if metrics is None or EVAL_USERS not in metrics:
                continue
            try:
                reply = EvalMetrics.read(metrics)
            except ProtocolError as err:
                logger.warning("round %d: evaluate reply ignored: %s", server_round, err)
                continue
            if reply.eval_users <= 0:
                continue
            users += reply.eval_users
            for key, value in reply.metrics.items():
                sums[key] = sums.get(key, 0.0) + reply.eval_users * value
        if users == 0:
            return None
        return EvalMetrics(users, {k: v / users for k, v in sums.items()}).to_record()

    def summary(self) -> None:
        """Log the strategy's settings."""
        s = self.server
        logger.info(
            "FedRecStrategy: %s sampling (q=%s, fixed=%d), min %d clients, %s lr=%s",
            s.sampling.value,
            s.sample_rate,
            s.clients_per_round,
            s.min_clients,
            s.optimizer.value,
            s.lr,
        )


def _error_line(reason: str, limit: int = 200) -> str:
    """The telling line of an error reply's reason, at most ``limit`` characters.

    Flower wraps a ClientApp's exception with its traceback (``<class ...>:<'... Traceback ...
    RuntimeError: client 3: injected failure'>``), whose last line names the exception.
    """
    lines = [line.strip() for line in reason.strip().removesuffix("'>").splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else "error")[:limit]


def _from_numpy(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )

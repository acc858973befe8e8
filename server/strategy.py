"""The plain federated strategy: sample a cohort, send the global model, add up the updates.

Clients send their update already weighted (``weight * (local - global)``) together with the
weight, so the server only adds: the same protocol works when the updates are noised for
differential privacy or encrypted, which wrap this strategy rather than change it.

This follows Flower's Message-API :class:`flwr.serverapp.strategy.Strategy` interface
(``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``);
the round loop that drives it lives in :mod:`server.federation`, because fedrec's loop also
checkpoints, resumes, waits for node registration and reports progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from flwr.supercore.inflatable.inflatable_object import InflatableObject

from common.runconfig import Sampling, ServerConfig
from server.optimizer import ServerOpt

__all__ = [
    "FedRecStrategy",
    "PlainSum",
    "RoundStats",
    "UpdateSum",
    "apply_sum_inplace",
    "sample_cohort",
    "wire_bytes",
]

logger = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
WEIGHT_KEY = "weight"
EXAMPLES_KEY = "num-examples"


_SIZE_CACHE: dict[tuple[object, ...], int] = {}


def _cached_size(key: tuple[object, ...], measure: Callable[[], int]) -> int:
    if key not in _SIZE_CACHE:
        _SIZE_CACHE[key] = measure()
    return _SIZE_CACHE[key]


def _nested_size(obj: InflatableObject) -> int:
    """Serialized size of ``obj`` and every object it references, counting repeats."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(_nested_size(child) for child in children.values())


def wire_bytes(content: RecordDict) -> int:
    """Bytes ``content`` takes on the wire: the serialized size of all its records.

    Flower sends a record tree as objects referenced by content hash (an ArrayRecord, its
    Arrays, their data chunks). Their serialized sizes depend only on names, dtypes and shapes,
    so an ArrayRecord's is measured once per layout; serializing and hashing every
    multi-megabyte update again only to measure it would cost the server about 12 ms per reply.
    The one difference from Flower's transfer: byte-identical chunks, which Flower sends once,
    are counted each time they occur (rare for trained float weights).
    """
    layout = tuple((key, type(rec).__name__) for key, rec in content.items())
    total = _cached_size(("dict", layout), lambda: len(content.deflate()))
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            sig = tuple((k, a.dtype, tuple(a.shape), a.stype, len(a.data)) for k, a in rec.items())
            total += _cached_size(("arrays", sig), lambda r=rec: _nested_size(r))  # type: ignore[misc]
        else:
            total += len(rec.deflate())
    return total


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


def apply_sum_inplace(
    weights: dict[str, np.ndarray],
    total: Mapping[str, np.ndarray],
    *,
    denominator: float,
    optimizer: ServerOpt,
    lr_scale: float,
) -> None:
    """Move ``weights`` (in place) by the optimizer along ``total / denominator``.

    ``total`` is the float64 sum of the returned (pre-weighted) updates; the average is taken
    in float64 and cast to float32, then applied with the round's learning-rate factor. Shared
    by :class:`FedRecStrategy` and the in-process engine (:mod:`simulations.fastsim`).
    """
    delta = {k: (v / denominator).astype(np.float32) for k, v in total.items()}
    optimizer.step_inplace(weights, delta, lr_scale=lr_scale)


class UpdateSum(Protocol):
    """How a round's returned updates are added up: in plaintext (:class:`PlainSum`) or as
    ciphertexts with committee decryption (:class:`server.he.EncryptedSum`)."""

    def announce(self, config: ConfigRecord) -> None:
        """Add what clients must know (e.g. the key fingerprint) to the train config."""

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start a round's sum; ``global_arrays`` is the model the clients received."""

    def add(self, msg: Message) -> str | None:
        """Add one reply's update; ``None`` when added, else why it was left out."""

    def total(self) -> dict[str, np.ndarray] | None:
        """The float64 sum of what was added, or ``None`` when it cannot be released."""

    def why_not(self) -> str:
        """Why :meth:`total` returned ``None``."""

    def timings(self) -> dict[str, float]:
        """Seconds the server side of the sum took this round, by name."""


class PlainSum:
    """Adds plaintext updates (``arrays`` record) in float64 after checking names and shapes."""

    def __init__(self) -> None:
        self._expected: dict[str, tuple[int, ...]] = {}
        self._total: dict[str, np.ndarray] | None = None

    def announce(self, config: ConfigRecord) -> None:
        """Nothing to announce."""

    def begin(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Forget the last round's sum."""
        self._expected = {k: v.shape for k, v in global_arrays.items()}
        self._total = None

    def add(self, msg: Message) -> str | None:
        """Check the reply's arrays (names, shapes, finite) and add them."""
        record = msg.content.array_records.get(ARRAYS_KEY)
        if record is None:
            return "reply has no arrays"
        update = _to_numpy(record)
        if set(update) != set(self._expected):
            return "wrong array names"
        for k, v in update.items():
            if v.shape != self._expected[k]:
                return f"array {k} has shape {v.shape}, expected {self._expected[k]}"
            if not np.all(np.isfinite(v)):
                return f"array {k} is not finite"
        if self._total is None:
            self._total = {k: v.astype(np.float64, copy=True) for k, v in update.items()}
        else:
            for k, v in update.items():
                self._total[k] += v
        return None

    def total(self) -> dict[str, np.ndarray] | None:
        """The sum (``None`` only when nothing was added)."""
        return self._total

    def why_not(self) -> str:
        """Only an empty round has no sum."""
        return "no update was added"

    def timings(self) -> dict[str, float]:
        """Plain sums are not timed separately."""
        return {}


@dataclass
class RoundStats:
    """What one round's training exchange produced, for the log, the ledger and results."""

    invited: int = 0
    returned: int = 0
    failed: int = 0
    dropped: int = 0
    refused: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    applied: bool = False
    discarded: bool = False
    """The sum could not be released (e.g. the decryption committee disagreed)."""
    reasons: list[str] = field(default_factory=list)
    client_seconds: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    """Server-side cost of the sum by name (``he-aggregate-seconds``, ``he-decrypt-seconds``)."""


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
    """

    def __init__(self, server: ServerConfig, optimizer: ServerOpt, *, seed: int) -> None:
        self.server = server
        self.optimizer = optimizer
        self.seed = seed
        self.node_ids: list[int] = []
        """Registered nodes in canonical order (sampling picks by position in this list)."""
        self.last = RoundStats()
        self.fixed_denominator = False
        """With DP, clients pre-scale by 1/m: the server then sums without dividing."""
        self.lr_scale = 1.0
        """Factor of the server learning rate for the current round (set by the round loop)."""
        self.summer: UpdateSum = PlainSum()
        """How updates are added: plaintext, or ciphertexts (set by the encryption layer)."""
        self._global: dict[str, np.ndarray] = {}

    # ----------------------------------------------------------------------------- training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the cohort and address the global model to each member."""
        rng = np.random.default_rng([self.seed, server_round])
        cohort = sample_cohort(self.node_ids or sorted(grid.get_node_ids()), self.server, rng)
        self._global = {k: np.array(v, copy=True) for k, v in _to_numpy(arrays).items()}
        self.summer.announce(config)
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        per_message = wire_bytes(content)
        self.last = RoundStats(invited=len(cohort), bytes_down=per_message * len(cohort))
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
        stats = self.last
        # Sum in a fixed order (the canonical node order): replies arrive in whatever order
        # the clients finish, and floating-point addition is not associative.
        rank = {node: i for i, node in enumerate(self.node_ids)}
        replies = sorted(
            replies, key=lambda m: (rank.get(m.metadata.src_node_id, -1), m.metadata.src_node_id)
        )
        stats.dropped = stats.invited - len(replies)
        self.summer.begin(server_round, self._global)
        weight = 0.0
        seconds: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                reason = msg.error.reason or "error"
                stats.reasons.append(f"node {msg.metadata.src_node_id}: {reason[:200]}")
                continue
            stats.bytes_up += wire_bytes(msg.content)
            metrics = msg.content.metric_records.get(METRICS_KEY)
            problem = None
            if metrics is None or (WEIGHT_KEY not in metrics and not metrics.get("refused")):
                problem = "reply has no metrics/weight"
            elif metrics.get("refused"):
                stats.refused += 1
                continue
            else:
                problem = self.summer.add(msg)
            if problem is not None:
                stats.failed += 1
                stats.reasons.append(f"node {msg.metadata.src_node_id}: {problem}")
                continue
            assert metrics is not None
            stats.returned += 1
            weight += float(metrics[WEIGHT_KEY])  # type: ignore[arg-type]
            for key, value in metrics.items():
                if key.endswith("-seconds") and isinstance(value, int | float):
                    seconds[key] = seconds.get(key, 0.0) + float(value)
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
            lr_scale=self.lr_scale,
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
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
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
        for msg in replies:
            if msg.has_error():
                continue
            metrics = msg.content.metric_records.get(METRICS_KEY)
            if metrics is None:
                continue
            n = float(metrics.get("eval-users", 0))  # type: ignore[arg-type]
            if n <= 0:
                continue
            users += n
            for key, value in metrics.items():
                if key.startswith(("ndcg@", "recall@")):
                    sums[key] = sums.get(key, 0.0) + n * float(value)  # type: ignore[arg-type]
        if users == 0:
            return None
        return MetricRecord({**{k: v / users for k, v in sums.items()}, "eval-users": users})

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


def _to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: arr.numpy() for key, arr in record.items()}


def _from_numpy(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )

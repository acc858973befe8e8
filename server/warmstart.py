"""The warm start's two releases in a Flower run (:mod:`common.warmstart`).

Before round 1 every registered node sends its item popularity, then its item co-occurrence over
the vocabulary the server picks from the noisy popularity. Each release is one round of the
round machinery at sample rate 1, with a statistic in place of the model:

- the global arrays are ``{"statistic": zeros(D)}`` (``D``: the catalogue, then
  ``K (K + 1) / 2`` for a ``K``-item vocabulary): they fix the size of the replies and, with
  encryption, the ciphertext layout;
- the plain strategy (:class:`server.strategy.FedRecStrategy`) samples with ``q = 1`` (Poisson
  at rate 1 picks every node), sums with the fixed denominator and "applies" the sum to the
  zeros with FedAvg at learning rate 1, which leaves the sum itself;
- with client-level DP, :class:`ReleaseDPStrategy` announces the release's mechanism
  (:func:`common.privacy.rounds.release_plan`: clip 1, z, m = N) so that each client's DP mod
  clips its statistic, adds its share ``N(0, z^2 / N)`` and divides by N, exactly as in a
  round, and charges the release with :func:`common.privacy.rounds.charge_release` on the
  run's accountant; the sum is multiplied back by N (count units, as
  :mod:`simulations.warm_inprocess`);
- with encryption the same :class:`server.he.CommitteeSum` adds the ciphertexts and has a
  committee decrypt (and co-sign) the sum: the 1/N pre-scaling keeps every value far inside
  CKKS's range.

Without DP there is no DP layer: the client scales its own statistic to norm at most 1
(:func:`client.app.release_reply`; a one-user client's statistic already is), the server sums
with weight 1 each, and the sum is already in count units. An encrypted run without DP then
sums unscaled statistics, so a catalogue item's summed popularity must stay within
:attr:`common.he.HEParams.max_abs_value` (a decrypted sum beyond it is refused, not wrapped).

The server then post-processes the two sums (free under DP): :func:`common.warmstart.vocabulary`
between the releases, :func:`common.warmstart.choose_spectral_weights` on the validation users
after them. A release whose sum is not released (too few replies, the committee failed) ends
the warm start there: the model keeps its initial weights, what was charged stays charged.
:func:`server.federation.run_federation` commits the warm start once both releases are done
(state, then ledger lines); a server killed before that runs it again from the start, as it
runs a killed round again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.model import ModelConfig
from common.privacy import AggregatorView, DPPlan, PrivacyAccountant
from common.privacy.rounds import (
    PrivacyRound,
    charge_release,
    release_noise_multipliers,
    release_plan,
)
from common.protocol import RELEASE_STATISTIC, RoundConfig
from common.rounds import RoundRecord
from common.run.config import RunConfig, Sampling, ServerOptimizer
from common.run.folder import EvalData
from common.warmstart import (
    COOCCURRENCE,
    POPULARITY,
    RELEASES,
    release_vocabulary,
    statistic_size,
    warm_start_from_sums,
)
from server.aggregation import UpdateSum
from server.dp import ClientDPStrategy
from server.optimizer import ServerOpt
from server.strategy import FedRecStrategy, RoundStrategy, TrainResult

__all__ = [
    "ReleaseDPStrategy",
    "ReleaseOutcome",
    "WarmStartOutcome",
    "release_strategy",
    "run_warm_start",
]

logger = logging.getLogger(__name__)


class ReleaseDPStrategy(ClientDPStrategy):
    """Client-level DP of a warm-start release around the plain strategy.

    Announces :func:`~common.privacy.rounds.release_plan` of the run's ``plan`` (the client DP
    mod then privatizes the statistic as an update) and charges each release with
    :func:`~common.privacy.rounds.charge_release` on ``accountant``, the run's: the training
    rounds compose after it.
    """

    def __init__(
        self,
        inner: FedRecStrategy,
        plan: DPPlan,
        accountant: PrivacyAccountant,
        *,
        aggregator: AggregatorView | None = None,
        encrypted: bool = False,
    ) -> None:
        super().__init__(
            inner,
            release_plan(plan, RELEASES[0]),
            accountant,
            aggregator=aggregator,
            encrypted=encrypted,
        )
        self.run_plan = plan

    def _announce(self, config: ConfigRecord) -> None:
        """Announce the mechanism of the release named in ``config`` (each has its own z)."""
        self.plan = release_plan(self.run_plan, _release_name(config))
        super()._announce(config)

    def _charge(self, server_round: int, config: ConfigRecord, result: TrainResult) -> PrivacyRound:
        """Charge the release named in ``config`` (:func:`charge_release`)."""
        return charge_release(
            self.accountant,
            self.run_plan,
            name=_release_name(config),
            invited=result.stats.invited,
            participated=result.stats.returned,
        )


def _release_name(config: ConfigRecord) -> str:
    """The release a config names (:class:`common.protocol.RoundConfig` ``release``)."""
    name = RoundConfig.read(config).release
    if name is None:
        raise ValueError("a release round's config must name its release")
    return name


def release_strategy(
    cfg: RunConfig,
    nodes: Sequence[int],
    plan: DPPlan | None,
    accountant: PrivacyAccountant | None,
    summer: UpdateSum | None,
    aggregator: AggregatorView | None = None,
) -> RoundStrategy:
    """The strategy of a release: every node (q = 1), fixed denominator, FedAvg at lr 1 (the
    applied "update" is the sum), the run's ``summer`` (plain or encrypted), the DP layer of
    :class:`ReleaseDPStrategy` under client-level DP."""
    server = dataclasses.replace(
        cfg.server,
        sampling=Sampling.POISSON,
        sample_rate=1.0,
        optimizer=ServerOptimizer.FEDAVG,
        lr=1.0,
        # the release's z holds for at least ceil(f N) answers: with fewer, the sum is never
        # decrypted (the strategy stops before the committee), so nothing is released
        min_clients=cfg.server.min_clients if plan is None else plan.release_min_clients,
    )
    plain = FedRecStrategy(
        server,
        ServerOpt(kind=ServerOptimizer.FEDAVG, lr=1.0),
        seed=cfg.seed,
        node_ids=nodes,
        summer=summer,
        fixed_denominator=True,
    )
    if plan is None:
        return plain
    if accountant is None:
        raise ValueError("a DP release needs the run's accountant")
    return ReleaseDPStrategy(
        plain, plan, accountant, aggregator=aggregator, encrypted=cfg.encryption.enabled
    )


@dataclass
class ReleaseOutcome:
    """One release: its sum (count units, ``None`` when not released) and its record."""

    name: str
    position: int
    total: np.ndarray | None
    result: TrainResult
    seconds: float
    encrypted: bool

    def row(self) -> dict[str, Any]:
        """The release as the server state keeps it: a round's record (:class:`RoundRecord`,
        ``round`` its position, ``ledger`` its ledger record under DP) with its ``release``."""
        record = RoundRecord(
            round=self.position,
            stats=self.result.stats,
            privacy=self.result.privacy,
            encrypted=self.encrypted,
            seconds=self.seconds,
        )
        return {"release": self.name, **record.to_dict()}


@dataclass
class WarmStartOutcome:
    """The warm start: its weights (``None`` when a release failed), summary and releases."""

    weights: dict[str, np.ndarray] | None
    summary: dict[str, Any]
    releases: list[ReleaseOutcome] = field(default_factory=list)


def _release(
    grid: Grid,
    strategy: RoundStrategy,
    cfg: RunConfig,
    *,
    name: str,
    size: int,
    vocab: np.ndarray | None,
    scale: float,
    run_info: Mapping[str, Any],
) -> ReleaseOutcome:
    """Ask every node for its statistic ``name`` (``size`` values) and sum the replies."""
    start = time.perf_counter()
    position = RELEASES.index(name) + 1
    config = ConfigRecord(dict(run_info))
    vocabulary_ids = None if vocab is None else tuple(int(i) for i in vocab)
    RoundConfig(server_round=position, release=name, vocabulary=vocabulary_ids).write(config)
    zeros = ArrayRecord({RELEASE_STATISTIC: torch.zeros(size, dtype=torch.float32)})
    result = strategy.train_round(grid, position, zeros, config, timeout=cfg.server.round_timeout)
    total = None
    if result.arrays is not None:
        total = result.arrays[RELEASE_STATISTIC].numpy().astype(np.float64) * scale
    s = result.stats
    logger.info(
        "release %s (%d values): %d of %d returned, %d failed, %d dropped%s",
        name,
        size,
        s.returned,
        s.invited,
        s.failed,
        s.dropped,
        "" if total is not None else "; not released",
    )
    seconds = time.perf_counter() - start
    return ReleaseOutcome(name, position, total, result, seconds, cfg.encryption.enabled)


def run_warm_start(
    grid: Grid,
    cfg: RunConfig,
    *,
    nodes: Sequence[int],
    plan: DPPlan | None,
    accountant: PrivacyAccountant | None,
    summer: UpdateSum | None,
    aggregator: AggregatorView | None = None,
    model_cfg: ModelConfig,
    template: Mapping[str, np.ndarray],
    data: EvalData,
    run_info: Mapping[str, Any],
) -> WarmStartOutcome:
    """Run both releases over ``nodes`` and build the warm-started weights from their sums.

    ``accountant`` (under DP) is the run's, charged with each release; ``template`` the
    initial weights (:func:`common.warmstart.spectral_weights` keeps a small part of them).
    The summary has the keys of :func:`simulations.warm_inprocess.warm_start_inprocess`'s
    (the choice, ``noise_multiplier``, ``values_per_client``, ``releases``: the ledger records)
    and the wall ``seconds`` of each step; an ``error`` when a release was not released.
    """
    strategy = release_strategy(cfg, nodes, plan, accountant, summer, aggregator)
    z = release_noise_multipliers(plan)
    scale = 1.0 if plan is None else float(plan.population)  # x N: count units
    releases: list[ReleaseOutcome] = []

    def release(name: str, size: int, vocab: np.ndarray | None) -> np.ndarray | None:
        outcome = _release(
            grid, strategy, cfg, name=name, size=size, vocab=vocab, scale=scale, run_info=run_info
        )
        releases.append(outcome)
        return outcome.total

    def summary(fields: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
        return {
            **fields,
            "releases": [r.result.privacy.to_record() for r in releases if r.result.privacy],
            "seconds": {**{r.name: round(r.seconds, 3) for r in releases}, **seconds},
        }

    def failed() -> WarmStartOutcome:
        return WarmStartOutcome(None, summary({"error": _why(releases[-1])}, {}), releases)

    popularity = release(POPULARITY, len(data.item_ids), None)
    if popularity is None:
        return failed()
    vocab = release_vocabulary(popularity, noise_std=z[COOCCURRENCE], cfg=cfg.warm_start)
    upper = release(COOCCURRENCE, statistic_size(len(vocab)), vocab)
    if upper is None:
        return failed()
    start = time.perf_counter()
    weights, fields = warm_start_from_sums(
        model_cfg,
        template,
        popularity=popularity,
        upper=upper,
        vocab=vocab,
        data=data,
        noise_multipliers=z,
    )
    spectral = {"spectral": round(time.perf_counter() - start, 3)}
    return WarmStartOutcome(weights, summary(fields, spectral), releases)


def _why(release: ReleaseOutcome) -> str:
    stats = release.result.stats
    reasons = "; ".join(stats.reasons[:3])
    return (
        f"release {release.name} was not released ({stats.returned} of {stats.invited} "
        f"returned{': ' + reasons if reasons else ''})"
    )

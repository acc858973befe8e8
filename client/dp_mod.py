"""Client-side DP as a Flower mod: clip, add this client's share of noise, pre-scale, refuse.

The mod wraps the plain training call (:mod:`client.app`) and changes only its reply: the
example-weighted delta becomes ``(clip_C(delta) + N(0, (zC)^2 / m)) / m`` (docs/design.md,
"One training round", step 3; McMahan et al. 2018, Alg. 1 with the noise spread over the m
expected participants). Before training it asks the client's own accountant whether one more
round keeps the client within its budget; if not, it answers with a refusal that the server
counts, not an error. The guard takes the aggregator's view
(:class:`common.privacy.accounting.AggregatorView`): the server knows who took part, so no
amplification by sampling; the client composes the rounds and releases it took part in at
sample rate 1, with the noise the server sees (the announced floor z of the sum when the run
is encrypted, else its own share ``z / sqrt(m)``).

The noise comes from the operating system's entropy, never from the run's seed: the server
knows the seed, and predictable noise protects nothing. The one exception is a simulation whose
config sets ``privacy.noise_seed`` (repeatable, not private): a simulated client then draws its
noise from :func:`seeded_noise_rng` ``(noise_seed, round, client id)``, the client id being its
``node_config["partition-id"]``. A device (``fedrec client join``, ``data`` in its node config)
or any node without a partition id refuses a seed that reaches it with the run config, and
sends no update.

Warm-start releases (:mod:`common.warmstart`, ``release`` in the config) pass through the same
clip, noise share and fixed denominator: the server announces the release's mechanism
(:func:`common.privacy.rounds.release_plan`: clip 1, q = 1, m = N) and numbers the releases 1
and 2 (``server-round``, as their ledger lines). Their seeded noise has its own streams
(:func:`seeded_noise_rng` with ``release=True``), apart from the training rounds 1 and 2. The
budget guard counts a release like a round it took part in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from client.store import is_device
from common.privacy import gaussian_epsilon, privatize_update
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    HE_FINGERPRINT,
    METRICS_RECORD,
    WEIGHT,
    ClientDPConfig,
    Refusal,
    RoundConfig,
    read_float,
)

__all__ = [
    "BudgetLookup",
    "NoiseSeedLookup",
    "SeededNoiseRefusedError",
    "make_client_dp_mod",
    "refusal",
    "seeded_noise_rng",
]

logger = logging.getLogger(__name__)

BudgetLookup = Callable[[Context], float | None]
"""Where the mod finds this client's own epsilon budget (node config, run config...)."""

NoiseSeedLookup = Callable[[Context], int | None]
"""Where the mod finds the run's ``privacy.noise_seed`` (``None``: noise from OS entropy)."""

_STATE_KEY = "fedrec-dp"


class SeededNoiseRefusedError(RuntimeError):
    """A node that is not a simulated client was asked to draw seeded (non-private) noise."""


def seeded_noise_rng(
    noise_seed: int, *, server_round: int, client_id: int, release: bool = False
) -> np.random.Generator:
    """The generator of a simulated client's DP noise under ``privacy.noise_seed`` (not private).

    ``default_rng([noise_seed, server_round, client_id])``: one stream per client and round,
    shared by the Flower ClientApp and the in-process engine's exact client engine. A
    warm-start release (``release``, ``server_round`` its position 1 or 2) draws from
    ``default_rng([noise_seed, server_round, client_id, 1])``, never a training round's stream.
    """
    if release:
        return np.random.default_rng([noise_seed, server_round, client_id, 1])
    return np.random.default_rng([noise_seed, server_round, client_id])


def _noise_rng(
    context: Context, noise_seed: int | None, server_round: int, *, release: bool = False
) -> np.random.Generator:
    """OS entropy, or the seeded stream of a simulated client (see the module docstring)."""
    if noise_seed is None:
        return np.random.default_rng()
    if is_device(context) or "partition-id" not in context.node_config:
        raise SeededNoiseRefusedError(
            f"the run config sets privacy.noise_seed = {noise_seed}: seeded DP noise is not "
            "private, and this node is not a simulated client; it refuses to train"
        )
    client_id = int(context.node_config["partition-id"])
    return seeded_noise_rng(
        noise_seed, server_round=server_round, client_id=client_id, release=release
    )


def refusal(reason: str, epsilon: float) -> RecordDict:
    """The content of a reply refusing a round: counted by the server, not an error."""
    metrics = Refusal(epsilon_if_trained=epsilon).to_record()
    logger.info("refusing round: %s", reason)
    return RecordDict({METRICS_RECORD: metrics})


def make_client_dp_mod(
    budget_of: BudgetLookup,
    noise_seed_of: NoiseSeedLookup | None = None,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that privatizes this client's training replies (see module docstring).

    ``noise_seed_of`` reads the run's ``privacy.noise_seed``; ``None`` (or a lookup returning
    ``None``) keeps the noise on OS entropy.
    """

    def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
        dp = ClientDPConfig.read(config)
        if dp is None:
            return call_next(msg, context)
        clip, noise_std, denominator = dp.clip, dp.noise_std, dp.denominator
        # the per-round z the server's calibration planned for (at a low participant count)
        z, delta = dp.accounting_noise_multiplier, dp.delta
        round_config = RoundConfig.read(config)
        server_round = round_config.server_round
        for name, value in (("clip", clip), ("denominator", denominator)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"server sent an invalid {name}: {value}")
        noise_seed = None if noise_seed_of is None else noise_seed_of(context)
        release = round_config.release is not None  # a warm-start release: its own stream
        # a device refuses a seed here
        rng = _noise_rng(context, noise_seed, server_round, release=release)
        budget = budget_of(context)
        epsilon = math.nan  # only computed when this client has a budget to guard
        participations = context.state.config_records.get(_STATE_KEY, ConfigRecord())
        seen = participations.get("inverse_variance", 0.0)
        # against the aggregator, which knows who took part: no amplification; it sees the
        # decrypted sum (z at the planned floor) when encrypted, else this client's own share
        z_seen = z if HE_FINGERPRINT in config else dp.noise_multiplier / math.sqrt(denominator)
        charge = (seen if isinstance(seen, float) else 0.0) + (
            1.0 / z_seen**2 if z_seen > 0 else math.inf
        )
        if budget is not None:
            epsilon = (
                gaussian_epsilon(math.sqrt(charge), delta) if math.isfinite(charge) else math.inf
            )
            if epsilon > budget:
                reason = f"epsilon {epsilon:.3g} would exceed budget {budget:.3g}"
                return Message(refusal(reason, epsilon), reply_to=msg)

        reply = call_next(msg, context)
        if reply.has_error() or ARRAYS_RECORD not in reply.content.array_records:
            return reply  # an error, or no update to privatize (training diverged)
        metrics = reply.content.metric_records[METRICS_RECORD]
        weight = read_float(metrics, WEIGHT, record_name=METRICS_RECORD)
        arrays = privatize_update(
            {k: a.numpy() for k, a in reply.content.array_records[ARRAYS_RECORD].items()},
            weight=weight,
            clip=clip,
            noise_std=noise_std,
            denominator=denominator,
            rng=rng,
        )
        count = participations.get("participations", 0)
        participations["inverse_variance"] = charge
        participations["participations"] = (count if isinstance(count, int) else 0) + 1
        if not math.isnan(epsilon):
            participations["epsilon"] = epsilon
        context.state.config_records[_STATE_KEY] = participations
        new_metrics = MetricRecord(
            {**{k: v for k, v in metrics.items() if k != WEIGHT}, WEIGHT: 1.0 / denominator}
        )
        content = RecordDict(
            {
                ARRAYS_RECORD: ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                METRICS_RECORD: new_metrics,
            }
        )
        return Message(content, reply_to=msg)

    return client_dp_mod

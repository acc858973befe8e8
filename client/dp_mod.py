"""Client-side DP as a Flower mod: clip, add this client's share of noise, pre-scale, refuse.

The mod wraps the plain training call (:mod:`client.app`) and changes only its reply: the
example-weighted delta becomes ``(clip_C(delta) + N(0, (zC)^2 / m)) / m`` (docs/design.md,
"One training round", step 3; McMahan et al. 2018, Alg. 1 with the noise spread over the m
expected participants). Before training it asks the client's own accountant whether one more
round keeps the client within its budget; if not, it answers with a refusal that the server
counts, not an error.

The noise comes from the operating system's entropy, never from the run's seed: the server
knows the seed, and predictable noise protects nothing. The one exception is a simulation whose
config sets ``privacy.noise_seed`` (repeatable, not private): a simulated client then draws its
noise from :func:`seeded_noise_rng` ``(noise_seed, round, client id)``, the client id being its
``node_config["partition-id"]``. A device (``fedrec client join``, ``data`` in its node config)
or any node without a partition id refuses a seed that reaches it with the run config, and
sends no update.
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
from common.privacy import client_epsilon_after, privatize_update
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
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


def seeded_noise_rng(noise_seed: int, *, server_round: int, client_id: int) -> np.random.Generator:
    """The generator of a simulated client's DP noise under ``privacy.noise_seed`` (not private).

    ``default_rng([noise_seed, server_round, client_id])``: one stream per client and round,
    shared by the Flower ClientApp and the in-process engine's exact client engine.
    """
    return np.random.default_rng([noise_seed, server_round, client_id])


def _noise_rng(context: Context, noise_seed: int | None, server_round: int) -> np.random.Generator:
    """OS entropy, or the seeded stream of a simulated client (see the module docstring)."""
    if noise_seed is None:
        return np.random.default_rng()
    if is_device(context) or "partition-id" not in context.node_config:
        raise SeededNoiseRefusedError(
            f"the run config sets privacy.noise_seed = {noise_seed}: seeded DP noise is not "
            "private, and this node is not a simulated client; it refuses to train"
        )
    client_id = int(context.node_config["partition-id"])
    return seeded_noise_rng(noise_seed, server_round=server_round, client_id=client_id)


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
        z, q, delta = dp.accounting_noise_multiplier, dp.sample_rate, dp.delta
        server_round = RoundConfig.read(config).server_round
        for name, value in (("clip", clip), ("denominator", denominator)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"server sent an invalid {name}: {value}")
        noise_seed = None if noise_seed_of is None else noise_seed_of(context)
        rng = _noise_rng(context, noise_seed, server_round)  # a device refuses a seed here
        budget = budget_of(context)
        epsilon = math.nan  # only computed when this client has a budget to guard
        if budget is not None:
            epsilon = client_epsilon_after(
                server_round=server_round, noise_multiplier=z, sample_rate=q, delta=delta
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
        participations = context.state.config_records.get(_STATE_KEY, ConfigRecord())
        count = participations.get("participations", 0)
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

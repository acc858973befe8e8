"""Client-side DP as a Flower mod: clip, add this client's share of noise, pre-scale, refuse.

The mod wraps the plain training call (:mod:`client.app`) and changes only its reply: the
example-weighted delta becomes ``(clip_C(delta) + N(0, (zC)^2 / m)) / m`` (DESIGN.md, round
step 3; McMahan et al. 2018, Alg. 1 with the noise spread over the m expected participants).
Before training it asks the client's own accountant whether one more round keeps the client
within its budget; if not, it answers with a refusal that the server counts, not an error.

The noise comes from the operating system's entropy, never from the run's seed: the server
knows the seed, and predictable noise protects nothing.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping

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

from common.privacy import (
    AccountantKind,
    MechanismStep,
    add_gaussian_noise_inplace,
    clip_inplace,
    compute_epsilon,
)

__all__ = [
    "BudgetLookup",
    "client_epsilon_after",
    "make_client_dp_mod",
    "privatize_update",
    "refusal",
]

logger = logging.getLogger(__name__)

BudgetLookup = Callable[[Context], float | None]
"""Where the mod finds this client's own epsilon budget (node config, run config...)."""

_STATE_KEY = "fedrec-dp"


@functools.lru_cache(maxsize=256)
def client_epsilon_after(
    *, server_round: int, noise_multiplier: float, sample_rate: float, delta: float
) -> float:
    """The client's epsilon once round ``server_round`` has run (RDP, an upper bound of PRV).

    Every round counts, sampled or not: the guarantee of Poisson subsampling composes over all
    rounds at rate q (the client cannot see rounds it was not invited to, so it counts them
    from the round number).
    """
    return compute_epsilon(
        [MechanismStep(noise_multiplier, sample_rate, server_round)],
        delta=delta,
        accountant=AccountantKind.RDP,
    )


def privatize_update(
    update: Mapping[str, np.ndarray],
    *,
    weight: float,
    clip: float,
    noise_std: float,
    denominator: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``(clip_C(update / weight) + N(0, noise_std^2)) / m``: what a DP client sends (float32).

    McMahan et al. 2018, Alg. 1 with the noise spread over the participants: ``update`` is the
    example-weighted delta ``weight * (local - global)``, ``clip`` is C, ``noise_std`` this
    client's share (:func:`common.privacy.client_noise_std`) and ``denominator`` m = qN. The
    input is not changed. Shared by the Flower mod and the in-process engine
    (:mod:`simulations.fastsim`).
    """
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight}")
    arrays = {k: (np.asarray(a) / weight).astype(np.float32) for k, a in update.items()}
    clip_inplace(arrays, max_norm=clip)
    add_gaussian_noise_inplace(arrays, std=noise_std, rng=rng)
    for key in arrays:
        arrays[key] /= np.float32(denominator)
    return arrays


def refusal(reason: str, epsilon: float) -> RecordDict:
    """The content of a reply refusing a round: counted by the server, not an error."""
    metrics = MetricRecord({"refused": 1, "weight": 0.0, "epsilon-if-trained": epsilon})
    logger.info("refusing round: %s", reason)
    return RecordDict({"metrics": metrics})


def make_client_dp_mod(
    budget_of: BudgetLookup,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """A mod that privatizes this client's training replies (see module docstring)."""

    def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get("config", ConfigRecord())
        if "dp-clip" not in config:
            return call_next(msg, context)
        clip = float(config["dp-clip"])  # type: ignore[arg-type]
        noise_std = float(config["dp-noise-std"])  # type: ignore[arg-type]
        denominator = float(config["dp-denominator"])  # type: ignore[arg-type]
        # the per-round z the server's calibration planned for (at a low participant count)
        z = float(config.get("dp-accounting-noise-multiplier", config["dp-noise-multiplier"]))  # type: ignore[arg-type]
        q = float(config["dp-sample-rate"])  # type: ignore[arg-type]
        delta = float(config["dp-delta"])  # type: ignore[arg-type]
        server_round = int(config["server-round"])  # type: ignore[arg-type]
        for name, value in (("clip", clip), ("denominator", denominator)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"server sent an invalid {name}: {value}")
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
        if reply.has_error():
            return reply
        metrics = reply.content.metric_records["metrics"]
        weight = float(metrics["weight"])  # type: ignore[arg-type]
        arrays = privatize_update(
            {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()},
            weight=weight,
            clip=clip,
            noise_std=noise_std,
            denominator=denominator,
            rng=np.random.default_rng(),
        )
        participations = context.state.config_records.get(_STATE_KEY, ConfigRecord())
        count = participations.get("participations", 0)
        participations["participations"] = (count if isinstance(count, int) else 0) + 1
        if not math.isnan(epsilon):
            participations["epsilon"] = epsilon
        context.state.config_records[_STATE_KEY] = participations
        new_metrics = MetricRecord(
            {**{k: v for k, v in metrics.items() if k != "weight"}, "weight": 1.0 / denominator}
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
                "metrics": new_metrics,
            }
        )
        return Message(content, reply_to=msg)

    return client_dp_mod

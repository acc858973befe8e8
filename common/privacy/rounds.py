"""What one round costs: the mechanism it released, charged on the accountant, as a ledger record.

Client level (DP-FedAvg with a fixed denominator, McMahan et al. 2018, Algorithm 1): a round with
``k`` participants released the sum with effective noise multiplier ``z * sqrt(k / m)``
(:func:`common.privacy.mechanism.effective_noise_multiplier`), sampled at rate q, one step.
Example level (DP-SGD in silos): every user's loss is its silo's DP-SGD (q_s, steps_s) at z; the
round is charged the plan's bound, or more when a silo reports more (:func:`example_round_step`).

:func:`charge_round` is the one place a round becomes a :class:`PrivacyRound`: the server's DP
layer (:mod:`server.dp`) and the in-process engine both call it, so their ledgers agree line by
line. A round in which no update came back released nothing: it is not charged and records the
configured z (docs/design.md, "Privacy accounting").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from common.config import to_dict
from common.privacy.accounting import AccountantKind, MechanismStep, PrivacyAccountant
from common.privacy.mechanism import effective_noise_multiplier
from common.privacy.plan import DPPlan
from common.run.config import RunConfig
from common.run.owner import config_hash

__all__ = [
    "NOISE_OS_ENTROPY",
    "NOISE_SEEDED",
    "PrivacyRound",
    "charge_round",
    "client_round_step",
    "example_round_step",
    "ledger_header",
    "privacy_summary",
    "resume_accountant",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyRound:
    """One round's line in the privacy ledger (the fields of :mod:`common.privacy.ledger`)."""

    round: int
    sample_rate: float
    """q charged for the round."""
    invited: int
    participated: int
    """Updates that came back (the sum's k)."""
    expected_participants: float
    """m = qN, the fixed denominator."""
    clip: float
    noise_multiplier: float
    """z as planned."""
    effective_noise_multiplier: float
    """The z the round is charged with (``z * sqrt(k / m)`` at client level)."""
    steps: int
    released: bool
    epsilon: float
    """Cumulative epsilon claimed after this round (PRV at the last round, else RDP)."""
    epsilon_accountant: str
    """``"prv"`` or ``"rdp"``: which accountant :attr:`epsilon` comes from."""
    epsilon_rdp: float

    def to_record(self) -> dict[str, Any]:
        """The ledger's round record (plain JSON types), in the ledger's field order."""
        return {
            "round": self.round,
            "sample_rate": self.sample_rate,
            "invited": self.invited,
            "participated": self.participated,
            "expected_participants": self.expected_participants,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "effective_noise_multiplier": self.effective_noise_multiplier,
            "steps": self.steps,
            "released": self.released,
            "epsilon": self.epsilon,
            "epsilon_accountant": self.epsilon_accountant,
            "epsilon_rdp": self.epsilon_rdp,
        }


def client_round_step(plan: DPPlan, *, participated: int) -> MechanismStep:
    """The mechanism a client-level round with ``participated`` updates released."""
    z_eff = effective_noise_multiplier(
        noise_multiplier=plan.noise_multiplier,
        participated=participated,
        expected=plan.expected_participants,
    )
    return MechanismStep(z_eff, plan.sample_rate, 1)


def example_round_step(
    plan: DPPlan, reported: Iterable[tuple[float | None, int | None]]
) -> MechanismStep:
    """The mechanism an example-level round released: the plan's bound, raised to what any silo
    reports (``reported``: each reply's DP-SGD sample rate and step count, ``None`` if absent)."""
    q, steps = plan.sample_rate, plan.steps_per_round
    for reported_q, reported_steps in reported:
        rq, rs = reported_q or 0.0, reported_steps or 0
        if rq > q * (1 + 1e-12) or rs > steps:
            logger.warning(
                "a silo reports q %.4g x %d steps beyond the plan (%.4g x %d): charged",
                rq,
                rs,
                q,
                steps,
            )
            q, steps = max(q, rq), max(steps, rs)
    return MechanismStep(plan.noise_multiplier, q, steps)


def charge_round(
    accountant: PrivacyAccountant,
    plan: DPPlan,
    *,
    server_round: int,
    invited: int,
    participated: int,
    step: MechanismStep,
) -> PrivacyRound:
    """Charge round ``server_round`` on ``accountant`` (when anything came back) and record it.

    ``step`` is what the round released (:func:`client_round_step`, :func:`example_round_step`);
    it is charged only when ``participated > 0``. The round's epsilon is RDP, except at the
    plan's last round, where it is the PRV epsilon of the whole run.
    """
    released = participated > 0
    if released:
        accountant.step(step)
    else:  # nothing left the server: no charge, the configured z and the plan's shape recorded
        step = MechanismStep(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    epsilon_rdp = accountant.epsilon_rdp
    last = server_round == plan.rounds
    record = PrivacyRound(
        round=server_round,
        sample_rate=step.sample_rate,
        invited=invited,
        participated=participated,
        expected_participants=plan.expected_participants,
        clip=plan.clip,
        noise_multiplier=plan.noise_multiplier,
        effective_noise_multiplier=step.noise_multiplier,
        steps=step.steps,
        released=released,
        epsilon=accountant.epsilon_prv() if last else epsilon_rdp,
        epsilon_accountant="prv" if last else "rdp",
        epsilon_rdp=epsilon_rdp,
    )
    logger.info(
        "round %d: %s DP, clip %.3g, z %.3g (effective %.3g), q %.3g x %d steps, "
        "epsilon %.4g (RDP %.4g), delta %.3g",
        server_round,
        plan.mode.value,
        plan.clip,
        plan.noise_multiplier,
        record.effective_noise_multiplier,
        record.sample_rate,
        record.steps,
        record.epsilon,
        record.epsilon_rdp,
        plan.delta,
    )
    return record


def resume_accountant(plan: DPPlan, records: Iterable[Mapping[str, Any]]) -> PrivacyAccountant:
    """The accountant of a run that already ran the rounds of ``records`` (their ledger records,
    :meth:`PrivacyRound.to_record`): each released round's charged step, composed again."""
    history = [
        MechanismStep(
            float(rec["effective_noise_multiplier"]), float(rec["sample_rate"]), int(rec["steps"])
        )
        for rec in records
        if rec["released"]
    ]
    return PrivacyAccountant(delta=plan.delta, history=history)


NOISE_OS_ENTROPY = "os-entropy"
"""The header's ``noise``: every client draws its DP noise from operating-system entropy."""
NOISE_SEEDED = "seeded, not private"
"""The header's ``noise`` under ``privacy.noise_seed`` (a repeatable simulation)."""


def ledger_header(*, run_id: str, cfg: RunConfig, plan: DPPlan) -> dict[str, Any]:
    """The header of a run's ledger (:meth:`common.privacy.ledger.LedgerWriter.create`).

    ``noise`` says where the clients' DP noise comes from (:data:`NOISE_OS_ENTROPY`, or
    :data:`NOISE_SEEDED` with the seed in ``noise_seed``), so an auditor sees a seeded run.
    """
    seed = cfg.privacy.noise_seed
    if seed is not None:
        logger.warning(
            "privacy.noise_seed = %d: the DP noise is seeded, so this run is repeatable and NOT "
            "private (simulations only)",
            seed,
        )
    return {
        "run_id": run_id,
        "code_version": f"fedrec {version('fedrec')}",
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "population": plan.population,
        "delta": plan.delta,
        "accountant": AccountantKind.PRV.value,
        "mode": plan.mode.value,
        "noise": NOISE_OS_ENTROPY if seed is None else NOISE_SEEDED,
        "noise_seed": seed,
    }


def privacy_summary(plan: DPPlan, last: Mapping[str, Any] | None) -> dict[str, Any]:
    """``final.privacy`` of ``results.json``: the plan and the last round's claims (``last``: its
    ledger record; ``None`` when no round ran)."""
    return {
        "epsilon": 0.0 if last is None else float(last["epsilon"]),
        "epsilon_rdp": 0.0 if last is None else float(last["epsilon_rdp"]),
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "clip": plan.clip,
        "sample_rate": plan.sample_rate,
        "steps_per_round": plan.steps_per_round,
        "mode": plan.mode.value,
        "accountant": AccountantKind.PRV.value,
    }

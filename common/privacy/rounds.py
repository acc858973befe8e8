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

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from common.config import to_dict
from common.privacy.accounting import (
    AccountantKind,
    AggregatorView,
    MechanismStep,
    PrivacyAccountant,
    aggregator_noise_multiplier,
)
from common.privacy.mechanism import effective_noise_multiplier
from common.privacy.plan import RELEASE_NAMES, DPPlan
from common.run.config import RunConfig
from common.run.owner import config_hash

__all__ = [
    "NOISE_OS_ENTROPY",
    "NOISE_SEEDED",
    "PrivacyRound",
    "ReleaseWithheldError",
    "aggregator_noise_multiplier_of",
    "charge_aggregator",
    "charge_release",
    "charge_round",
    "check_release_participation",
    "client_round_step",
    "example_round_step",
    "ledger_header",
    "privacy_summary",
    "release_noise_multipliers",
    "release_plan",
    "resume_accountant",
    "resume_aggregator",
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
    release: str | None = None
    """A warm-start release (:data:`common.privacy.plan.RELEASE_NAMES`; :attr:`round` is then
    its position, 1 or 2), written as a ``release`` line; ``None`` for a training round."""
    participants: tuple[int, ...] | None = None
    """Positions (canonical order) of the clients whose update entered the sum; ``None`` when
    not recorded."""
    epsilon_aggregator: float | None = None
    """The largest epsilon of any client against the aggregator after this line
    (:class:`common.privacy.accounting.AggregatorView`)."""

    def to_record(self) -> dict[str, Any]:
        """The ledger's round record (plain JSON types), in the ledger's field order."""
        head: dict[str, Any] = {} if self.release is None else {"release": self.release}
        return {
            **head,
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
            **({} if self.participants is None else {"participants": list(self.participants)}),
            **(
                {}
                if self.epsilon_aggregator is None
                else {"epsilon_aggregator": self.epsilon_aggregator}
            ),
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


def release_noise_multipliers(plan: DPPlan | None) -> dict[str, float]:
    """Each warm-start release's z by name; 0 for each without DP (``plan`` ``None``), none
    for a plan without a warm start."""
    if plan is None:
        return dict.fromkeys(RELEASE_NAMES, 0.0)
    return dict(zip(RELEASE_NAMES, plan.release_noise_multipliers, strict=False))


def release_plan(plan: DPPlan, name: str) -> DPPlan:
    """The plan of the warm-start release ``name``: all N clients asked (q = 1, fixed
    denominator N) at its z and clip 1 (a statistic's norm bound); delta and population are the
    run's."""
    z = plan.release_noise_multiplier(name)
    return dataclasses.replace(
        plan,
        noise_multiplier=z,
        clip=1.0,
        sample_rate=1.0,
        expected_participants=float(plan.population),
        accounting_noise_multiplier=z,
        rounds=len(RELEASE_NAMES),
    )


class ReleaseWithheldError(RuntimeError):
    """Too few clients answered a warm-start release: its sum is not released (decrypted)."""


def check_release_participation(plan: DPPlan, *, name: str, participated: int) -> None:
    """Raise :class:`ReleaseWithheldError` unless at least ``ceil(f N)`` clients answered.

    The release's z was calibrated for that many answers (its noise falls with fewer), so the
    server withholds a sum with fewer: the test that keeps the epsilon within the target.
    """
    needed = plan.release_min_clients
    if participated < needed:
        raise ReleaseWithheldError(
            f"warm-start release {name}: {participated} of {plan.population} clients answered, "
            f"it needs {needed} (warm_start.min_participation "
            f"{plan.release_min_participation:g}); the sum is withheld"
        )


def charge_release(
    accountant: PrivacyAccountant,
    plan: DPPlan,
    *,
    name: str,
    invited: int,
    participated: int,
) -> PrivacyRound:
    """Charge the warm-start release ``name`` (when anything came back) and record it.

    The release is one Gaussian step at sample rate 1 whose noise, relative to the clip, is
    ``z * sqrt(k / N)`` for ``k`` of the ``N`` clients answering (:func:`release_plan`). Its
    epsilon is RDP (the PRV figure comes with the last round), PRV for the last release of a
    run without rounds.
    """
    if name not in RELEASE_NAMES:
        raise ValueError(f"unknown release {name!r} (expected one of {RELEASE_NAMES})")
    rplan = release_plan(plan, name)
    step = client_round_step(rplan, participated=participated)
    released = participated > 0
    if released:
        accountant.step(step)
    else:
        step = MechanismStep(rplan.noise_multiplier, 1.0, 1)
    epsilon_rdp = accountant.epsilon_rdp
    last = plan.rounds == 0 and name == RELEASE_NAMES[-1]  # no round follows: the PRV claim
    record = PrivacyRound(
        round=RELEASE_NAMES.index(name) + 1,
        sample_rate=1.0,
        invited=invited,
        participated=participated,
        expected_participants=rplan.expected_participants,
        clip=rplan.clip,
        noise_multiplier=rplan.noise_multiplier,
        effective_noise_multiplier=step.noise_multiplier,
        steps=1,
        released=released,
        epsilon=accountant.epsilon_prv() if last else epsilon_rdp,
        epsilon_accountant="prv" if last else "rdp",
        epsilon_rdp=epsilon_rdp,
        release=name,
    )
    logger.info(
        "release %s: clip %.3g, z %.3g (effective %.3g), %d of %d clients, epsilon (RDP) %.4g",
        name,
        rplan.clip,
        rplan.noise_multiplier,
        step.noise_multiplier,
        participated,
        invited,
        epsilon_rdp,
    )
    return record


def charge_aggregator(
    view: AggregatorView,
    record: PrivacyRound,
    *,
    participants: Sequence[int],
    encrypted: bool,
) -> PrivacyRound:
    """``record`` with its ``participants`` and the aggregator-view epsilon after it, having
    added the line to ``view`` (:class:`common.privacy.accounting.AggregatorView`)."""
    kept = tuple(sorted(int(p) for p in participants))
    if len(kept) != record.participated:
        raise ValueError(f"{len(kept)} participants listed, the record has {record.participated}")
    if record.released and kept:
        view.add(kept, aggregator_noise_multiplier_of(record.to_record(), encrypted=encrypted))
    return dataclasses.replace(record, participants=kept, epsilon_aggregator=view.epsilon())


def aggregator_noise_multiplier_of(record: Mapping[str, Any], *, encrypted: bool) -> float:
    """The noise multiplier the aggregator saw for a ledger ``record`` (round or release)."""
    return aggregator_noise_multiplier(
        effective_noise_multiplier=float(record["effective_noise_multiplier"]),
        noise_multiplier=float(record["noise_multiplier"]),
        expected=float(record["expected_participants"]),
        encrypted=encrypted,
    )


def resume_aggregator(
    delta: float, records: Iterable[Mapping[str, Any]], *, encrypted: bool
) -> AggregatorView:
    """The aggregator view of a run that already wrote ``records`` (releases and rounds)."""
    view = AggregatorView(delta=delta)
    for rec in records:
        participants = rec.get("participants")
        if rec.get("released") and participants:
            view.add(participants, aggregator_noise_multiplier_of(rec, encrypted=encrypted))
    return view


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
        "release_noise_multipliers": release_noise_multipliers(plan),
        "mode": plan.mode.value,
        "accountant": AccountantKind.PRV.value,
        "epsilon_aggregator": None if last is None else last.get("epsilon_aggregator"),
    }

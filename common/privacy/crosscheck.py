"""The auditor's cross-checks of a ledger against the run's own config and partition.

The hash chain and the derived fields (:func:`common.privacy.ledger.round_problem`) catch an
edited line, but not a ledger that was rewritten consistently: re-planned for a smaller
population, charged at a larger noise multiplier than the run used, with rounds marked as
releasing nothing, a round removed, or a larger delta. The header carries the run's full config
(:func:`common.privacy.rounds.ledger_header` writes ``common.config.to_dict(cfg)``), so the
auditor plans the run again from it (:func:`common.privacy.plan_privacy`, recalibrating z when
the config gives a target epsilon) and checks every round against that plan:

- the config parses as a run config, and its ``privacy.mode`` is the header's mode;
- round numbers stay within ``rounds``, and a final line closes the run after exactly
  ``rounds`` rounds (fewer rounds and no final line is an unfinished run);
- delta is ``privacy.delta`` when the config sets it (then reported as a warning), otherwise
  the default 1/N^1.1 (:func:`common.privacy.default_delta`); either way it must be below 1/N;
- every round's ``noise_multiplier`` is the configured z, or the recalibrated one within the
  calibration's relative tolerance (:data:`CALIBRATION_TOLERANCE`); its ``clip`` is the
  configured C; at client level its ``sample_rate`` is ``server.sample_rate`` and no more clients
  were invited than the population holds; at example level (with a partition) its q and step
  count are at least the plan's bound;
- ``released`` is ``participated > 0``: a round is charged as soon as one update came back
  (:func:`common.privacy.rounds.charge_round`);
- warm-start releases (``release`` lines, :func:`common.privacy.rounds.charge_release`) only
  with ``warm_start.enabled``: then the releases of :data:`common.privacy.plan.RELEASE_NAMES`,
  in that order, all of them before round 1 and before the final line, each at sample rate 1
  over at most the population, clip 1 and the release z that the plan recalibrates (within
  :data:`CALIBRATION_TOLERANCE`), released (charged) whenever at least the plan's fewest
  answers (``warm_start.min_participation`` of N) came back, and never with no answer;
- the header's population is the partition's (clients, or users at example level), when the
  auditor has the partition (``RUN_DIR/data/clients.npz``, given explicitly: the auditor does not
  take it from the server's folder unasked); otherwise it is reported as not checked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import parse
from common.errors import ConfigError, DataError
from common.privacy.accounting import default_delta
from common.privacy.plan import RELEASE_NAMES, DPPlan, plan_privacy
from common.run.config import PrivacyMode, RunConfig

__all__ = [
    "CALIBRATION_TOLERANCE",
    "ConfigFindings",
    "check_against_config",
    "population_problem",
    "read_partition",
]

CALIBRATION_TOLERANCE = 0.01
"""Relative tolerance on a recalibrated noise multiplier: the calibration's own precision on z
(:func:`common.privacy.calibrate_noise_multiplier`), so another machine's numerics may land
anywhere in that bracket. A forger can therefore inflate a calibrated z by at most 1%."""

_REL_TOL = 1e-9  # configured values copied into every line


@dataclass
class ConfigFindings:
    """What :func:`check_against_config` found.

    Attributes
    ----------
    problem:
        The first inconsistency, in one line, or ``None``.
    detail:
        A one-line summary of what was checked (when there is no problem).
    warnings:
        What fails no check but an auditor must know (an explicit delta, what was not checked).
    """

    problem: str | None = None
    detail: str = ""
    warnings: list[str] = field(default_factory=list)


def read_partition(path: Path) -> list[int]:
    """Users per client of a prepared partition (``clients.npz`` of :mod:`common.run.folder`).

    Parameters
    ----------
    path:
        ``RUN_DIR/data/clients.npz``, the ``data`` folder holding it, or the run folder.

    Raises
    ------
    DataError
        If no partition file is there or it cannot be read.
    """
    path = Path(path)
    for candidate in (path, path / "clients.npz", path / "data" / "clients.npz"):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise DataError("no partition here (expected RUN_DIR/data/clients.npz)", path=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            offsets = np.asarray(z["offsets"])
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"cannot read the partition: {err}", path=path) from err
    sizes = np.diff(offsets)
    if offsets.ndim != 1 or len(offsets) < 2 or (sizes < 0).any():
        raise DataError("the partition's client offsets are malformed", path=path)
    return [int(n) for n in sizes]


def population_problem(header: Mapping[str, Any], sizes: Sequence[int]) -> str | None:
    """Whether the header's population is the partition's: clients at client level (and with
    DP off), users at example level. One line, or ``None``."""
    population = header["population"]
    if header["mode"] == PrivacyMode.EXAMPLE.value:
        users = int(sum(sizes))
        if population != users:
            return (
                f"header population {population} is not the partition's {users} users "
                f"({len(sizes)} silos)"
            )
        return None
    if population != len(sizes):
        return f"header population {population} is not the partition's {len(sizes)} clients"
    return None


def check_against_config(
    header: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    *,
    finished: bool,
    silo_sizes: Sequence[int] | None = None,
    releases: Sequence[Mapping[str, Any]] = (),
) -> ConfigFindings:
    """Cross-check a ledger's header and rounds against the header's config (module docstring).

    Parameters
    ----------
    header:
        The header record (already checked by :func:`common.privacy.ledger.header_problem`).
    rounds:
        The round records, numbered 1..n (already checked by ``round_problem``).
    finished:
        Whether the ledger has a final line.
    silo_sizes:
        Users per client of the run's partition, when the auditor has it: then the plan is made
        for the partition's population (and, at example level, its DP-SGD shape).
    releases:
        The warm-start release records, numbered 1..r before the rounds (already checked by
        :func:`common.privacy.ledger.release_problem`).
    """
    findings = ConfigFindings()
    try:
        cfg = parse(RunConfig, header["config"])
    except ConfigError as err:
        findings.problem = f"the header's config is not a run config: {err}"
        return findings
    findings.problem = _release_structure_problem(cfg, rounds, releases, finished) or _problem(
        cfg, header, rounds, finished, silo_sizes, findings.warnings, releases
    )
    if findings.problem is None:
        warm = (
            f"{len(releases)} of {len(RELEASE_NAMES)} warm-start releases at q 1, clip 1 and "
            "the planned z; "
            if cfg.warm_start.enabled
            else ""
        )
        findings.detail = (
            f"{warm}{len(rounds)} of {cfg.rounds} rounds at the config's C, z, q and delta; "
            "released whenever an update came back"
        )
    return findings


def _release_structure_problem(
    cfg: RunConfig,
    rounds: Sequence[Mapping[str, Any]],
    releases: Sequence[Mapping[str, Any]],
    finished: bool,
) -> str | None:
    """Whether the ledger holds the config's warm-start releases, in order, before the rounds
    (and all of them when a round or the final line follows)."""
    if not cfg.warm_start.enabled:
        if releases:
            return (
                f"the ledger holds {len(releases)} warm-start release(s), but the config has no "
                "warm start (warm_start.enabled is false)"
            )
        return None
    if len(releases) > len(RELEASE_NAMES):
        return (
            f"the ledger holds {len(releases)} warm-start releases, the warm start makes "
            f"{len(RELEASE_NAMES)}"
        )
    for i, rec in enumerate(releases):
        if rec["release"] != RELEASE_NAMES[i]:
            return (
                f"release {i + 1} is {rec['release']!r}, the warm start's release {i + 1} is "
                f"{RELEASE_NAMES[i]!r} (releases run in the order {', '.join(RELEASE_NAMES)})"
            )
    if len(releases) < len(RELEASE_NAMES) and (rounds or finished):
        after = "round 1 follows" if rounds else "the final line closes the run after"
        return (
            f"{after} {len(releases)} of the warm start's {len(RELEASE_NAMES)} releases "
            "(warm_start.enabled is true)"
        )
    return None


def _problem(
    cfg: RunConfig,
    header: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    finished: bool,
    silo_sizes: Sequence[int] | None,
    warnings: list[str],
    releases: Sequence[Mapping[str, Any]] = (),
) -> str | None:
    p = cfg.privacy
    if header["mode"] != p.mode.value:
        return f"header mode {header['mode']!r} is not the config's privacy.mode {p.mode.value!r}"
    for rec in rounds:
        if rec["round"] > cfg.rounds:
            return f"round {rec['round']} is beyond the config's {cfg.rounds} rounds"
    if finished and len(rounds) != cfg.rounds:
        return (
            f"the final line closes the run after {len(rounds)} rounds, the config has {cfg.rounds}"
        )
    if p.mode is PrivacyMode.OFF:
        if releases:  # the warm start charges nothing with DP off, so it writes no release
            return "the ledger holds warm-start releases, but the config's privacy.mode is 'off'"
        return None
    population: int = header["population"]
    problem = _delta_problem(header["delta"], p.delta, population, warnings)
    if problem is not None:
        return problem
    try:
        plan = _plan(cfg, population, silo_sizes, warnings)
    except ValueError as err:
        return f"the header's config cannot be planned for population {population}: {err}"
    for rec in releases:
        problem = _release_problem(rec, cfg, plan, population)
        if problem is not None:
            return problem
    for rec in rounds:
        problem = _round_problem(rec, cfg, plan, population)
        if problem is not None:
            return problem
    return None


def _delta_problem(
    delta: float, configured: float | None, population: int, warnings: list[str]
) -> str | None:
    default = default_delta(population) if population >= 2 else math.nan
    if configured is None:
        if not math.isclose(delta, default, rel_tol=_REL_TOL):
            return (
                f"header delta {delta:.6g} is not the default 1/N^1.1 = {default:.6g} "
                "(privacy.delta is not set)"
            )
    else:
        if not math.isclose(delta, configured, rel_tol=_REL_TOL):
            return f"header delta {delta:.6g} is not the config's privacy.delta {configured:.6g}"
        warnings.append(
            f"privacy.delta = {configured:.6g} set explicitly (the default 1/N^1.1 is "
            f"{default:.6g} for N = {population})"
        )
    if delta >= 1 / population:
        return (
            f"header delta {delta:.6g} is not below 1/N = {1 / population:.6g}: leaking one "
            "unit in N outright would meet it"
        )
    return None


def _plan(
    cfg: RunConfig, population: int, silo_sizes: Sequence[int] | None, warnings: list[str]
) -> DPPlan | None:
    """The plan the server must have made; ``None`` at example level without the partition
    (its q and step count depend on the silo sizes)."""
    if cfg.privacy.mode is PrivacyMode.CLIENT:
        return _plan_cached(cfg, population, None)
    if silo_sizes is None:
        unchecked = "q and steps" if cfg.privacy.noise_multiplier is not None else "z, q and steps"
        warnings.append(
            f"example-level {unchecked} not checked against the config: they depend on the silo "
            "sizes (give the partition)"
        )
        return None
    return _plan_cached(cfg, len(silo_sizes), tuple(silo_sizes))


@functools.lru_cache(maxsize=8)
def _plan_cached(cfg: RunConfig, population: int, silo_sizes: tuple[int, ...] | None) -> DPPlan:
    """:func:`plan_privacy`, remembered: a calibration costs seconds, and auditing one run twice
    (with and without a budget, or a device's record) should pay for it once."""
    plan = plan_privacy(cfg, population, silo_sizes=silo_sizes)
    assert plan is not None  # DP is on (checked by the caller)
    return plan


def _round_problem(
    rec: Mapping[str, Any], cfg: RunConfig, plan: DPPlan | None, population: int
) -> str | None:
    p, where = cfg.privacy, f"round {rec['round']}"
    participated, released = rec["participated"], rec["released"]
    if participated > 0 and not released:
        return (
            f"{where}: {participated} updates came back but released is false (charged as nothing)"
        )
    if participated == 0 and released:
        return f"{where}: released is true but no update came back"
    z = rec["noise_multiplier"]
    if p.noise_multiplier is not None:
        if not math.isclose(z, p.noise_multiplier, rel_tol=_REL_TOL):
            return f"{where}: noise_multiplier {z:.6g} is not the config's {p.noise_multiplier:.6g}"
    elif plan is not None and not math.isclose(
        z, plan.noise_multiplier, rel_tol=CALIBRATION_TOLERANCE
    ):
        return (
            f"{where}: noise_multiplier {z:.6g} is not the recalibrated "
            f"{plan.noise_multiplier:.6g} (target epsilon {p.target_epsilon:g}, "
            f"tolerance {CALIBRATION_TOLERANCE:.0%})"
        )
    if not math.isclose(rec["clip"], p.clip, rel_tol=_REL_TOL):
        return f"{where}: clip {rec['clip']:.6g} is not the config's {p.clip:.6g}"
    q = rec["sample_rate"]
    if p.mode is PrivacyMode.CLIENT:
        if not math.isclose(q, cfg.server.sample_rate, rel_tol=_REL_TOL):
            return (
                f"{where}: sample_rate {q:.6g} is not the config's server.sample_rate "
                f"{cfg.server.sample_rate:.6g}"
            )
        if rec["invited"] > population:
            return f"{where}: invited {rec['invited']} exceeds the population {population}"
    elif plan is not None:
        if q < plan.sample_rate * (1 - _REL_TOL):
            return f"{where}: sample_rate {q:.6g} is below the plan's bound {plan.sample_rate:.6g}"
        if rec["steps"] < plan.steps_per_round:
            return f"{where}: steps {rec['steps']} is below the plan's {plan.steps_per_round}"
    return None


def _release_problem(
    rec: Mapping[str, Any], cfg: RunConfig, plan: DPPlan | None, population: int
) -> str | None:
    """How a warm-start release differs from the one the plan makes (all N clients asked at
    q = 1, clip 1 and the release z: :func:`common.privacy.rounds.release_plan`), or ``None``."""
    where = f"release {rec['round']} ({rec['release']})"
    participated, released = rec["participated"], rec["released"]
    needed = 1 if plan is None else max(plan.release_min_clients, 1)
    if participated >= needed and not released:
        return (
            f"{where}: {participated} clients answered (the plan releases from {needed}) but "
            "released is false (charged as nothing)"
        )
    if participated == 0 and released:
        return f"{where}: released is true but no client answered"
    if not math.isclose(rec["sample_rate"], 1.0, rel_tol=_REL_TOL):
        return f"{where}: sample_rate {rec['sample_rate']:.6g} is not 1 (every client is asked)"
    if not math.isclose(rec["clip"], 1.0, rel_tol=_REL_TOL):
        return f"{where}: clip {rec['clip']:.6g} is not 1 (the statistics' norm bound)"
    if rec["invited"] > population:
        return f"{where}: invited {rec['invited']} exceeds the population {population}"
    z = None
    if plan is not None and plan.release_noise_multipliers and rec.get("release") in RELEASE_NAMES:
        z = plan.release_noise_multiplier(rec["release"])
    if z is None:  # warm start on, DP on: plan_privacy always plans the releases
        return f"{where}: the config's plan has no warm-start release"
    if not math.isclose(rec["noise_multiplier"], z, rel_tol=CALIBRATION_TOLERANCE):
        target = cfg.privacy.target_epsilon
        return (
            f"{where}: noise_multiplier {rec['noise_multiplier']:.6g} is not the recalibrated "
            f"release z {z:.6g} (warm_start.share {cfg.warm_start.share:g} of target epsilon "
            f"{target:g}, tolerance {CALIBRATION_TOLERANCE:.0%})"
        )
    return None

"""The report's privacy box: the plan and what was spent, and the auditor's verdict."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedrecError
from common.privacy import participation_factor
from common.privacy.audit import AuditStatus, verify_ledger
from common.privacy.ledger import LEDGER_FILENAME, read_ledger
from simulations.report.markup import _e, _fmt, _fmt_general, _table
from simulations.report.results import (
    MISSING,
    _dict,
    _epsilon_prv_series,
    _epsilon_rdp_series,
    _number,
    _release_epsilon,
    _releases,
    _rounds,
    _target_epsilon,
    _tracks_epsilon,
    _warm_only,
    _warm_start,
)

__all__: list[str] = []

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Audit:
    """The auditor's verdict on the run's ledger, for the privacy box."""

    verdict: str
    """``VERIFIED``, ``FAILED``, ``UNFINISHED`` or ``NOT CHECKED``."""
    reason: str
    warnings: tuple[str, ...] = ()
    """What the auditor flags without failing a check (e.g. seeded noise)."""


def _audit(run_dir: Path) -> _Audit | None:
    """:func:`verify_ledger` on ``RUN_DIR/ledger.jsonl``; ``None`` if the run kept no ledger."""
    path = run_dir / LEDGER_FILENAME
    if not path.exists():
        return None
    logger.info("auditing %s", path)
    try:
        report = verify_ledger(path)
    except Exception as err:  # the auditor must not take the report down with it
        logger.warning("%s: audit failed to run: %s", path, err)
        return _Audit("NOT CHECKED", f"the auditor could not run: {err}")
    warnings = tuple(str(w) for w in getattr(report, "warnings", ()))
    return _Audit(report.status.value.upper(), report.reason, warnings)


def _ledger_header(run_dir: Path) -> dict[str, Any]:
    """The header record of ``RUN_DIR/ledger.jsonl``; empty if absent or unreadable."""
    path = run_dir / LEDGER_FILENAME
    if not path.exists():
        return {}
    try:
        records = read_ledger(path)
    except (OSError, ValueError, FedrecError) as err:
        logger.warning("%s: cannot read the header: %s", path, err)
        return {}
    return next((r for r in records if r.get("type") == "header"), {})


def _privacy_facts(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What the privacy box shows, from the most to the least authoritative source: the final
    summary, the last round's ledger record, the ledger header, the config."""
    config = _dict(_dict(results.get("config")).get("privacy"))
    header = _ledger_header(run_dir)
    rounds = _rounds(results)
    ledgers = [_dict(r.get("ledger")) for r in rounds]
    last = ledgers[-1] if ledgers else {}
    final = _dict(_dict(results.get("final")).get("privacy"))
    facts: dict[str, Any] = {
        "mode": final.get("mode") or header.get("mode") or config.get("mode"),
        "target": _target_epsilon(results),
        "delta": final.get("delta", header.get("delta")),
        "noise_multiplier": final.get("noise_multiplier", last.get("noise_multiplier")),
        "clip": final.get("clip", last.get("clip", config.get("clip"))),
        "sample_rate": final.get("sample_rate", last.get("sample_rate")),
        "steps_per_round": final.get("steps_per_round", last.get("steps")),
        "expected": last.get("expected_participants"),
        "population": header.get("population", results.get("population")),
        "quantile": config.get("participation_quantile"),
        "rounds": len(rounds),
        "planned_rounds": _dict(results.get("config")).get("rounds"),
        "charged": sum(1 for r in ledgers if r.get("released")),
        "finished": bool(final),
        "noise": header.get("noise"),
        "releases": _releases(results),
        "release_z": final.get(
            "release_noise_multipliers", _warm_start(results).get("noise_multipliers")
        ),
        "release_epsilon": _release_epsilon(results),
        "warm_share": _dict(_dict(results.get("config")).get("warm_start")).get("share"),
        "warm_only": _warm_only(results),
    }
    participated = [_number(r.get("participated")) for r in ledgers]
    counts = [p for p in participated if p is not None]
    facts["mean_participated"] = sum(counts) / len(counts) if counts else None
    z_eff = [z for z in (_number(r.get("effective_noise_multiplier")) for r in ledgers) if z]
    facts["z_eff"] = (min(z_eff), max(z_eff)) if z_eff else None
    rdp = _epsilon_rdp_series(results)[1]
    prv = _epsilon_prv_series(results)[1]
    if final:
        facts["spent"], facts["accountant"] = final.get("epsilon"), "PRV"
        facts["rdp"] = final.get("epsilon_rdp")
    elif prv:
        facts["spent"], facts["accountant"], facts["rdp"] = prv[-1], "PRV", rdp[-1] if rdp else None
    elif rdp:  # a partial run: only the RDP claims so far
        facts["spent"], facts["accountant"], facts["rdp"] = rdp[-1], "RDP, so far", rdp[-1]
    elif facts["releases"]:  # a partial run: the warm start's releases, no round yet
        last_release = facts["releases"][-1]
        accountant = str(last_release.get("epsilon_accountant") or "rdp").upper()
        facts["spent"], facts["accountant"] = facts["release_epsilon"], f"{accountant}, so far"
        facts["rdp"] = last_release.get("epsilon_rdp")
    else:
        facts["spent"], facts["accountant"], facts["rdp"] = None, "RDP, so far", None
    return facts


def _warm_sentence(facts: Mapping[str, Any]) -> str:
    """What the warm start's releases spent before the rounds, for :func:`_why_below_target`."""
    released, share = _number(facts["release_epsilon"]), _number(facts["warm_share"])
    planned = "" if share is None else f", planned for warm_start.share = {share:g} of the target"
    spent = "" if released is None else f" ε {released:.3f} ({_accountant(facts)})"
    return (
        f" The warm start's {len(facts['releases'])} releases spent{spent} before round 1"
        f"{planned}; the rounds' z is calibrated on top of them, composed with the releases."
    )


def _accountant(facts: Mapping[str, Any]) -> str:
    """The accountant of the epsilon after the releases (``RDP`` or ``PRV``)."""
    releases = facts["releases"]
    name = releases[-1].get("epsilon_accountant") if releases else None
    return str(name or "rdp").upper()


def _why_below_target(facts: Mapping[str, Any]) -> str | None:
    """One sentence on why the run spent less than its target, or that it overshot."""
    target, spent = _number(facts["target"]), _number(facts["spent"])
    if target is None or spent is None or not facts["finished"]:
        return None
    if spent > target * (1 + 1e-9):
        return (
            f"The run spent more than its target (ε {spent:.3f} > {target:g}): a round had "
            "fewer participants than the calibration planned for, so it carried less noise."
        )
    if facts["warm_only"]:
        share = _number(facts["warm_share"])
        budget = "the target" if share is None else f"{share:g} × the target"
        return (
            "Why less than the target is spent: the run is the warm start alone, and z of its "
            "releases is the smallest noise multiplier (within 1%) whose ε after all of them "
            f"stays at or below {budget}."
        )
    suffix = _warm_sentence(facts) if facts["releases"] else ""
    if facts["mode"] == "client":
        n, q = _number(facts["population"]), _number(facts["sample_rate"])
        quantile = _number(facts["quantile"])
        if n is None or q is None or quantile is None:
            return None
        m = q * n
        factor = participation_factor(population=int(n), sample_rate=q, quantile=quantile)
        k = factor**2 * m
        mean = _number(facts["mean_participated"])
        seen = "" if mean is None else f" (this run averaged {mean:.1f})"
        return (
            f"Why less than the target is spent: the calibration plans for a low participation "
            f"quantile, a round with only k ≈ {k:.0f} of the m = {m:.1f} expected clients (the "
            f"{quantile:.1%} quantile of Binomial(N, q)), and scales z up by 1/√(k/m) = "
            f"{1 / factor:.3f}; rounds with more participants{seen} carry more noise than that "
            "floor and cost less, and z is rounded up within 1%."
        ) + suffix
    return (
        "Why less than the target is spent: z is the smallest noise multiplier (within 1%) whose "
        "ε after all rounds stays at or below the target, and every round is charged the plan's "
        "bound (the smallest silo's sample rate, the largest silo's step count)."
    ) + suffix


def _privacy_section(results: dict[str, Any], run_dir: Path) -> str:
    """``#privacy``: the privacy box."""
    facts = _privacy_facts(results, run_dir)
    mode = facts["mode"]
    audit = _audit(run_dir)
    if mode in (None, "off") and not _tracks_epsilon(results):
        verdict = (
            '<p class="verdict none">no privacy ledger: nothing to audit</p>'
            if audit is None
            else _verdict(audit)
        )
        return (
            '<section id="privacy" class="box"><h2>Privacy</h2>'
            '<p>Differential privacy is off (<code>privacy.mode = "off"</code>): the updates '
            "carry no noise and no privacy budget is tracked.</p>"
            f"{verdict}</section>"
        )
    unit = {"client": "clients", "example": "users"}.get(str(mode), "privacy units")
    described = {
        "client": "client-level DP-FedAvg (a privacy unit is one client)",
        "example": "example-level DP-SGD in silos (a privacy unit is one user)",
    }.get(str(mode), str(mode))
    spent = _number(facts["spent"])
    target = _number(facts["target"])
    spent_text = MISSING if spent is None else f"{spent:.3f} ({facts['accountant']})"
    if spent is not None and target:
        spent_text += f", {spent / target:.0%} of the target"
    z_eff = facts["z_eff"]
    warm_only = facts["warm_only"]
    rows = [
        ("mode", described),
        ("encrypted aggregation", _encryption_text(_dict(results.get("config")))),
        *([("noise source", str(facts["noise"]))] if facts["noise"] is not None else []),
        ("target ε", MISSING if target is None else f"{target:g}"),
        ("ε spent", spent_text),
        ("ε RDP (cross-check)", _fmt(_number(facts["rdp"]), 3)),
        ("δ", _fmt_general(facts["delta"])),
    ]
    releases = facts["releases"]
    if releases:
        rows.append(("warm-start releases", _releases_text(facts)))
    if warm_only:  # no round: the per-round parameters were never used
        rows.append(("clip C", _fmt_general(facts["clip"])))
    else:
        rows += [
            ("noise multiplier z", _fmt_general(facts["noise_multiplier"])),
            (
                "effective z per round",
                MISSING if z_eff is None else f"{z_eff[0]:.4g} – {z_eff[1]:.4g}",
            ),
            ("clip C", _fmt_general(facts["clip"])),
            ("sample rate q", _fmt_general(facts["sample_rate"])),
        ]
        if mode == "example":
            rows.append(("DP-SGD steps per round", _fmt(facts["steps_per_round"])))
        else:
            rows.append(("expected participants m = qN", _fmt_general(facts["expected"])))
            mean = _fmt(_number(facts["mean_participated"]), 1)
            rows.append(("mean participants per round", mean))
    population = facts["population"]
    rows.append(("population N", MISSING if population is None else f"{_fmt(population)} {unit}"))
    planned = facts["planned_rounds"]
    rows.append(
        (
            "rounds",
            "none: warm start only"
            if warm_only
            else f"{facts['rounds']:,} of {_fmt(planned)} ({facts['charged']:,} charged)",
        )
    )
    if releases:
        composed = f"{len(releases):,} releases + {facts['charged']:,} rounds"
        rows.append(("composition", composed + (" (warm start only)" if warm_only else "")))
    if mode == "client" and target is not None and not warm_only:
        quantile = _number(facts["quantile"])
        planned_q = MISSING if quantile is None else f"{quantile:.1%} of Binomial(N, q)"
        rows.append(("calibrated for participation quantile", planned_q))
    table = _table(
        ["", "value"], rows, key_column=True, attrs='id="privacy-facts"',
        text_columns=frozenset({1}),
    )  # fmt: skip
    verdict = (
        '<p class="verdict none">audit: NO LEDGER (RUN_DIR/ledger.jsonl is missing)</p>'
        if audit is None
        else _verdict(audit)
    )
    why = _why_below_target(facts)
    explanation = "" if why is None else f'<p class="note" id="why-below-target">{_e(why)}</p>'
    return (
        f'<section id="privacy" class="box"><h2>Privacy</h2>{table}{verdict}{explanation}</section>'
    )


_RELEASE_NAMES = {"popularity": "popularity", "cooccurrence": "co-occurrence"}


def _releases_text(facts: Mapping[str, Any]) -> str:
    """The warm start's releases in one cell: names, who took part, z and epsilon after them."""
    releases = facts["releases"]
    names = ", ".join(
        _RELEASE_NAMES.get(str(r.get("release")), str(r.get("release"))) for r in releases
    )
    counts = {_number(r.get("participated")) for r in releases}
    population = _number(facts["population"])
    if len(counts) == 1 and population is not None and counts == {population}:
        clients = f"all {_fmt(int(population))}"
    else:
        clients = "/".join(_fmt(r.get("participated")) for r in releases)
    zs = _dict(facts["release_z"])
    z = " / ".join(f"{v:.4g}" for v in (_number(x) for x in zs.values()) if v is not None)
    released = _number(facts["release_epsilon"])
    return (
        f"{len(releases)} ({names}): sample rate 1, {clients} clients"
        + (f", z {z}" if z else "")
        + ("" if released is None else f", ε {released:.3f} ({_accountant(facts)}) after them")
    )


def _verdict(audit: _Audit) -> str:
    cls = {
        AuditStatus.VERIFIED.value.upper(): "verified",
        AuditStatus.FAILED.value.upper(): "failed",
        AuditStatus.UNFINISHED.value.upper(): "unfinished",
    }.get(audit.verdict, "none")
    warnings = "".join(
        f'<p class="verdict unfinished">warning: {_e(w)}</p>' for w in audit.warnings
    )
    return (
        f'<p class="verdict {cls}" id="audit">audit (fedrec audit verify): '
        f"{_e(audit.verdict)}: {_e(audit.reason)}</p>{warnings}"
    )


# ------------------------------------------------------------------------------- run summary


def _encryption_text(config: dict[str, Any]) -> str:
    """How the run encrypted: off, threshold (t of n key holders) or single key."""
    enc = _dict(config.get("encryption"))
    enabled = enc.get("enabled")
    if enabled is False:
        return "off"
    if enabled is not True:
        return MISSING
    if enc.get("mode", "threshold") == "single-key":
        return "on (CKKS, single-key mode: one secret key shared by the devices)"
    holders = enc.get("key_holders", 5)
    threshold = enc.get("threshold")
    if not isinstance(threshold, int) and isinstance(holders, int):
        threshold = holders // 2 + 1
    return (
        f"on (CKKS, threshold: any {threshold} of {holders} key holders decrypt; no one holds "
        "the key)"
    )

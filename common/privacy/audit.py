"""``fedrec audit verify``: check a run's privacy ledger and recompute its epsilon from it alone.

(Over 400 lines: the auditor's checks read in one place, in the order they run.)

The auditor trusts nothing the server computed. From ``RUN_DIR/ledger.jsonl`` (see
:mod:`common.privacy.ledger`) it checks, in order:

1. the file reads as complete JSON lines (a cut last line fails);
2. the header is first, well formed and unique;
3. every ``prev`` is the SHA-256 of the previous line's bytes (an edited line changes its hash;
   a removed or reordered line breaks the link after it);
4. signatures (:mod:`common.privacy.signing`): when the header holds a ``server_key``, every
   line carries a valid server signature, and every committee co-signature of a round is valid,
   by a registered device key (when the auditor has the registry), and states that round's
   run, participant count and mechanism (a warm-start release line may be co-signed too; those
   are counted apart); an unsigned ledger passes with a warning, or fails with
   ``require_signed``;
5. the warm start's releases (``release`` lines, if any) are numbered 1..r and all come before
   round 1, rounds are numbered 1..n with no gap or duplicate, and a final line, if any, is
   last;
6. every release's and round's fields are in range and the derived ones agree (m = q * N and
   z_eff = z * sqrt(participated / m) at client level; a release is a client-level round at
   q = 1, :func:`common.privacy.ledger.release_problem`), so editing a count and rewriting the
   whole chain still fails;
7. the final line has ``rounds == n``, the right ``chain``, and repeats the last round's claims
   (the last release's in a run of 0 rounds);
8. the header's population is the partition's, when given, and every release and round agrees
   with the header's config: mode, number of rounds, delta, z (recalibrated for a target
   epsilon), C, q, and ``released`` whenever an update came back; the releases are exactly
   those of an enabled warm start, in order, at q 1, clip 1 and the planned release z
   (:mod:`common.privacy.crosscheck`), so a ledger rewritten consistently with the project's own
   code still fails;
9. a device's own record (``device_ledger``), when given: every round it took part in is in the
   ledger with the same mechanism, and its committee co-signatures are in the ledger's lines;
10. RDP epsilon, recomputed line by line from the effective multipliers (the releases composed
   first, then the rounds), equals every release's and round's claimed ``epsilon_rdp`` to
   ``tolerance`` (relative), and claimed PRV epsilons never decrease (beyond
   ``PRV_EPSILON_SLACK``);
11. PRV epsilon (the reported one), recomputed once for the whole run (releases and rounds), is
   not above the last line's (round's, or release's in a run of 0 rounds) and the final line's
   claim by more than PRV's numerical error;
12. the recomputed PRV epsilon is within ``budget``, if one is given.

Cost. PRV composition of n heterogeneous rounds is expensive and recomputing it at every round
would be O(n^2), so PRV is recomputed once, at the last round; intermediate PRV claims are only
checked to be non-decreasing. RDP is cheap and incremental (one RDP curve per distinct
(z_eff, q), summed), so every round's RDP claim is checked. Rounds with equal (z_eff, q) are
merged before composing, which is exact: composition is commutative. Accounting is skipped once
an integrity check (1-9) fails; the numbers of an altered ledger mean nothing.

Known limit: a ledger cut right after a round line, with its final line (and maybe more rounds)
removed, is indistinguishable from a run that is still going or crashed; it reports
``UNFINISHED``, never ``VERIFIED``, and its epsilon covers only the rounds that remain.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.privacy.accounting import (
    PRV_EPS_ERROR,
    AccountantKind,
    AggregatorView,
    MechanismStep,
    PrivacyAccountant,
    compute_epsilon,
    merged_history,
)
from common.privacy.crosscheck import check_against_config, population_problem, read_partition
from common.privacy.device import device_ledger_problem, read_device_ledger
from common.privacy.ledger import (
    LEDGER_FILENAME,
    SIGNATURES_FIELD,
    LedgerLine,
    LedgerMode,
    chain_digest,
    header_problem,
    history_from_ledger,
    read_ledger_lines,
    release_problem,
    round_problem,
    signed_body,
)
from common.privacy.plan import RELEASE_NAMES
from common.privacy.rounds import aggregator_noise_multiplier_of
from common.privacy.signing import (
    DEVICE_REGISTRY_FILE,
    SIGNING_DIR,
    Cosignature,
    cosignature_problem,
    read_device_registry,
    verify_signature,
)

__all__ = [
    "PRV_EPSILON_SLACK",
    "UNFINISHED_REASON",
    "AuditReport",
    "AuditStatus",
    "render",
    "verify_ledger",
]

PRV_EPSILON_SLACK = 2 * PRV_EPS_ERROR
"""How far a claimed PRV epsilon may sit below the recomputed one: twice the PRV accountant's
``eps_error``. Each PRV value is an upper bound within ``2 * eps_error`` of the true epsilon, so
two honest computations (e.g. with rounds merged differently) differ by less than this."""

UNFINISHED_REASON = "ledger has no final line: the run is unfinished (or its end was cut off)"


class AuditStatus(StrEnum):
    """Outcome of :func:`verify_ledger`."""

    VERIFIED = "verified"
    """Every check passed and the run ended with a final line."""
    UNFINISHED = "unfinished"
    """Every check passed, but there is no final line."""
    FAILED = "failed"
    """At least one check failed; ``reason`` is the first failure."""


@dataclass
class AuditReport:
    """What :func:`verify_ledger` found.

    Attributes
    ----------
    status:
        Verified, unfinished or failed.
    reason:
        One line: the first failed check, why the run is unfinished, or a summary.
    rounds:
        Round records read (released or not).
    releases:
        Warm-start release records read (composed before the rounds).
    claimed_epsilon:
        The ledger's reported (PRV) epsilon: the final line's, else the last round's; ``inf``
        when DP is off.
    recomputed_epsilon_prv, recomputed_epsilon_rdp:
        Epsilon recomputed from the ledger; ``inf`` when DP is off, ``nan`` when not computed
        (an earlier check failed).
    recomputed_epsilon_aggregator:
        The largest epsilon of any client against the aggregator, recomputed from the lines'
        participants (``nan`` when they list none).
    delta:
        The header's delta (``nan`` if unreadable).
    budget:
        The epsilon budget checked against, if any.
    checks:
        ``(name, passed, detail)`` for each check run, in order.
    warnings:
        What the auditor should know that fails no check (seeded, non-private noise, an
        unsigned ledger, what could not be checked).
    signed:
        Whether every line carries a valid server signature.
    cosigned_rounds:
        Round lines co-signed by their decryption committee (valid co-signatures).
    cosigned_releases:
        Release lines co-signed by their decryption committee (valid co-signatures).
    """

    status: AuditStatus
    reason: str
    rounds: int = 0
    claimed_epsilon: float = math.nan
    recomputed_epsilon_prv: float = math.nan
    recomputed_epsilon_rdp: float = math.nan
    recomputed_epsilon_aggregator: float = math.nan
    delta: float = math.nan
    budget: float | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    signed: bool = False
    cosigned_rounds: int = 0
    releases: int = 0
    cosigned_releases: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able dict; a non-finite epsilon becomes ``null`` (see ``status``/``mode``)."""
        return {
            "status": self.status.value,
            "reason": self.reason,
            "rounds": self.rounds,
            "releases": self.releases,
            "claimed_epsilon": _finite_or_none(self.claimed_epsilon),
            "recomputed_epsilon_prv": _finite_or_none(self.recomputed_epsilon_prv),
            "recomputed_epsilon_rdp": _finite_or_none(self.recomputed_epsilon_rdp),
            "recomputed_epsilon_aggregator": _finite_or_none(self.recomputed_epsilon_aggregator),
            "unbounded": math.isinf(self.recomputed_epsilon_prv),
            "delta": _finite_or_none(self.delta),
            "budget": self.budget,
            "checks": [
                {"name": name, "passed": passed, "detail": detail}
                for name, passed, detail in self.checks
            ],
            "warnings": list(self.warnings),
            "signed": self.signed,
            "cosigned_rounds": self.cosigned_rounds,
            "cosigned_releases": self.cosigned_releases,
        }


def _rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def _composed(releases: int, rounds: int) -> str:
    """What was composed: ``"40 rounds"``, or ``"2 releases + 40 rounds"`` with a warm start."""
    if not releases:
        return _rounds(rounds)
    return f"{releases} release{'' if releases == 1 else 's'} + {_rounds(rounds)}"


def _where(rec: dict[str, Any]) -> str:
    """Where a claim is: ``"round 3"``, or ``"release 1 (popularity)"``."""
    if rec.get("type") == "release":
        return f"release {rec['round']} ({rec['release']})"
    return f"round {rec['round']}"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def verify_ledger(
    path: Path,
    *,
    budget: float | None = None,
    tolerance: float = 1e-6,
    on_progress: Callable[[str], None] | None = None,
    partition: Path | None = None,
    device_keys: Path | None = None,
    device_ledger: Path | None = None,
    require_signed: bool = False,
    server_key: str | None = None,
) -> AuditReport:
    """Check a ledger's integrity and recompute its epsilon (see the module docstring).

    Parameters
    ----------
    path:
        A run folder (its ``ledger.jsonl`` is read) or the ledger file itself.
    budget:
        Epsilon budget; a recomputed PRV epsilon above it fails. ``None``: no budget check.
    tolerance:
        Relative tolerance for the recomputed RDP epsilon of every round (default 1e-6).
    on_progress:
        Called with a short description of each slow step as it starts (reading the ledger,
        recomputing RDP, recomputing PRV), e.g. to tell a user what a long audit is doing.
    partition:
        The run's partition (``RUN_DIR/data/clients.npz``, its folder or the run folder), for
        checking the header's population; ``None``: the population is reported as not checked.
    device_keys:
        The registered device public keys (:func:`common.privacy.signing.read_device_registry`)
        that committee co-signatures must come from; default ``signing/devices.json`` beside the
        ledger when there is one, else co-signatures are checked against the keys they carry.
    device_ledger:
        A device's own record (``HISTORY.csv.fedrec-ledger.json``) to check against the ledger.
    require_signed:
        Fail an unsigned ledger (by default it passes with a warning).
    server_key:
        The server's ledger key (hex) as the auditor got it from the operator, not from the
        ledger: the header's ``server_key`` must be it (implies ``require_signed``).

    Returns
    -------
    AuditReport
        Never raises for a bad ledger: problems become ``FAILED`` with a one-line reason.

    Raises
    ------
    ValueError
        If ``budget`` is not a finite number > 0 or ``tolerance`` not a finite number >= 0.
    DataError
        If ``partition``, ``device_keys`` or ``device_ledger`` is given but cannot be read.
    """
    if budget is not None and (not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_FILENAME
    audit = _Audit(path, budget=budget, tolerance=tolerance, on_progress=on_progress)
    audit.silo_sizes = None if partition is None else read_partition(Path(partition))
    registry = path.parent / SIGNING_DIR / DEVICE_REGISTRY_FILE
    if device_keys is not None or registry.is_file():
        audit.registry_path = Path(device_keys) if device_keys is not None else registry
        audit.registry = read_device_registry(audit.registry_path)
    if device_ledger is not None:
        audit.device_entries = read_device_ledger(Path(device_ledger))
    audit.require_signed = require_signed or server_key is not None
    audit.server_key = server_key
    return audit.run()


class _Audit:
    """One verification: collects checks; each ``_check_*`` returns whether it passed."""

    def __init__(
        self,
        path: Path,
        *,
        budget: float | None,
        tolerance: float,
        on_progress: Callable[[str], None] | None = None,
    ):
        self.path = path
        self.on_progress = on_progress
        self.report = AuditReport(status=AuditStatus.FAILED, reason="", budget=budget)
        self.tolerance = tolerance
        self.lines: list[LedgerLine] = []
        self.rounds: list[dict[str, Any]] = []
        self.releases: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self.silo_sizes: list[int] | None = None
        self.registry: dict[str, str] | None = None
        self.registry_path: Path | None = None
        self.device_entries: list[dict[str, Any]] | None = None
        self.require_signed = False
        self.server_key: str | None = None

    def run(self) -> AuditReport:
        report = self.report
        ok = self._check_readable() and self._check_header()
        if ok:
            header = self.lines[0].record
            self.mode = LedgerMode(header["mode"])
            report.delta = float(header["delta"])
            seed, privacy = header.get("noise_seed"), header["config"].get("privacy")
            if seed is None and isinstance(privacy, dict):
                seed = privacy.get("noise_seed")
            if seed is not None:  # privacy.noise_seed: a repeatable simulation
                report.warnings.append(
                    f"noise seeded (privacy.noise_seed = {seed}): a repeatable simulation, "
                    "not private"
                )
            # all integrity checks run (a full report), accounting only if they all pass
            integrity = [
                self._check_chain(),
                self._check_signatures(),
                self._check_structure(),
                self._check_round_fields(int(header["population"])),
            ]
            ok = all(integrity) and self._check_final()
            # the rounds against the run's own config and partition (common.privacy.crosscheck)
            ok = ok and all([self._check_population(header), self._check_config(header)])
            if ok and self.device_entries is not None:
                ok = self._check_device_ledger(header, self.device_entries)
            report.rounds, report.releases = len(self.rounds), len(self.releases)
            report.claimed_epsilon = self._claimed_epsilon()
        ok = ok and self._check_accounting()
        if ok and report.budget is not None:
            ok = self._check_budget(report.budget)
        failed = [detail for _, passed, detail in report.checks if not passed]
        if failed:
            report.status, report.reason = AuditStatus.FAILED, failed[0]
        elif self.final is None:
            report.status, report.reason = AuditStatus.UNFINISHED, UNFINISHED_REASON
        else:
            report.status = AuditStatus.VERIFIED
            report.reason = (
                f"all {len(report.checks)} checks passed: "
                f"{_composed(report.releases, report.rounds)}, epsilon "
                f"{report.recomputed_epsilon_prv:.6g} (PRV) at delta {report.delta:.3g}"
            )
        return report

    def _progress(self, step: str) -> None:
        if self.on_progress is not None:
            self.on_progress(step)

    def _add(self, name: str, passed: bool, detail: str) -> bool:
        self.report.checks.append((name, passed, detail))
        return passed

    # ---- integrity ---------------------------------------------------------------------------

    def _check_readable(self) -> bool:
        self._progress(f"reading and checking {self.path}")
        try:
            self.lines = read_ledger_lines(self.path)
        except DataError as err:
            return self._add("readable", False, str(err))
        return self._add("readable", True, f"{len(self.lines)} complete JSON lines")

    def _check_header(self) -> bool:
        problem = header_problem(self.lines[0].record)
        if problem is not None:
            return self._add("header", False, f"line 1: {problem}")
        for line in self.lines[1:]:
            if line.record.get("type") == "header":
                return self._add("header", False, f"line {line.number}: a second header")
        header = self.lines[0].record
        return self._add(
            "header", True, f"mode {header['mode']}, population {header['population']}"
        )

    def _check_chain(self) -> bool:
        for before, line in itertools.pairwise(self.lines):
            if line.record.get("prev") != before.sha256:
                return self._add(
                    "hash chain",
                    False,
                    f"line {line.number}: prev is not the SHA-256 of line {before.number} "
                    "(a line was edited, removed or reordered)",
                )
        return self._add("hash chain", True, f"{len(self.lines) - 1} links")

    def _check_signatures(self) -> bool:
        header, report = self.lines[0].record, self.report
        key = header.get("server_key")
        if key is None:
            signed = [line.number for line in self.lines if SIGNATURES_FIELD in line.record]
            if signed:
                return self._add(
                    "signatures",
                    False,
                    f"line {signed[0]}: signatures, but the header names no server_key",
                )
            if self.require_signed:
                return self._add("signatures", False, "the ledger is unsigned (no server_key)")
            report.warnings.append(
                "unsigned ledger (no server_key in the header): its hash chain shows edits, but "
                "anyone can rewrite and rehash it consistently"
            )
            return self._add("signatures", True, "unsigned (an older run)")
        if self.server_key is not None and key != self.server_key.strip().lower():
            return self._add(
                "signatures",
                False,
                f"the header's server_key {key[:16]}... is not the server key given",
            )
        registered = None if self.registry is None else set(self.registry.values())
        cosigned = rounds = cosigned_releases = releases = 0
        for line in self.lines:
            rec, where = line.record, f"line {line.number}"
            signatures = rec.get(SIGNATURES_FIELD)
            server = signatures.get("server") if isinstance(signatures, dict) else None
            if not isinstance(server, str):
                return self._add("signatures", False, f"{where}: no server signature")
            if not verify_signature(key, server, signed_body(rec)):
                return self._add(
                    "signatures",
                    False,
                    f"{where}: the server signature does not verify (the line was changed "
                    "after it was signed, or signed with another key)",
                )
            is_release = rec.get("type") == "release"
            rounds += rec.get("type") == "round"
            releases += is_release
            assert isinstance(signatures, dict)
            if "committee" in signatures:
                problem = _committee_problem(
                    signatures["committee"], rec, header=header, registered=registered
                )
                if problem is not None:
                    return self._add("signatures", False, f"{where}: {problem}")
                if is_release:
                    cosigned_releases += 1
                else:
                    cosigned += 1
        report.signed, report.cosigned_rounds = True, cosigned
        report.cosigned_releases = cosigned_releases
        if (cosigned or cosigned_releases) and registered is None:
            report.warnings.append(
                "committee co-signatures checked against the keys they carry only: no device "
                "key registry (give --device-keys)"
            )
        source = "" if self.registry_path is None else f", device keys of {self.registry_path}"
        warm = f"; {cosigned_releases} of {releases} releases co-signed" if releases else ""
        return self._add(
            "signatures",
            True,
            f"server key {key[:16]}...: all {len(self.lines)} lines signed; {cosigned} of "
            f"{rounds} rounds co-signed by their committee{warm}{source}",
        )

    def _check_structure(self) -> bool:
        for line in self.lines[1:]:
            rec, kind = line.record, line.record.get("type")
            if kind == "release":
                if self.final is not None or self.rounds:
                    after = "the final" if self.final is not None else f"round {len(self.rounds)}"
                    return self._add(
                        "round numbering",
                        False,
                        f"line {line.number}: a warm-start release after {after} (releases "
                        "come before round 1)",
                    )
                expected = len(self.releases) + 1
                if rec.get("round") != expected:
                    return self._add(
                        "round numbering",
                        False,
                        f"line {line.number}: release {rec.get('round')!r} where release "
                        f"{expected} was expected (a release was removed, duplicated or "
                        "reordered)",
                    )
                if expected > len(RELEASE_NAMES):
                    return self._add(
                        "round numbering",
                        False,
                        f"line {line.number}: release {expected}, but a warm start makes "
                        f"{len(RELEASE_NAMES)}",
                    )
                self.releases.append(rec)
            elif kind == "round":
                expected = len(self.rounds) + 1
                if self.final is not None:
                    return self._add(
                        "round numbering", False, f"line {line.number}: a round after the final"
                    )
                if rec.get("round") != expected:
                    return self._add(
                        "round numbering",
                        False,
                        f"line {line.number}: round {rec.get('round')!r} where round {expected} "
                        "was expected (a round was removed, duplicated or reordered)",
                    )
                self.rounds.append(rec)
            elif kind == "final":
                if self.final is not None:
                    return self._add("round numbering", False, f"line {line.number}: 2nd final")
                self.final = rec
            elif kind != "header":  # a second header is reported by _check_header
                return self._add(
                    "round numbering", False, f"line {line.number}: unknown type {kind!r}"
                )
        detail = f"rounds 1..{len(self.rounds)}"
        if self.releases:
            rounds = f"before {detail}" if self.rounds else "and no round"
            detail = f"releases 1..{len(self.releases)} {rounds}"
        return self._add("round numbering", True, detail)

    def _check_round_fields(self, population: int) -> bool:
        if self.releases and self.mode is not LedgerMode.CLIENT:
            return self._add(
                "round fields",
                False,
                f"warm-start releases in a ledger of mode {self.mode.value!r}: the releases are "
                "client-level DP",
            )
        for rec in self.releases:
            problem = release_problem(rec, population=population)
            if problem is not None:
                return self._add("round fields", False, problem)
        for rec in self.rounds:
            problem = round_problem(rec, mode=self.mode, population=population)
            if problem is not None:
                return self._add("round fields", False, problem)
        return self._add("round fields", True, "types, ranges and derived fields agree")

    def _check_final(self) -> bool:
        final = self.final
        if final is None:
            return self._add("final line", True, "absent: " + UNFINISHED_REASON)
        n = len(self.rounds)
        if final.get("rounds") != n:
            return self._add(
                "final line", False, f"final says {final.get('rounds')!r} rounds, ledger has {n}"
            )
        expected = chain_digest([line.sha256 for line in self.lines[:-1]])
        if final.get("chain") != expected:
            return self._add("final line", False, "final chain digest does not match the lines")
        lines = self.releases + self.rounds
        last = lines[-1] if lines else {"epsilon": 0.0, "epsilon_rdp": 0.0}
        whose = "last release's" if not self.rounds and self.releases else "last round's"
        if self.mode is LedgerMode.OFF:
            last = {"epsilon": None, "epsilon_rdp": None}
        for key in ("epsilon", "epsilon_rdp"):
            if final.get(key) != last[key]:
                return self._add(
                    "final line",
                    False,
                    f"final {key} {final.get(key)!r} is not the {whose} {last[key]!r}",
                )
        return self._add(
            "final line", True, f"{_composed(len(self.releases), n)}, chain digest matches"
        )

    def _check_population(self, header: dict[str, Any]) -> bool:
        population = header["population"]
        if self.silo_sizes is None:  # a note, not a warning: most audits have no partition
            return self._add(
                "population",
                True,
                f"{population}, not checked against the run's partition (give --partition)",
            )
        problem = population_problem(header, self.silo_sizes)
        if problem is not None:
            return self._add("population", False, problem)
        return self._add("population", True, f"{population}, as in the partition")

    def _check_config(self, header: dict[str, Any]) -> bool:
        self._progress("checking the rounds against the run's config")
        findings = check_against_config(
            header,
            self.rounds,
            finished=self.final is not None,
            silo_sizes=self.silo_sizes,
            releases=self.releases,
        )
        self.report.warnings.extend(findings.warnings)
        if findings.problem is not None:
            return self._add("config", False, findings.problem)
        return self._add("config", True, findings.detail)

    def _check_device_ledger(self, header: dict[str, Any], entries: list[dict[str, Any]]) -> bool:
        problem, checked = device_ledger_problem(header, self.lines, entries)
        if problem is not None:
            return self._add("device ledger", False, problem)
        return self._add(
            "device ledger", True, f"{checked} of the device's rounds match the ledger's lines"
        )

    def _claimed_epsilon(self) -> float:
        if self.mode is LedgerMode.OFF:
            return math.inf
        lines = self.releases + self.rounds
        source = self.final if self.final is not None else (lines or [{}])[-1]
        value = source.get("epsilon", 0.0)
        return float(value) if isinstance(value, int | float) else math.nan

    # ---- accounting --------------------------------------------------------------------------

    def _check_accounting(self) -> bool:
        report = self.report
        if self.mode is LedgerMode.OFF:
            report.recomputed_epsilon_prv = report.recomputed_epsilon_rdp = math.inf
            return self._add("epsilon", True, "DP is off: epsilon is unbounded")
        return self._check_rdp() and self._check_prv() and self._check_aggregator()

    def _check_aggregator(self) -> bool:
        """Recompute each line's aggregator-view epsilon from the lines' participants.

        Lines that list their participants (client level) compose, per client, the lines it
        took part in at sample rate 1 with the noise the aggregator saw (the sum's effective z
        when the header's config encrypts, else one client's own share): the largest epsilon
        of any client (:class:`common.privacy.accounting.AggregatorView`) must equal every
        claim. A ledger whose released lines list no participants (an older run) passes with
        a note."""
        lines = self.releases + self.rounds
        released = [rec for rec in lines if rec["released"]]
        if not released or all("participants" not in rec for rec in released):
            return self._add("aggregator epsilon", True, "not recorded (no participant lists)")
        config = self.lines[0].record["config"]
        encryption = config.get("encryption") if isinstance(config, dict) else None
        encrypted = isinstance(encryption, dict) and encryption.get("enabled") is True
        view = AggregatorView(delta=self.report.delta)
        recomputed = 0.0
        for rec in lines:
            where = _where(rec)
            participants = rec.get("participants")
            if rec["released"] and participants is None:
                return self._add("aggregator epsilon", False, f"{where}: no participant list")
            if rec["released"] and participants:
                view.add(participants, aggregator_noise_multiplier_of(rec, encrypted=encrypted))
                recomputed = view.epsilon()
            claimed = rec.get("epsilon_aggregator")
            if not isinstance(claimed, int | float) or not math.isclose(
                float(claimed), recomputed, rel_tol=1e-6, abs_tol=1e-9
            ):
                return self._add(
                    "aggregator epsilon",
                    False,
                    f"claimed epsilon_aggregator {claimed!r} differs from the recomputed "
                    f"{recomputed:.9g} at {where}",
                )
        if self.final is not None:
            claimed = self.final.get("epsilon_aggregator")
            if not isinstance(claimed, int | float) or not math.isclose(
                float(claimed), recomputed, rel_tol=1e-6, abs_tol=1e-9
            ):
                return self._add(
                    "aggregator epsilon",
                    False,
                    f"the final line claims epsilon_aggregator {claimed!r}, recomputed "
                    f"{recomputed:.9g}",
                )
        self.report.recomputed_epsilon_aggregator = recomputed
        seen = "the decrypted sums" if encrypted else "each client's own noise share"
        return self._add(
            "aggregator epsilon",
            True,
            f"{recomputed:.6g}: the most exposed client against the aggregator ({seen}, no "
            "amplification), matches every claim",
        )

    def _check_rdp(self) -> bool:
        composed = _composed(len(self.releases), len(self.rounds))
        self._progress(f"recomputing the RDP epsilon of {composed}")
        accountant = PrivacyAccountant(delta=self.report.delta)
        recomputed, previous_claim = 0.0, 0.0
        lines = self.releases + self.rounds  # composed in ledger order: releases first
        for rec in lines:
            where = _where(rec)
            if rec["released"]:
                accountant.step(history_from_ledger([rec])[0])
                recomputed = accountant.epsilon_rdp
            claimed = float(rec["epsilon_rdp"])
            if not math.isclose(claimed, recomputed, rel_tol=self.tolerance, abs_tol=1e-12):
                return self._add(
                    "rdp epsilon",
                    False,
                    f"claimed epsilon_rdp {claimed:.9g} differs from the recomputed "
                    f"{recomputed:.9g} at {where}",
                )
            if rec.get("epsilon_accountant", "prv") == "rdp":
                # a round that claims its RDP epsilon as "epsilon" must claim exactly that
                if not math.isclose(
                    float(rec["epsilon"]), recomputed, rel_tol=self.tolerance, abs_tol=1e-12
                ):
                    return self._add(
                        "rdp epsilon",
                        False,
                        f"claimed epsilon {rec['epsilon']:.9g} (RDP) differs from the "
                        f"recomputed {recomputed:.9g} at {where}",
                    )
                continue
            if rec["epsilon"] < previous_claim - PRV_EPSILON_SLACK:  # PRV's numerical noise
                return self._add(
                    "rdp epsilon",
                    False,
                    f"claimed epsilon {rec['epsilon']:.9g} at {where} is below the previous "
                    f"round's {previous_claim:.9g} (epsilon never decreases)",
                )
            previous_claim = rec["epsilon"]
        # the same number through the shared accounting code: catches a drift between the two
        whole = self._compute(AccountantKind.RDP)
        if not math.isclose(whole, recomputed, rel_tol=self.tolerance, abs_tol=1e-12):
            return self._add(
                "rdp epsilon",
                False,
                f"incremental RDP {recomputed:.9g} disagrees with compute_epsilon {whole:.9g}",
            )
        self.report.recomputed_epsilon_rdp = whole
        return self._add("rdp epsilon", True, f"{whole:.6g} matches all {len(lines)} claims")

    def _check_prv(self) -> bool:
        composed = _composed(len(self.releases), len(self.rounds))
        self._progress(f"recomputing the PRV epsilon of {composed} (this can take minutes)")
        try:
            recomputed = self._compute(AccountantKind.PRV)
        except ValueError as err:  # a grid too large: epsilon is far beyond any budget
            return self._add("prv epsilon", False, f"cannot recompute the PRV epsilon: {err}")
        self.report.recomputed_epsilon_prv = recomputed
        claims = [(_where(rec), rec) for rec in (self.releases + self.rounds)[-1:]]
        if self.final is not None:
            claims.append(("the final line", self.final))
        for where, rec in claims:
            claimed = float(rec["epsilon"])
            if claimed < recomputed - PRV_EPSILON_SLACK:
                return self._add(
                    "prv epsilon",
                    False,
                    f"claimed epsilon {claimed:.6g} is below the recomputed {recomputed:.6g} "
                    f"at {where}",
                )
        return self._add(
            "prv epsilon",
            True,
            f"recomputed {recomputed:.6g}, claimed {self.report.claimed_epsilon:.6g}",
        )

    def _compute(self, accountant: AccountantKind) -> float:
        history = merged_history(history_from_ledger(self.releases + self.rounds))
        return _epsilon(tuple(history), delta=self.report.delta, accountant=accountant)

    def _check_budget(self, budget: float) -> bool:
        epsilon = self.report.recomputed_epsilon_prv
        if math.isinf(epsilon):
            return self._add(
                "budget", False, f"DP is off: epsilon is unbounded, above the budget {budget:g}"
            )
        if epsilon > budget:
            return self._add(
                "budget", False, f"epsilon {epsilon:.6g} exceeds the budget {budget:g}"
            )
        return self._add("budget", True, f"epsilon {epsilon:.6g} <= budget {budget:g}")


def _committee_problem(
    committee: Any,
    line: dict[str, Any],
    *,
    header: dict[str, Any],
    registered: set[str] | None,
) -> str | None:
    """What is wrong with a round (or release) line's committee co-signatures, or ``None``."""
    kind = line.get("type")
    if kind not in ("round", "release") or not isinstance(committee, list) or not committee:
        return "committee co-signatures belong to a round or release line, as a non-empty list"
    keys, sums = set(), set()
    for record in committee:
        cosignature = Cosignature.from_record(record)
        if cosignature is None:
            return "a committee co-signature is malformed"
        problem = cosignature_problem(
            cosignature,
            line=line,
            run_id=header["run_id"],
            server_key=header["server_key"],
            delta=header["delta"],
        )
        if problem is not None:
            return f"a committee co-signature does not hold: {problem}"
        if registered is not None and cosignature.key not in registered:
            return f"co-signed by key {cosignature.key[:16]}..., not a registered device key"
        if cosignature.key in keys:
            return f"key {cosignature.key[:16]}... co-signs twice"
        keys.add(cosignature.key)
        sums.add(cosignature.statement["sum_sha256"])
    if len(sums) > 1:
        return "the committee's members state different sums"
    return None


@functools.lru_cache(maxsize=16)
def _epsilon(
    history: tuple[MechanismStep, ...], *, delta: float, accountant: AccountantKind
) -> float:
    """``compute_epsilon``, remembered: auditing one run twice (e.g. with and without a budget)
    pays for PRV once. Zero for an empty history (nothing released)."""
    if not history:
        return 0.0
    return float(compute_epsilon(history, delta=delta, accountant=accountant))


def render(report: AuditReport) -> str:
    """Human-readable report: status and reason, the epsilons, then one line per check."""

    def eps(value: float) -> str:
        if math.isnan(value):
            return "not computed"
        return "unbounded (DP off)" if math.isinf(value) else f"{value:.6g}"

    budget = "none" if report.budget is None else f"{report.budget:g}"
    warm = f"releases: {report.releases}    " if report.releases else ""
    lines = [
        f"{report.status.value.upper()}: {report.reason}",
        *(f"WARNING: {warning}" for warning in report.warnings),
        f"{warm}rounds: {report.rounds}    delta: {report.delta:.3g}    budget: {budget}",
        f"epsilon claimed: {eps(report.claimed_epsilon)}    recomputed PRV: "
        f"{eps(report.recomputed_epsilon_prv)}    RDP: {eps(report.recomputed_epsilon_rdp)}",
        *(
            []
            if math.isnan(report.recomputed_epsilon_aggregator)
            else [
                "epsilon against the aggregator (who knows who took part, no amplification): "
                f"{eps(report.recomputed_epsilon_aggregator)}"
            ]
        ),
        "checks:",
    ]
    lines += [
        f"  [{'ok' if passed else 'FAIL'}] {name}: {detail}"
        for name, passed, detail in report.checks
    ]
    return "\n".join(lines)

"""The privacy ledger: one hash-chained JSON line per round, written by the server.

(Over 400 lines: the file format, its validation and its writer are one contract, kept together.)

``RUN_DIR/ledger.jsonl`` is what a privacy auditor reads (``fedrec audit verify``, see
:mod:`common.privacy.audit`) to recompute epsilon without trusting the server's arithmetic.

Format (``format`` 1). Every line is canonical JSON (``sort_keys=True``, separators ``,`` and
``:``, no NaN or infinity) followed by ``\\n``. Every record carries ``prev``: the SHA-256 hex
digest of the exact bytes of the previous line without its newline (``"0" * 64`` for the header),
so editing, removing or reordering a line breaks the chain at the next line.

- ``header`` (first line, once): ``format``, ``run_id``, ``created`` (ISO 8601), ``code_version``,
  ``config``, ``population`` (N), ``delta``, ``accountant`` (``"prv"``, the reported one) and
  ``mode`` (``"client"``: client-level DP; ``"example"``: DP-SGD inside each silo; ``"off"``).
- ``round`` (rounds 1..n, consecutive): ``sample_rate`` q, ``invited``, ``participated``,
  ``expected_participants`` m = q * N, ``clip`` C, ``noise_multiplier`` z (configured),
  ``effective_noise_multiplier`` (z * sqrt(participated / m) at client level, docs/design.md,
  "One training round", step 6), ``steps`` (1 at client level; DP-SGD steps at example level),
  ``mechanism`` (``"subsampled-gaussian"``), ``released`` and the cumulative ``epsilon`` (PRV,
  claimed) and ``epsilon_rdp`` after this round. A round is released (charged) as soon as one
  update came back, even if the sum is then discarded (docs/design.md, "Privacy accounting"); a
  round in which none came back has ``released: false``, records the configured z and is not
  charged, so its epsilon equals the previous round's. With
  ``mode: "off"`` the epsilons are ``null`` (unbounded: JSON has no infinity).
- ``final`` (last line, once, at a clean end): ``rounds`` (n), ``epsilon``, ``epsilon_rdp`` and
  ``chain``: :func:`chain_digest` of the hashes of every line before it, header included.

Signatures (:mod:`common.privacy.signing`). A writer given a :class:`LineSigner` puts its public
key in the header (``server_key``, ``signature_scheme``) and signs every line: ``signatures`` is
``{"server": hex}`` over :func:`signed_body` (the canonical JSON of the line without
``signatures``), and a round line may add ``"committee"``: the decryption committee's
co-signatures of what it released. ``prev`` and ``chain`` hash the whole line, signatures
included. A ledger without ``server_key`` is unsigned (older runs).

A line is written with one ``os.write`` of its full bytes on an ``O_APPEND`` descriptor, then
``fsync``: a crash leaves at most one incomplete last line, which readers report as an error
rather than silently dropping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from common.errors import DataError
from common.privacy.accounting import AccountantKind, MechanismStep
from common.privacy.mechanism import effective_noise_multiplier
from common.privacy.plan import RELEASE_NAMES

__all__ = [
    "GENESIS_HASH",
    "LEDGER_FILENAME",
    "LEDGER_FORMAT",
    "MECHANISM",
    "SIGNATURES_FIELD",
    "LedgerLine",
    "LedgerMode",
    "LedgerWriter",
    "LineSigner",
    "canonical_json",
    "chain_digest",
    "header_problem",
    "history_from_ledger",
    "line_hash",
    "read_ledger",
    "read_ledger_lines",
    "release_problem",
    "round_problem",
    "signed_body",
]

LEDGER_FILENAME = "ledger.jsonl"
"""Name of the ledger inside a run folder."""

LEDGER_FORMAT = 1
"""Version of the line layout; bumped when a field changes meaning."""

GENESIS_HASH = "0" * 64
"""``prev`` of the header line."""

MECHANISM = "subsampled-gaussian"
"""The only mechanism recorded: the Poisson-subsampled Gaussian mechanism."""

SIGNATURES_FIELD = "signatures"
"""A line's signatures: ``{"server": hex, "committee": [...]}`` (not part of what is signed)."""

_REL_TOL = 1e-9  # for fields the server derives from others (m = q * N, z_eff)


class LineSigner(Protocol):
    """What signs a ledger's lines (:class:`common.privacy.signing.Ed25519Signer`)."""

    @property
    def scheme(self) -> str:
        """The header's ``signature_scheme`` (``"ed25519"``)."""
        ...

    @property
    def public_key(self) -> str:
        """The header's ``server_key``: the public key, hex."""
        ...

    def sign(self, message: bytes) -> str:
        """The hex signature of ``message``."""
        ...


class LedgerMode(StrEnum):
    """Which unit the differential privacy protects."""

    CLIENT = "client"
    """Client-level DP: one client's whole contribution per round (cross-device)."""
    EXAMPLE = "example"
    """Example (user) level DP-SGD inside each silo (cross-silo)."""
    OFF = "off"
    """No DP: epsilon is unbounded."""


@dataclass(frozen=True)
class LedgerLine:
    """One line of a ledger as read from disk.

    Attributes
    ----------
    number:
        1-based line number.
    raw:
        The exact bytes of the line, without its newline.
    record:
        The parsed JSON object.
    """

    number: int
    raw: bytes
    record: dict[str, Any]

    @property
    def sha256(self) -> str:
        """SHA-256 hex digest of :attr:`raw`: what the next line's ``prev`` must be."""
        return line_hash(self.raw)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Serialize ``obj`` the one way the ledger does: sorted keys, no spaces, no NaN/infinity."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as err:
        raise ValueError(f"ledger records must hold finite numbers only ({err})") from err
    return text.encode("utf-8")


def signed_body(record: Mapping[str, Any]) -> bytes:
    """What a line's signatures sign: its canonical JSON without the ``signatures`` field."""
    return canonical_json({k: v for k, v in record.items() if k != SIGNATURES_FIELD})


def line_hash(raw: bytes) -> str:
    """SHA-256 hex digest of one line's bytes (without the newline)."""
    return hashlib.sha256(raw).hexdigest()


def chain_digest(hashes: Sequence[str]) -> str:
    """The final line's ``chain``: SHA-256 hex of the ASCII concatenation of ``hashes``.

    ``hashes`` are the :func:`line_hash` hex digests of every line before the final one, header
    first, in file order, joined with no separator.
    """
    return hashlib.sha256("".join(hashes).encode("ascii")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def read_ledger_lines(path: Path) -> list[LedgerLine]:
    """Read every line of a ledger, keeping its exact bytes for hashing.

    Raises
    ------
    DataError
        ``"path:line: ..."`` for a line that is not a JSON object, an empty line, or a last line
        without its newline (the writer stopped mid-write or the file was truncated).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read the ledger: {err.strerror or err}", path=path) from err
    if not data:
        raise DataError("the ledger is empty", path=path)
    chunks = data.split(b"\n")
    complete, tail = chunks[:-1], chunks[-1]
    lines: list[LedgerLine] = []
    for number, raw in enumerate(complete, start=1):
        lines.append(LedgerLine(number, raw, _parse_line(path, number, raw)))
    if tail:
        raise DataError(
            f"incomplete last line ({len(tail)} bytes, no newline): the writer stopped mid-write "
            f"or the file was cut; truncate the file after line {len(complete)} to resume",
            path=path,
            line=len(complete) + 1,
        )
    return lines


def _parse_line(path: Path, number: int, raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise DataError("empty line", path=path, line=number)
    try:
        record = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"invalid JSON: {err}", path=path, line=number) from err
    if not isinstance(record, dict):
        raise DataError("a ledger line must be a JSON object", path=path, line=number)
    return record


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Parsed records of a ledger, in file order (see :func:`read_ledger_lines` for errors)."""
    return [line.record for line in read_ledger_lines(path)]


def history_from_ledger(records: Sequence[Mapping[str, Any]]) -> list[MechanismStep]:
    """One :class:`MechanismStep` per released round, with its EFFECTIVE noise multiplier.

    The effective multiplier (z * sqrt(participated / m) at client level) is what the released
    sum's noise actually was relative to the clip, so it, not the configured z, is charged.
    Rounds with ``released: false`` are skipped: nothing was released, nothing is charged.
    """
    return [
        MechanismStep(
            noise_multiplier=float(rec["effective_noise_multiplier"]),
            sample_rate=float(rec["sample_rate"]),
            steps=int(rec["steps"]),
        )
        for rec in records
        if rec.get("type") in ("release", "round") and rec.get("released") is True
    ]


# ----------------------------------------------------------------------------------------------
# Validation shared by the writer (raises) and the auditor (reports)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def header_problem(header: Mapping[str, Any]) -> str | None:
    """What is wrong with a header record, in one line, or ``None`` if it is well formed."""
    if header.get("type") != "header":
        return f"the first line has type {header.get('type')!r}, not 'header'"
    if header.get("format") != LEDGER_FORMAT:
        return f"header format {header.get('format')!r} is not {LEDGER_FORMAT}"
    for key in ("run_id", "created", "code_version"):
        if not isinstance(header.get(key), str):
            return f"header {key} must be a string"
    if not isinstance(header.get("config"), dict):
        return "header config must be an object"
    population: Any = header.get("population")
    if not _is_int(population) or population <= 0:
        return f"header population must be a positive integer, got {population!r}"
    delta: Any = header.get("delta")
    if not _is_number(delta) or not 0 < delta < 1:
        return f"header delta must be in (0, 1), got {delta!r}"
    if header.get("accountant") != AccountantKind.PRV.value:
        return f"header accountant must be 'prv', got {header.get('accountant')!r}"
    if header.get("mode") not in {m.value for m in LedgerMode}:
        return f"header mode must be one of client/example/off, got {header.get('mode')!r}"
    if header.get("prev") != GENESIS_HASH:
        return "header prev must be 64 zeros"
    server_key: Any = header.get("server_key")
    if server_key is not None or "signature_scheme" in header:
        scheme = header.get("signature_scheme")
        if scheme != "ed25519":
            return f"header signature_scheme must be 'ed25519', got {scheme!r}"
        if not (isinstance(server_key, str) and len(server_key) == 64 and _is_hex(server_key)):
            return "header server_key must be 64 hex digits (an Ed25519 public key)"
    return None


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def round_problem(rec: Mapping[str, Any], *, mode: LedgerMode, population: int) -> str | None:
    """What is wrong with a round record's fields, in one line, or ``None``.

    Checks types and ranges, and the fields the server derives: at client level m = q * N,
    ``steps == 1`` and z_eff = z * sqrt(participated / m) (so an edited ``participated`` is caught
    even if the forger rewrites the hash chain).
    """
    r: Any = rec.get("round")
    if not _is_int(r) or r < 1:
        return f"round number must be a positive integer, got {r!r}"
    where = f"round {r}"
    if not isinstance(rec.get("released"), bool):
        return f"{where}: released must be true or false"
    released: bool = rec["released"]
    if rec.get("mechanism") != MECHANISM:
        return f"{where}: mechanism must be {MECHANISM!r}, got {rec.get('mechanism')!r}"
    q: Any = rec.get("sample_rate")
    if not _is_number(q) or not 0 < q <= 1:
        return f"{where}: sample_rate must be in (0, 1], got {q!r}"
    for key in ("invited", "participated", "steps"):
        if not _is_int(rec.get(key)) or rec[key] < 0:
            return f"{where}: {key} must be a non-negative integer, got {rec.get(key)!r}"
    if rec["participated"] > rec["invited"]:
        return f"{where}: participated {rec['participated']} exceeds invited {rec['invited']}"
    m: Any = rec.get("expected_participants")
    if not _is_number(m) or m <= 0:
        return f"{where}: expected_participants must be > 0, got {m!r}"
    dp_on = mode is not LedgerMode.OFF
    value: Any
    for key in ("clip", "noise_multiplier", "effective_noise_multiplier"):
        value = rec.get(key)
        if not _is_number(value) or value < 0 or (dp_on and value == 0):
            bound = "> 0" if dp_on else ">= 0"
            return f"{where}: {key} must be a finite number {bound}, got {value!r}"
    for key in ("epsilon", "epsilon_rdp"):
        value = rec.get(key)
        if dp_on and (not _is_number(value) or value < 0):
            return f"{where}: {key} must be a finite number >= 0, got {value!r}"
        if not dp_on and value is not None:
            return f"{where}: {key} must be null (unbounded) when DP is off, got {value!r}"
    if released and rec["steps"] < 1:
        return f"{where}: a released round has steps >= 1, got {rec['steps']}"
    participants: Any = rec.get("participants")
    if participants is not None:
        if not isinstance(participants, list) or not all(
            _is_int(c) and 0 <= c < population for c in participants
        ):
            return f"{where}: participants must be client positions in [0, {population})"
        if participants != sorted(set(participants)):
            return f"{where}: participants must be sorted and unique"
        if len(participants) != rec["participated"]:
            return (
                f"{where}: {len(participants)} participants listed, participated is "
                f"{rec['participated']}"
            )
    value = rec.get("epsilon_aggregator")
    if value is not None and (not _is_number(value) or value < 0):
        return f"{where}: epsilon_aggregator must be a finite number >= 0, got {value!r}"
    if mode is LedgerMode.CLIENT:
        if not math.isclose(m, q * population, rel_tol=_REL_TOL):
            return f"{where}: expected_participants {m} is not sample_rate * population"
        if released and rec["steps"] != 1:
            return f"{where}: client-level DP releases one step per round, got {rec['steps']}"
        z_eff = effective_noise_multiplier(
            noise_multiplier=rec["noise_multiplier"], participated=rec["participated"], expected=m
        )
        if released and not math.isclose(
            rec["effective_noise_multiplier"], z_eff, rel_tol=_REL_TOL
        ):
            return (
                f"{where}: effective_noise_multiplier {rec['effective_noise_multiplier']} is not "
                f"noise_multiplier * sqrt(participated / expected_participants) = {z_eff}"
            )
    if mode is LedgerMode.EXAMPLE and rec["effective_noise_multiplier"] != rec["noise_multiplier"]:
        # each silo's DP-SGD noise is its own: how many silos returned does not change it
        return (
            f"{where}: example-level effective_noise_multiplier "
            f"{rec['effective_noise_multiplier']} must equal noise_multiplier "
            f"{rec['noise_multiplier']}"
        )
    return None


def release_problem(rec: Mapping[str, Any], *, population: int) -> str | None:
    """What is wrong with a warm-start release record, in one line, or ``None``.

    A release is a client-level round at sample rate 1 over all ``population`` clients: the
    round checks of :func:`round_problem` apply, plus its ``release`` name and ``q == 1``.
    """
    name = rec.get("release")
    position = rec.get("round")
    if name not in RELEASE_NAMES:
        return f"release {position!r}: release must be one of {RELEASE_NAMES}, got {name!r}"
    if position != RELEASE_NAMES.index(name) + 1:
        return f"release {name}: it is release {RELEASE_NAMES.index(name) + 1}, not {position!r}"
    if rec.get("sample_rate") != 1.0:
        return f"release {name}: sample_rate must be 1, got {rec.get('sample_rate')!r}"
    problem = round_problem(rec, mode=LedgerMode.CLIENT, population=population)
    return None if problem is None else f"release {name}: {problem}"


# ----------------------------------------------------------------------------------------------
# Writing


class LedgerWriter:
    """Appends records to a ledger, keeping the hash chain.

    Build one with :meth:`create` (new run) or :meth:`open_existing` (resume after a restart).
    Each append opens the file with ``O_APPEND``, writes the whole line in one ``os.write`` and
    ``fsync``-s before returning, so a record the server has logged is on disk.
    """

    def __init__(
        self,
        path: Path,
        *,
        header: dict[str, Any],
        hashes: list[str],
        rounds: int,
        signer: LineSigner | None = None,
        releases: int = 0,
    ):
        """Use :meth:`create` or :meth:`open_existing`; this does not touch the file."""
        self.path = Path(path)
        self.header = header
        self._hashes = hashes  # line_hash of every line so far, header first
        self._rounds = rounds
        self._releases = releases
        self._closed = False
        self._signer = signer

    @property
    def signed(self) -> bool:
        """Whether the lines are signed (the header holds the signer's key)."""
        return self._signer is not None

    @property
    def rounds(self) -> int:
        """Number of round records written so far (released or not)."""
        return self._rounds

    @property
    def mode(self) -> LedgerMode:
        """The header's DP mode."""
        return LedgerMode(self.header["mode"])

    @classmethod
    def create(
        cls, path: Path, header: Mapping[str, Any], *, signer: LineSigner | None = None
    ) -> LedgerWriter:
        """Start a new ledger at ``path`` (which must not exist) with its header line.

        Parameters
        ----------
        path:
            Usually ``RUN_DIR / LEDGER_FILENAME``; the parent folder is created.
        header:
            ``run_id``, ``code_version``, ``config``, ``population``, ``delta``, ``mode`` and
            optionally ``created`` (default: now, UTC) and ``accountant`` (default ``"prv"``).
            ``type``, ``format`` and ``prev`` are filled in.
        signer:
            Signs every line; its public key goes in the header. ``None``: an unsigned ledger.

        Raises
        ------
        ValueError
            If the header is malformed (the message names the field).
        FileExistsError
            If ``path`` exists: a ledger is never overwritten; resume with :meth:`open_existing`.
        """
        record: dict[str, Any] = {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "accountant": AccountantKind.PRV.value,
            **header,
            "type": "header",
            "format": LEDGER_FORMAT,
            "prev": GENESIS_HASH,
        }
        if isinstance(record.get("mode"), LedgerMode):
            record["mode"] = record["mode"].value
        if signer is not None:
            record["server_key"] = signer.public_key
            record["signature_scheme"] = signer.scheme
        problem = header_problem(record)
        if problem is not None:
            raise ValueError(problem)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = canonical_json(_signed(record, signer))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _write_all_once(fd, raw + b"\n")
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        return cls(path, header=record, hashes=[line_hash(raw)], rounds=0, signer=signer)

    @classmethod
    def open_existing(cls, path: Path, *, signer: LineSigner | None = None) -> LedgerWriter:
        """Continue an unfinished ledger after the last line, re-reading and checking its chain.

        ``signer`` must hold the header's ``server_key`` when the ledger is signed; an unsigned
        ledger stays unsigned (``signer`` is then not used), so that its lines stay alike.

        Raises
        ------
        DataError
            If the file is unreadable, has an incomplete last line, a broken chain, already
            has a final line (a finished run is never extended), or is signed with another key
            than ``signer``'s (or ``signer`` is ``None``).
        """
        path = Path(path)
        lines = read_ledger_lines(path)
        header = lines[0].record
        problem = header_problem(header)
        if problem is not None:
            raise DataError(problem, path=path, line=1)
        key = header.get("server_key")
        if key is None:
            signer = None
        elif signer is None or signer.public_key != key:
            raise DataError(
                f"the ledger is signed by key {key[:16]}..., "
                + ("no signing key was given" if signer is None else "not by the key given"),
                path=path,
                line=1,
            )
        rounds = releases = 0
        for before, line in itertools.pairwise(lines):
            if line.record.get("prev") != before.sha256:
                raise DataError(
                    "prev is not the SHA-256 of the previous line: the ledger was altered",
                    path=path,
                    line=line.number,
                )
            kind = line.record.get("type")
            if kind == "final":
                raise DataError(
                    "the ledger has a final line: the run is finished and cannot be resumed",
                    path=path,
                    line=line.number,
                )
            if kind == "release" and not rounds and line.record.get("round") == releases + 1:
                releases += 1
                continue
            if kind != "round" or line.record.get("round") != rounds + 1:
                raise DataError(
                    f"expected round record {rounds + 1}, got {kind!r} "
                    f"{line.record.get('round')!r}",
                    path=path,
                    line=line.number,
                )
            rounds += 1
        return cls(
            path,
            header=header,
            hashes=[line.sha256 for line in lines],
            rounds=rounds,
            signer=signer,
            releases=releases,
        )

    @property
    def releases(self) -> int:
        """Number of warm-start release records written so far."""
        return self._releases

    def append_round(
        self, record: Mapping[str, Any], *, cosignatures: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """Write one round record and return it as written (with ``type``, ``prev``, defaults).

        ``record`` holds the fields listed in the module docstring; ``mechanism`` defaults to
        ``"subsampled-gaussian"``. Its ``round`` must be the next number (1 after the header).
        ``cosignatures`` are the committee's (:class:`common.privacy.signing.Cosignature`
        records), kept in ``signatures.committee`` of a signed ledger.

        Raises
        ------
        ValueError
            If a field is missing or out of range, the round number is not the next one, or
            co-signatures are given to an unsigned ledger.
        """
        self._check_open()
        if cosignatures and self._signer is None:
            raise ValueError("co-signatures need a signed ledger (a writer with a signer)")
        full: dict[str, Any] = {"mechanism": MECHANISM, **record}
        full.pop(SIGNATURES_FIELD, None)
        full["type"] = "round"
        full["prev"] = self._hashes[-1]
        if full.get("round") != self._rounds + 1:
            raise ValueError(f"round must be {self._rounds + 1}, got {full.get('round')!r}")
        problem = round_problem(full, mode=self.mode, population=self.header["population"])
        if problem is not None:
            raise ValueError(problem)
        self._append(full, cosignatures=[dict(c) for c in cosignatures])
        self._rounds += 1
        return full

    def append_release(
        self, record: Mapping[str, Any], *, cosignatures: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, Any]:
        """Write one warm-start release line (``type: "release"``) and return it as written.

        ``record`` has a round record's fields plus ``release`` (its name); its ``round`` is
        the release's position (1, 2), and releases come before every round. It is checked as
        a client-level round at sample rate 1 (m = N, z_eff = z * sqrt(k / N)).

        Raises
        ------
        ValueError
            If a field is out of range, a round was written already, or the position is not
            the next release's.
        """
        self._check_open()
        if cosignatures and self._signer is None:
            raise ValueError("co-signatures need a signed ledger (a writer with a signer)")
        if self._rounds:
            raise ValueError("a warm-start release must come before the first round")
        full: dict[str, Any] = {"mechanism": MECHANISM, **record}
        full.pop(SIGNATURES_FIELD, None)
        full["type"] = "release"
        full["prev"] = self._hashes[-1]
        if full.get("round") != self._releases + 1:
            raise ValueError(f"release must be {self._releases + 1}, got {full.get('round')!r}")
        problem = release_problem(full, population=self.header["population"])
        if problem is not None:
            raise ValueError(problem)
        self._append(full, cosignatures=[dict(c) for c in cosignatures])
        self._releases += 1
        return full

    def close(
        self,
        *,
        epsilon: float | None,
        epsilon_rdp: float | None,
        epsilon_aggregator: float | None = None,
    ) -> None:
        """Write the final line: the run ended cleanly after :attr:`rounds` rounds.

        Parameters
        ----------
        epsilon, epsilon_rdp:
            The final claimed PRV and RDP epsilons (those of the last round; ``None`` when DP
            is off).
        epsilon_aggregator:
            The largest epsilon of any client against the aggregator (the last line's), when
            the lines list their participants.
        """
        self._check_open()
        extra = {} if epsilon_aggregator is None else {"epsilon_aggregator": epsilon_aggregator}
        final = {
            "type": "final",
            "rounds": self._rounds,
            "epsilon": epsilon,
            "epsilon_rdp": epsilon_rdp,
            **extra,
            "chain": chain_digest(self._hashes),
            "prev": self._hashes[-1],
        }
        self._append(final)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the ledger already has its final line")

    def _append(
        self, record: Mapping[str, Any], *, cosignatures: list[dict[str, Any]] | None = None
    ) -> None:
        raw = canonical_json(_signed(record, self._signer, cosignatures))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            _write_all_once(fd, raw + b"\n")
        finally:
            os.close(fd)
        self._hashes.append(line_hash(raw))


def _signed(
    record: Mapping[str, Any],
    signer: LineSigner | None,
    cosignatures: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``record`` with its ``signatures`` (the server's, and the committee's if any)."""
    if signer is None:
        return dict(record)
    signatures: dict[str, Any] = {"server": signer.sign(signed_body(record))}
    if cosignatures:
        signatures["committee"] = cosignatures
    return {**record, SIGNATURES_FIELD: signatures}


def _write_all_once(fd: int, data: bytes) -> None:
    """One ``os.write`` of all of ``data``, then ``fsync``; a short write is an error."""
    written = os.write(fd, data)
    if written != len(data):  # a full disk; retrying would split the line in two writes
        raise OSError(f"short write to the ledger ({written} of {len(data)} bytes)")
    os.fsync(fd)


def _fsync_dir(folder: Path) -> None:
    # the new file's directory entry must survive a crash too
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

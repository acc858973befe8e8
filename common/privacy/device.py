"""A device's own record of the rounds it took part in, checked against the server's ledger.

A device (``fedrec client join``) keeps ``HISTORY.csv.fedrec-ledger.json`` next to its history
(:mod:`client.store`): ``{"format": 1, "history": NAME, "participations": [ENTRY, ...]}``, one
entry per round it trained in, with the mechanism the server announced to it (``mode``,
``clip``, ``sample_rate``, ``delta``, ``steps``, the accounting ``noise_multiplier`` and, from
fedrec 0.2, the configured ``announced_noise_multiplier`` and ``expected_participants`` m = qN)
and, when it sat on the round's decryption committee, the ``cosignature`` it returned
(:class:`common.privacy.signing.Cosignature`). The server never saw the device's file, so it
is evidence the server cannot rewrite: ``fedrec audit verify RUN --device-ledger FILE``
(:func:`device_ledger_problem`) checks that every round of the device's record is a round of
the ledger with the same mechanism, and that the device's co-signatures are in the ledger's
lines, unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.privacy.ledger import SIGNATURES_FIELD, LedgerLine
from common.privacy.signing import Cosignature

__all__ = ["DEVICE_LEDGER_FORMAT", "device_ledger_problem", "read_device_ledger"]

DEVICE_LEDGER_FORMAT = 1
"""The ``format`` of a device ledger file."""

_REL_TOL = 1e-9


def read_device_ledger(path: Path) -> list[dict[str, Any]]:
    """The participations of a device ledger file.

    Raises
    ------
    DataError
        If the file cannot be read or is not a device ledger.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the device ledger: {err}", path=path) from err
    if not isinstance(payload, dict) or payload.get("format") != DEVICE_LEDGER_FORMAT:
        raise DataError("not a device ledger (format 1)", path=path)
    entries = payload.get("participations")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError("the device ledger's participations must be a list of objects", path=path)
    for i, entry in enumerate(entries):
        if not isinstance(entry.get("round"), int) or isinstance(entry.get("round"), bool):
            raise DataError(f"participation {i + 1} has no round number", path=path)
    return list(entries)


def _this_run(
    header: Mapping[str, Any], entries: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The entries of the ledger's run: those of the Flower run a co-signature of this ledger's
    run id belongs to, else of the one Flower run with the config's name."""
    name = header["config"].get("name", "fedrec")
    runs: dict[Any, list[dict[str, Any]]] = {}
    for entry in entries:
        runs.setdefault(entry.get("flwr_run_id"), []).append(entry)
    marked = {
        key
        for key, group in runs.items()
        for entry in group
        if isinstance(entry.get("cosignature"), dict)
        and isinstance(entry["cosignature"].get("statement"), dict)
        and entry["cosignature"]["statement"].get("run_id") == header["run_id"]
    }
    if not marked:
        marked = {key for key, group in runs.items() if group[0].get("run") == name}
    if not marked:
        return None, f"the device ledger has no round of run {name!r}"
    if len(marked) > 1:
        return None, (
            f"the device ledger holds {len(marked)} Flower runs named {name!r} and no "
            "co-signature tells which is this ledger's"
        )
    return runs[marked.pop()], None


def _same(a: Any, b: Any) -> bool:
    return (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and math.isclose(a, b, rel_tol=_REL_TOL)
    )


def _entry_problem(
    entry: Mapping[str, Any], line: Mapping[str, Any], *, mode: str, delta: float
) -> str | None:
    """How the device's record of a round differs from the ledger's line, or ``None``."""
    if entry.get("mode") != mode:
        return f"the device recorded mode {entry.get('mode')!r}, the ledger is {mode!r}"
    if not _same(entry.get("clip"), line["clip"]):
        return f"clip {entry.get('clip')!r} on the device, {line['clip']!r} in the ledger"
    if not _same(entry.get("delta"), delta):
        return f"delta {entry.get('delta')!r} on the device, {delta!r} in the ledger"
    z = line["noise_multiplier"]
    if mode == "client":
        for key in ("sample_rate", "expected_participants"):
            if key in entry and not _same(entry[key], line[key]):
                return f"{key} {entry[key]!r} on the device, {line[key]!r} in the ledger"
        announced = entry.get("announced_noise_multiplier")
        if announced is not None and not _same(announced, z):
            return f"noise multiplier {announced!r} announced to the device, {z!r} in the ledger"
        guard = entry.get("noise_multiplier")
        if isinstance(guard, int | float) and guard > z * (1 + _REL_TOL):
            return f"the device accounted z {guard!r}, above the ledger's {z!r}"
        return None
    if not _same(entry.get("noise_multiplier"), z):
        return (
            f"noise multiplier {entry.get('noise_multiplier')!r} on the device, {z!r} in the ledger"
        )
    q, steps = entry.get("sample_rate"), entry.get("steps")
    if isinstance(q, int | float) and q > line["sample_rate"] * (1 + _REL_TOL):
        return f"the device's DP-SGD q {q!r} exceeds the ledger's {line['sample_rate']!r}"
    if isinstance(steps, int) and steps > line["steps"]:
        return f"the device's {steps} DP-SGD steps exceed the ledger's {line['steps']}"
    return None


def device_ledger_problem(
    header: Mapping[str, Any], lines: Sequence[LedgerLine], entries: Sequence[dict[str, Any]]
) -> tuple[str | None, int]:
    """Check a device's record (:func:`read_device_ledger`) against a ledger's lines.

    Returns
    -------
    tuple
        The first difference in one line (``None`` when the record agrees) and how many of the
        device's rounds were checked.
    """
    group, problem = _this_run(header, entries)
    if group is None:
        return problem, 0
    rounds = {
        line.record["round"]: line.record for line in lines if line.record.get("type") == "round"
    }
    for entry in group:
        r = entry["round"]
        line = rounds.get(r)
        if line is None:
            return f"the device took part in round {r}, which the ledger does not have", 0
        problem = _entry_problem(entry, line, mode=header["mode"], delta=header["delta"])
        if problem is not None:
            return f"round {r}: {problem}", 0
        if "cosignature" in entry:
            cosignature = Cosignature.from_record(entry["cosignature"])
            if cosignature is None or not cosignature.valid():
                return f"round {r}: the device's own co-signature does not verify", 0
            signatures = line.get(SIGNATURES_FIELD)
            committee = signatures.get("committee", []) if isinstance(signatures, dict) else []
            if cosignature.to_record() not in committee:
                return (
                    f"round {r}: the device co-signed this round as a committee member, but its "
                    "co-signature is not in the ledger's line"
                ), 0
    return None, len(group)

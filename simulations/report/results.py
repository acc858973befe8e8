"""Reading a run's ``results.json`` for the report: rounds, series, the models compared."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedrecError

__all__ = ["MISSING", "load_results"]

logger = logging.getLogger(__name__)

MISSING = "–"
"""Shown in tables for a value the run did not record (e.g. a round without evaluation)."""

_BYTES_PER_MB = 1e6  # decimal megabytes, as network traffic is usually counted
_HE_PHASES = ("he_encrypt_seconds", "he_aggregate_seconds", "he_decrypt_seconds")
_METRICS = (
    ("ndcg@100", "NDCG@100"),
    ("recall@20", "Recall@20"),
    ("recall@50", "Recall@50"),
    ("coverage@20", "Coverage@20"),
)
_DPI = 110


# --------------------------------------------------------------------------------------- input


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read and minimally check ``run_dir/results.json``.

    Parameters
    ----------
    run_dir:
        Folder of one federated run.

    Returns
    -------
    dict
        The parsed results, with at least a ``rounds`` list of objects.

    Raises
    ------
    FedrecError
        One line naming the file, if it is missing, not valid JSON or lacks a ``rounds`` list.
    """
    path = Path(run_dir) / "results.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedrecError(f"{path}: not found (has the run written any rounds yet?)") from None
    except OSError as err:
        raise FedrecError(f"{path}: cannot read: {err.strerror}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as err:
        raise FedrecError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(results, dict):
        raise FedrecError(f"{path}: expected a JSON object at the top level")
    rounds = results.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise FedrecError(f"{path}: expected 'rounds' to be a list of objects")
    return results


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict (absent or malformed sections)."""
    return value if isinstance(value, dict) else {}


def _rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round records; an absent list counts as no rounds yet."""
    return list(results.get("rounds") or [])


def _round_number(record: dict[str, Any], index: int) -> int:
    """``record["round"]``, falling back to the 1-based position for older files."""
    value = record.get("round")
    return int(value) if isinstance(value, int | float) else index + 1


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _series(results: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of ``key`` for the rounds that recorded a number for it."""
    xs: list[int] = []
    ys: list[float] = []
    for i, record in enumerate(_rounds(results)):
        value = _number(record.get(key))
        if value is not None:
            xs.append(_round_number(record, i))
            ys.append(value)
    return xs, ys


def _warm_start(results: dict[str, Any]) -> dict[str, Any]:
    """The run's ``warm_start`` summary (:mod:`common.warmstart`); empty without a warm start."""
    return _dict(results.get("warm_start"))


def _releases(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The warm start's ledger release records (popularity, then co-occurrence), if any."""
    releases = _warm_start(results).get("releases")
    return [r for r in releases if isinstance(r, dict)] if isinstance(releases, list) else []


def _planned_rounds(results: dict[str, Any]) -> int | None:
    """The rounds the config planned (``None`` if it does not say)."""
    planned = _number(_dict(results.get("config")).get("rounds"))
    return None if planned is None else int(planned)


def _warm_only(results: dict[str, Any]) -> bool:
    """Whether the run is a warm start alone: a warm start and no training round planned."""
    return bool(_warm_start(results)) and _planned_rounds(results) == 0 and not _rounds(results)


def _release_epsilon(results: dict[str, Any]) -> float | None:
    """Epsilon after the warm start's last release (before any round), if recorded."""
    releases = _releases(results)
    return _number(releases[-1].get("epsilon")) if releases else None


def _final_test(results: dict[str, Any]) -> dict[str, Any]:
    """Final test metrics; empty for a partial run that has not reached the end."""
    return _dict(_dict(results.get("final")).get("test"))


@dataclass(frozen=True)
class _Model:
    """One row of the comparison: a model's label and its test metrics on the run's users."""

    key: str
    label: str
    test: dict[str, Any]


_MODEL_NAMES = {"multvae": "Mult-VAE", "multdae": "Mult-DAE"}


def _comparison(results: dict[str, Any]) -> list[_Model]:
    """Federated first, then the warm start alone (a run with rounds after one), popularity,
    EASE and the centralized reference, where recorded."""
    config = _dict(results.get("config"))
    kind = _dict(config.get("model")).get("kind")
    label = f"federated {_MODEL_NAMES.get(str(kind), kind)}" if kind else "federated"
    warm = _warm_start(results)
    if _warm_only(results):
        label += ", warm start only (0 rounds)"
    models = [_Model("federated", label, _final_test(results))]
    if warm and not _warm_only(results):
        models.append(_Model("warm", "warm start only (before round 1)", _dict(warm.get("test"))))
    baselines = _dict(results.get("baselines"))
    for key, default in (("popularity", "popularity"), ("ease", "EASE")):
        entry = _dict(baselines.get(key))
        if entry:
            models.append(_Model(key, str(entry.get("label", default)), _dict(entry.get("test"))))
    reference = results.get("reference")
    if isinstance(reference, dict):
        label = str(reference.get("label", "centralized reference"))
        models.append(_Model("reference", label, _dict(reference.get("test"))))
    return models


def _target_epsilon(results: dict[str, Any]) -> float | None:
    """The run's ``target_epsilon``: from ``final.privacy`` if recorded there, else the config."""
    privacy = _dict(_dict(results.get("final")).get("privacy"))
    target = _number(privacy.get("target_epsilon"))
    if target is None:
        target = _number(_dict(_dict(results.get("config")).get("privacy")).get("target_epsilon"))
    return target


def _epsilon_rdp_series(results: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Per-round RDP epsilon; files from before ``epsilon_rdp`` fall back to ``epsilon``."""
    xs, ys = _series(results, "epsilon_rdp")
    return (xs, ys) if xs else _series(results, "epsilon")


def _epsilon_prv_series(results: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The rounds that computed PRV (``epsilon_prv``, or ``ledger.epsilon_accountant == "prv"``)."""
    xs: list[int] = []
    ys: list[float] = []
    for i, record in enumerate(_rounds(results)):
        value = _number(record.get("epsilon_prv"))
        ledger = _dict(record.get("ledger"))
        if value is None and ledger.get("epsilon_accountant") == "prv":
            value = _number(ledger.get("epsilon"))
        if value is not None:
            xs.append(_round_number(record, i))
            ys.append(value)
    return xs, ys


def _tracks_epsilon(results: dict[str, Any]) -> bool:
    return bool(_epsilon_rdp_series(results)[0] or _epsilon_prv_series(results)[0])


# --------------------------------------------------------------------------------------- plots

"""The report's offline HTML page, section by section (see :mod:`simulations.report`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common.io import atomic_write_text
from simulations.report.markup import _CSS, _digits, _e, _fmt, _fmt_mb, _img, _ratio, _table
from simulations.report.plots import plot_cost, plot_epsilon, plot_metrics
from simulations.report.privacy import _privacy_section
from simulations.report.results import (
    _METRICS,
    MISSING,
    _comparison,
    _dict,
    _number,
    _rounds,
    _series,
    load_results,
)

__all__ = ["write_report"]

logger = logging.getLogger(__name__)


_SHORT = {"popularity": "popularity", "ease": "EASE", "reference": "central"}


def _baselines_section(results: dict[str, Any]) -> str:
    """``#baselines``: the headline sentence and the comparison table."""
    models = _comparison(results)
    federated = models[0]
    fed_ndcg = federated.test.get("ndcg@100")
    parts = [f'federated NDCG@100 <span class="figure">{_e(_fmt(_number(fed_ndcg)))}</span>']
    for model in models[1:]:
        value = _fmt(_number(model.test.get("ndcg@100")))
        ratio = _ratio(fed_ndcg, model.test.get("ndcg@100"))
        parts.append(
            f"{_e(model.label)} {_e(value)} (federated / {_e(_SHORT[model.key])} {_e(ratio)})"
        )
    headline = '<p class="headline">' + " · ".join(parts) + "</p>"
    header = ["model", *(title for _, title in _METRICS), "federated / model (NDCG@100)"]
    rows = [
        [
            model.label,
            *(_fmt(_number(model.test.get(key))) for key, _ in _METRICS),
            MISSING if model.key == "federated" else _ratio(fed_ndcg, model.test.get("ndcg@100")),
        ]
        for model in models
    ]
    table = _table(header, rows, key_column=True, attrs='id="comparison"')
    baselines = _dict(results.get("baselines"))
    split = _dict(baselines.get("split"))
    if baselines:
        ease = _dict(baselines.get("ease"))
        grid = ", ".join(_dict(ease.get("validation_ndcg@100")))
        note = (
            f"All rows are scored on the same {_fmt(split.get('test_users'))} held-out test "
            "users (strong generalization: 80% of each user's items folded in, the rest "
            "predicted). Popularity and EASE are centralized: they are fitted on the "
            f"{_fmt(split.get('train_users'))} training users' rows the clients hold, EASE's "
            f"λ picked on the {_fmt(split.get('validation_users'))} validation users from "
            f"[{grid}]."
        )
    else:
        note = (
            "Baselines: not recorded (the run has not finished, or its folder holds no "
            "training rows)."
        )
    return (
        '<section id="baselines"><h2>Test quality against the baselines</h2>'
        f'{headline}{table}<p class="note">{_e(note)}</p></section>'
    )


# ------------------------------------------------------------------------------------ privacy


def _run_section(results: dict[str, Any]) -> str:
    """``#run``: rounds, wall time and traffic."""
    wall = _number(results.get("wall_seconds"))
    planned = _dict(results.get("config")).get("rounds")
    rows = [
        ("rounds", f"{len(_rounds(results)):,} of {_fmt(planned)}"),
        ("wall time", MISSING if wall is None else f"{wall:,.1f} s ({wall / 60:.1f} min)"),
        ("total MB up", _fmt_mb(sum(_series(results, "bytes_up")[1]))),
        ("total MB down", _fmt_mb(sum(_series(results, "bytes_down")[1]))),
    ]
    return f'<section id="run"><h2>Run</h2>{_table(["", "value"], rows, key_column=True)}</section>'


# ------------------------------------------------------------------------------------- rounds

_Column = tuple[str, str, Callable[[Any], str]]

# Known per-round columns, in display order: (key, header, formatter); one naming style.
_COLUMNS: tuple[_Column, ...] = (
    ("round", "Round", _fmt),
    ("sampled", "Sampled", _fmt),
    ("returned", "Returned", _fmt),
    ("failed", "Failed", _fmt),
    ("dropped", "Dropped", _fmt),
    ("refused", "Refused", _fmt),
    ("applied", "Applied", _fmt),
    ("discarded", "Discarded", _fmt),
    ("ndcg@100", "NDCG@100", _fmt),
    ("recall@20", "Recall@20", _fmt),
    ("client_ndcg@100", "Client NDCG@100", _fmt),
    ("epsilon_rdp", "ε RDP", _digits(3)),
    ("epsilon_prv", "ε PRV", _digits(3)),
    ("effective_noise_multiplier", "Effective z", _digits(3)),
    ("seconds", "Round (s)", _digits(2)),
    ("bytes_up", "Up (MB)", _fmt_mb),
    ("bytes_down", "Down (MB)", _fmt_mb),
    ("deserialize_seconds", "Deserialize (s)", _digits(3)),
    ("train_seconds", "Train (s)", _digits(3)),
    ("serialize_seconds", "Serialize (s)", _digits(3)),
    ("he_encrypt_seconds", "HE encrypt (s)", _digits(3)),
    ("he_aggregate_seconds", "HE aggregate (s)", _digits(3)),
    ("he_decrypt_seconds", "HE decrypt (s)", _digits(3)),
)

_HIDDEN = frozenset({"ledger", "participated"})
"""Round keys not shown: the ledger record (its numbers have columns of their own) and
``participated`` (the same count as ``returned``)."""


def _human(key: str) -> str:
    """``"foo_bar_seconds"`` -> ``"Foo bar (s)"``: an unknown column in the table's style."""
    words = key.replace("-", "_")
    unit = ""
    if words.endswith("_seconds"):
        words, unit = words.removesuffix("_seconds"), " (s)"
    text = words.replace("_", " ").strip() or key
    return text[0].upper() + text[1:] + unit


def _round_columns(rounds: Sequence[dict[str, Any]]) -> list[_Column]:
    """The columns with a value in some round: the known ones in order, then other scalars."""
    recorded = {k for r in rounds for k, v in r.items() if v is not None}
    columns = [c for c in _COLUMNS if c[0] in recorded]
    if "epsilon" in recorded and not {"epsilon_rdp", "epsilon_prv"} & recorded:
        columns.append(("epsilon", "ε", _digits(3)))  # a file from before the split columns
    known = {c[0] for c in _COLUMNS} | _HIDDEN | {"epsilon"}
    scalars = {
        k for r in rounds for k, v in r.items() if v is not None and not isinstance(v, dict | list)
    }
    columns += [(key, _human(key), _fmt) for key in sorted(scalars - known)]
    return columns


def _rounds_section(results: dict[str, Any]) -> str:
    """``#rounds``: every round in a scroll container with a sticky header."""
    rounds = _rounds(results)
    if not rounds:
        return '<section id="rounds"><h2>Rounds</h2><p>no round has finished yet</p></section>'
    columns = _round_columns(rounds)
    rows = [
        [fmt(None if isinstance(r.get(k), dict | list) else r.get(k)) for k, _, fmt in columns]
        for r in rounds
    ]
    table = _table([h for _, h, _ in columns], rows, key_column=False)
    return (
        f'<section id="rounds"><h2>Rounds ({len(rounds):,})</h2>'
        f'<div class="scroll">{table}</div></section>'
    )


# --------------------------------------------------------------------------- config, provenance


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``, in the config's own key order."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _config_value(value: Any) -> str:
    """A config value as TOML would spell it (strings bare, lists and empty tables as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, default=str)


def _config_section(results: dict[str, Any]) -> str:
    """``#config``: the run configuration as dotted keys and values."""
    config = _dict(results.get("config"))
    rows = [(key, _config_value(value)) for key, value in _flatten(config) if key]
    table = _table(
        ["key", "value"], rows, key_column=True, attrs='id="config-table"',
        text_columns=frozenset({1}),
    )  # fmt: skip
    return f'<section id="config"><h2>Configuration</h2>{table}</section>'


_PROVENANCE_LABELS = {
    "fedrec": "fedrec",
    "flower": "Flower (flwr)",
    "torch": "PyTorch",
    "opacus": "Opacus",
    "tenseal": "TenSEAL",
    "python": "Python",
    "git_commit": "git commit",
    "git_dirty": "uncommitted changes",
}


def _provenance_section(results: dict[str, Any]) -> str:
    """``#provenance``: versions and commit recorded with the run (or found now, if the run has
    not recorded them)."""
    recorded = _dict(results.get("provenance"))
    if recorded:
        info, note = recorded, "Recorded when the run finished."
    else:
        from simulations.runner import provenance

        info = provenance()
        note = "Not recorded with the run (it has not finished): read when this page was written."
    rows = [(_PROVENANCE_LABELS.get(key, _human(key)), _fmt(value)) for key, value in info.items()]
    table = _table(["", "value"], rows, key_column=True, text_columns=frozenset({1}))
    return (
        f'<section id="provenance"><h2>Provenance</h2>{table}'
        f'<p class="note">{_e(note)}</p></section>'
    )


# ----------------------------------------------------------------------------------------- page


def write_report(run_dir: Path) -> Path:
    """Write the plots and a self-contained ``report.html`` for one run folder.

    Parameters
    ----------
    run_dir:
        Folder holding ``results.json``; the PNGs and the page are written next to it. Its
        ``ledger.jsonl``, when present, is audited for the privacy box.

    Returns
    -------
    Path
        Path of ``report.html``.

    Raises
    ------
    FedrecError
        If ``results.json`` is missing or invalid (see :func:`load_results`).
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    config = _dict(results.get("config"))
    name = str(config.get("name") or run_dir.name)

    plot_metrics(results, run_dir / "metrics.png")
    images = [
        _img(
            run_dir / "metrics.png",
            "Test NDCG@100 and Recall@20 per round, with the baselines and the reference",
            "plot-metrics",
        )
    ]
    if plot_epsilon(results, run_dir / "epsilon.png"):
        images.append(
            _img(
                run_dir / "epsilon.png",
                "Privacy budget spent per round (RDP, PRV) against the target",
                "plot-epsilon",
            )
        )
    plot_cost(results, run_dir / "cost.png")
    images.append(_img(run_dir / "cost.png", "Time and traffic per round", "plot-cost"))

    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>fedrec report: {_e(name)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{_e(name)} <small>{_e(run_dir)}</small></h1>",
            _baselines_section(results),
            _privacy_section(results, run_dir),
            _run_section(results),
            '<section id="plots"><h2>Plots</h2>',
            *images,
            "</section>",
            _rounds_section(results),
            _config_section(results),
            _provenance_section(results),
            "</body></html>",
            "",
        ]
    )
    report = run_dir / "report.html"
    atomic_write_text(report, page)
    logger.info("wrote %s", report)
    return report
